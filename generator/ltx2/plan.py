"""One plan per job from its VRAM budget: which blocks stay resident, which stream, and activation sizes.

The planner uses the predictor's per-phase model (``generator/predict.py``) with the block
sizes of the models actually built: a phase keeps every block resident when it fits,
otherwise as many as fit beside its activations and two streaming slots, and streams the
rest (``generator/ltx2/streaming.py``). Streaming changes no bits. The guidance batch is
lowered when batching would cost resident blocks. Decode tiles and the feed-forward chunk
change the output's bits, so tiles are only made smaller when the decode cannot fit at
the configured size, and the chunk stays as built (4,096 tokens; recorded). Each phase's choices are reported with its
figures (``PhaseEvent.plan``); docs/DESIGN.md, 'VRAM budget and streaming'.

Streamed models are built on the host (the budget may be smaller than the model) and their
non-streamed parts moved to the device afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from generator import predict
from generator.ltx2.models import FEED_FORWARD_CHUNK_TOKENS
from generator.ltx2.streaming import PinAllowance, block_bytes, stream, streamers_of, unique_bytes
from generator.phases import PhaseTracker
from generator.protocol import JobSpec, Tiling

log = logging.getLogger(__name__)
GIB = 2**30
AUTO_MARGIN_GIB = 0.5  # left free under "auto" for the allocator's rounding and the desktop
MIN_SPATIAL_TILE = 256
SMALL_FF_CHUNK = 1024


def allocator_budget_gib(spec: JobSpec, device: torch.device) -> float | None:
    """GiB the job's allocations may use, or None for no budget."""
    budget = spec.vram_budget_gib
    if budget is None:
        return None
    if budget == "auto":
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)  # after our own context: what allocations can still get
        return free / GIB - AUTO_MARGIN_GIB
    if device.type != "cuda":
        return float(budget)  # no CUDA context or allocator reserve on the CPU (tests)
    return predict.allocator_budget(float(budget))


@dataclass
class Planner:
    spec: JobSpec
    device: torch.device
    tracker: PhaseTracker
    budget_gib: float | None  # allocator GiB
    allowance: PinAllowance
    models: dict[str, predict.PhaseModel]

    @classmethod
    def for_job(cls, spec: JobSpec, device: torch.device, tracker: PhaseTracker,
                pin_limit_bytes: int | None = None) -> Planner:
        budget = allocator_budget_gib(spec, device)
        models = predict.phase_models(spec.family) or {}
        planner = cls(spec, device, tracker, budget, PinAllowance(pin_limit_bytes), models)
        if budget is not None:
            if device.type == "cuda":
                # The planner's figures are predictions: the allocator's cap makes the budget a hard
                # limit (an out-of-memory error rather than a card that swaps the desktop out).
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GIB / total),
                                                           torch.cuda.current_device())
            planner.spec = planner._adjusted(spec)
        return planner

    def _activation(self, phase: str, batch: int | None = None) -> float:
        model = self.models.get(phase)
        if model is None:
            return 0.0
        req = self.spec.request
        return predict.activation_gib(model, phase, req.pipeline, req.width, req.height, req.frames,
                                      batch or self.spec.guidance_batch)

    def _adjusted(self, spec: JobSpec) -> JobSpec:
        """The guidance batch and decode tiles under the budget (unchanged when they fit)."""
        update: dict[str, Any] = {}
        stage_1 = self.models.get("stage_1")
        if stage_1 is not None and spec.guidance_batch > 1:
            base = predict.plan_phase(stage_1, self._activation("stage_1", 1), self.budget_gib)
            batch = spec.guidance_batch
            while batch > 1 and predict.plan_phase(
                stage_1, self._activation("stage_1", batch), self.budget_gib
            ).resident < base.resident:
                batch -= 1
            update["guidance_batch"] = batch
        decode = self.models.get("video_decode")
        tiling = spec.tiling
        if decode is not None and self.budget_gib is not None:
            scale = 1.0
            while decode.fixed_gib + self._activation("video_decode") * scale > self.budget_gib:
                px = max(MIN_SPATIAL_TILE, tiling.spatial_px // 2 // 32 * 32)
                if px >= tiling.spatial_px:
                    break
                scale *= (px / tiling.spatial_px) ** 2
                tiling = Tiling(spatial_px=px, spatial_overlap_px=min(tiling.spatial_overlap_px, px // 4 // 32 * 32),
                                temporal_frames=tiling.temporal_frames,
                                temporal_overlap_frames=tiling.temporal_overlap_frames)
            update["tiling"] = tiling
        return spec.model_copy(update=update)

    def resident_blocks(self, phase: str, blocks: list[torch.nn.Module], other_bytes: int,
                        activation_phases: tuple[str, ...]) -> predict.PhasePlan:
        """How many of ``blocks`` stay resident for ``phase`` (all without a budget), and through how many slots.

        The fitted activations are for the full-size model; a model of other block sizes (the
        tests' tiny ones) has them scaled by its block size over the fitted one.
        """
        if self.budget_gib is None or not blocks:
            return predict.PhasePlan(len(blocks), 0, 0.0)
        block_gib = max(block_bytes(b) for b in blocks) / GIB
        fitted = self.models.get(phase)
        # The fit's block size is the mean (the embeddings processor's video connector blocks are 1.6x
        # its audio ones): scaling by the largest would swell a full-size model's activations too.
        mean_gib = sum(block_bytes(b) for b in blocks) / len(blocks) / GIB
        scale = mean_gib / fitted.block_gib if fitted is not None and fitted.block_gib else 1.0
        activation = max(self._activation(p) + self._constant(p) for p in activation_phases) * scale
        model = predict.PhaseModel(fixed_gib=other_bytes / GIB, block_gib=block_gib, blocks=len(blocks))
        return predict.plan_phase(model, activation, self.budget_gib)

    def fits_resident(self, phases: tuple[str, ...]) -> bool:
        """Whether the fitted model says these phases keep every block resident (then no host build is needed)."""
        for phase in phases:
            model = self.models.get(phase)
            if model is None or predict.plan_phase(model, self._activation(phase), self.budget_gib).streamed:
                return False
        return True

    def _constant(self, phase: str) -> float:
        """The phase's activations that do not grow with its tokens (fitted part minus never-streamed weights)."""
        model = self.models.get(phase)
        if model is None:
            return 0.0
        return max(0.0, model.fixed_gib - model.other_gib)

    def ledger(self, ledger: Any) -> Any:
        return ledger if self.budget_gib is None else BudgetedLedger(ledger, self)


def _host_ledger(ledger: Any) -> Any:
    """The same ledger building on the host (its store, builders and policy)."""
    return type(ledger)(
        dtype=ledger.dtype, device=torch.device("cpu"), checkpoint_path=ledger.checkpoint_path,
        gemma_root_path=ledger.gemma_root_path, spatial_upsampler_path=ledger.spatial_upsampler_path,
        loras=ledger.loras, registry=ledger.registry, quantization=ledger.quantization, store=ledger.store,
        used_keys_only=ledger.used_keys_only,
    )


class _Shell:
    """What ``transformer_with_loras(kept=...)`` fuses into: an object with a ``velocity_model``."""

    def __init__(self, velocity_model: torch.nn.Module) -> None:
        self.velocity_model = velocity_model


def _holder(velocity: torch.nn.Module, blocks: dict[int, torch.nn.Module], *, rest: bool = False) -> torch.nn.Module:
    """A module naming ``blocks`` (and with ``rest``, everything outside the blocks) as ``velocity`` does,
    so LoRA keys match; it holds the same tensors, no copies."""
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleDict({str(i): b for i, b in blocks.items()})
    if rest:
        for name, child in velocity.named_children():
            if name != "transformer_blocks":
                holder.add_module(name, child)
        for name, param in velocity._parameters.items():
            if param is not None:
                holder.register_parameter(name, param)
    return holder


def _other_bytes(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> int:
    inside = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    return unique_bytes(t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside)


class BudgetedLedger:
    """A ledger whose big models stream their blocks to fit the plan; every other build is the ledger's own.

    Only the transformer's streamed blocks are pinned. Page-locking costs about 1 s per GB on
    the H200 and every job pays it again (each is a fresh process), while a pageable copy runs
    at about 18 GB/s against 55 pinned (bench/results/h200-vram-budget). The transformer's
    blocks cross the bus on every pass of every step, hundreds of times a job, so pinning
    them pays; Gemma's layers and the connectors run once or twice a job, and pinning Gemma's
    20 GB would cost about 20 s where copying it pageable costs about 1.1 s per forward."""

    def __init__(self, ledger: Any, planner: Planner) -> None:
        self._ledger = ledger
        self._planner = planner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def _streamed(self, model: Any, phase: str, parts: list[tuple[torch.nn.Module, torch.nn.ModuleList, str]],
                  activation_phases: tuple[str, ...], *, pin: bool) -> Any:
        planner = self._planner
        all_blocks = [b for _, blocks, _ in parts for b in blocks]
        chosen = planner.resident_blocks(phase, all_blocks, _other_bytes(model, all_blocks), activation_phases)
        share = chosen.resident
        plan: dict[str, Any] = {"budget_bytes": int((planner.budget_gib or 0.0) * GIB), "blocks": len(all_blocks)}
        # The resident share goes to the parts in order (one list for most models).
        residents: list[int] = []
        for _, blocks, _ in parts:
            residents.append(min(len(blocks), share - sum(residents)))
        resident_total = sum(residents)
        # Each part's move to the device skips every part's streamed blocks: moving the rest of the
        # model for the first connector would otherwise upload the second's streamed blocks (and
        # the second's move, the first's), 2-3 GiB the plan does not count (H200, an 8 GiB budget).
        streamed = [b for (_, blocks, _), kept in zip(parts, residents, strict=True) for b in list(blocks)[kept:]]
        for (root, blocks, prefix), resident in zip(parts, residents, strict=True):
            stream(model, root, blocks, planner.device, resident=resident, allowance=planner.allowance,
                   prefix=prefix, slots=chosen.slots, pin=pin, others_streamed=streamed)
        streamers = streamers_of(model)
        plan.update(resident=resident_total, streamed=len(all_blocks) - resident_total, slots=chosen.slots,
                    block_bytes=max((block_bytes(b) for b in all_blocks), default=0))
        planner.tracker.note_plan(
            **plan,
            pinned_bytes=lambda: sum(s.stats.pinned_bytes for s in streamers),
            pageable_bytes=lambda: sum(s.stats.pageable_bytes for s in streamers),
            bytes_copied=lambda: sum(s.stats.bytes_copied for s in streamers),
        )
        log.info("%s: %d of %d blocks resident under %.2f GiB", phase, resident_total, len(all_blocks),
                 planner.budget_gib or 0.0)
        return model

    def _resident(self, phases: tuple[str, ...]) -> bool:
        if not self._planner.fits_resident(phases):
            return False
        self._planner.tracker.note_plan(budget_bytes=int((self._planner.budget_gib or 0.0) * GIB), streamed=0)
        return True

    def text_encoder(self) -> Any:
        if self._resident(("text_encode",)):
            return self._ledger.text_encoder()
        model = _host_ledger(self._ledger).text_encoder()
        language = model.model.model.language_model
        return self._streamed(model, "text_encode", [(language, language.layers, "gemma.")], ("text_encode",),
                              pin=False)

    def gemma_embeddings_processor(self) -> Any:
        if self._resident(("embeddings",)):
            return self._ledger.gemma_embeddings_processor()
        model = _host_ledger(self._ledger).gemma_embeddings_processor()
        parts = [(c, c.transformer_1d_blocks, f"{name}.")
                 for name, c in (("video", model.video_connector), ("audio", model.audio_connector))
                 if c is not None]
        return self._streamed(model, "embeddings", parts, ("embeddings",), pin=False)

    def transformer(self) -> Any:
        # Kept through the upsample into stage 2: planned for the largest need of the three (as predicted).
        phases = predict.TRANSFORMER_PHASES if self._planner.spec.request.pipeline != "one_stage" else ("stage_1",)
        self._planner.tracker.note_plan(guidance_batch=self._planner.spec.guidance_batch,
                                        ff_chunk_tokens=FEED_FORWARD_CHUNK_TOKENS)
        if self._resident(phases):
            return self._ledger.transformer()
        model = _host_ledger(self._ledger).transformer()
        velocity = model.velocity_model
        return self._streamed(model, self._planner.tracker.current or "stage_1",
                              [(velocity, velocity.transformer_blocks, "transformer.")], phases, pin=True)

    def transformer_with_loras(self, loras: Any, kept: Any = None) -> Any:
        if kept is None:
            return self._fresh(loras)
        streamers = streamers_of(kept)
        if not streamers:
            return self._ledger.transformer_with_loras(loras, kept=kept)
        # Fused on the device as the resident model is, one streamed block at a time (each brought
        # in, fused, written back to its host copy), and the resident part in one go: the same
        # function on the same device as without a budget. Each part reads only its own LoRA keys.
        velocity = kept.velocity_model
        packed = {id(p.module): (s, p) for s in streamers for p in s.packed}
        blocks = velocity.transformer_blocks
        for index, block in enumerate(blocks):
            if id(block) in packed:
                streamer, item = packed[id(block)]
                with streamer.on_device(item):
                    self._ledger.transformer_with_loras(loras, kept=_Shell(_holder(velocity, {index: block})))
        resident = {i: b for i, b in enumerate(blocks) if id(b) not in packed}
        self._ledger.transformer_with_loras(loras, kept=_Shell(_holder(velocity, resident, rest=True)))
        self._planner.tracker.note_plan(
            resident=sum(len(s.resident) for s in streamers), streamed=sum(len(s.packed) for s in streamers),
            bytes_copied=lambda: sum(s.stats.bytes_copied for s in streamers),
        )
        return kept

    def _fresh(self, loras: Any) -> Any:
        return BudgetedLedger(self._ledger.with_additional_loras(loras), self._planner).transformer()

    def video_decoder(self) -> Any:
        tiling = self._planner.spec.tiling
        self._planner.tracker.note_plan(spatial_tile_px=tiling.spatial_px, temporal_tile_frames=tiling.temporal_frames)
        return self._ledger.video_decoder()
