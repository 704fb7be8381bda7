"""The LTX-2 image-to-video run, composed from ltx-core and ltx-pipelines building blocks.

The stock pipeline classes call ``torch.cuda.synchronize()`` unconditionally and
pick their device at import time; this composition runs the same steps on CUDA
and on CPU with one code path. Each phase builds its model, runs, and frees it
before the next model is built (docs/DESIGN.md, 'Free between models' and 'fp8-cast and tiles').

The whole run, including the encoder consuming the lazy decoder iterator, sits
inside one ``torch.inference_mode()`` scope (docs/DESIGN.md, 'Scope'). inference_mode rather than
no_grad: it records no autograd state at all, the loaders accept it, and a decode
that escaped the scope fails loudly ("Inference tensors cannot be saved for
backward") instead of silently building a 54 GiB graph.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ltx_core.components.diffusion_steps import EulerDiffusionStep
from ltx_core.components.guiders import create_multimodal_guider_factory
from ltx_core.components.noisers import GaussianNoiser
from ltx_core.components.schedulers import LTX2Scheduler
from ltx_core.loader import LoraPathStrengthAndSDOps
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
from ltx_core.model.audio_vae import decode_audio as vae_decode_audio
from ltx_core.model.upsampler import upsample_video
from ltx_core.model.video_vae import SpatialTilingConfig, TemporalTilingConfig, TilingConfig
from ltx_core.model.video_vae import decode_video as vae_decode_video
from ltx_core.quantization import QuantizationPolicy
from ltx_core.types import VideoPixelShape
from ltx_pipelines.utils.constants import (
    DEFAULT_NEGATIVE_PROMPT,
    DISTILLED_SIGMA_VALUES,
    STAGE_2_DISTILLED_SIGMA_VALUES,
    detect_params,
)
from ltx_pipelines.utils.helpers import denoise_audio_video, simple_denoising_func
from ltx_pipelines.utils.samplers import euler_denoising_loop
from ltx_pipelines.utils.types import PipelineComponents

from generator.checks import main_checkpoint
from generator.encode import stream_clip
from generator.ltx2.compiled import check_cuda_graphs, prepare_transformer
from generator.ltx2.embed_cache import EmbeddingCache, model_identity, prompt_contexts
from generator.ltx2.guidance import batched_guider_denoising_func
from generator.ltx2.hq import hq_stages
from generator.ltx2.keyframes import conditioning_images
from generator.ltx2.models import LtxLedger
from generator.ltx2.plan import Planner
from generator.ltx2.scaled_mm import check_device
from generator.ltx2.staging import weight_store_for
from generator.phases import PhaseTracker, run_scoped
from generator.protocol import DoneEvent, JobSpec, ProgressEvent

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]
# Called with each video decoder right after it is built (tests hook submodules here).
DECODER_OBSERVERS: list[Callable[[torch.nn.Module], None]] = []
# Called with (stage, video state, audio state) as each denoising stage ends (tests and the
# benchmark compare final latents here).
DENOISE_OBSERVERS: list[Callable[[str, Any, Any], None]] = []


@dataclass
class _Run:
    spec: JobSpec
    device: torch.device
    dtype: torch.dtype
    tracker: PhaseTracker
    emit: Emit
    ledger: LtxLedger
    generator: torch.Generator
    components: PipelineComponents
    params: Any = None
    contexts: list[Any] = field(default_factory=list)
    # Stage 1's transformer, kept for stage 2 to reuse; held here alone so stage 2 can drop it.
    kept_transformer: Any = None
    # Called with (stage, step, total, denoised video tokens, pixel shape) after each step
    # (generator/preview.py draws stage 1's estimate here).
    step_observers: list[Callable[[str, int, int, torch.Tensor, VideoPixelShape], None]] = field(
        default_factory=list)

    @property
    def kind(self) -> str:
        return self.spec.request.pipeline

    @property
    def guided(self) -> bool:
        return self.kind != "distilled"

    @property
    def two_stages(self) -> bool:
        return self.kind != "one_stage"

    @property
    def reuse(self) -> bool:
        """Stage 2 takes stage 1's transformer (distilled: as is; two-stage: with the distilled LoRA
        fused in place) instead of reading the checkpoint again a minute later.

        With the owner's LoRAs stage 2 builds afresh (ltx-core sums every delta before one rounding),
        so stage 1's transformer is not kept for it: two would be resident at once.
        """
        return self.kind == "distilled" or (
            self.kind == "two_stage" and self.spec.stage_2_transformer == "reuse" and not self.spec.loras)

    def stage_1_size(self) -> tuple[int, int]:
        req = self.spec.request
        return (req.width // 2, req.height // 2) if self.two_stages else (req.width, req.height)

    def progress(self, stage: str, step: int, total: int) -> None:
        self.emit(ProgressEvent(stage=stage, step=step, total=total))

    def denoise(
        self,
        stage: str,
        transformer: Any,
        sigmas: torch.Tensor,
        shape: VideoPixelShape,
        conditionings: list[Any],
        *,
        guided: bool,
        steps_params: Any,
        sampler: Callable[..., Any] = euler_denoising_loop,
        stepper: Any = None,
        evaluations_per_step: int = 1,
        driver: Callable[..., tuple[Any, Any]] = denoise_audio_video,
        guider_factories: tuple[Any, Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, Any]:
        """One denoising stage; ``sampler`` is ltx-pipelines' loop (Euler, or res_2s with its stepper).

        res_2s evaluates the model twice per step and once more at the end: progress counts
        ``evaluations_per_step`` calls as one step. ``driver`` sets up the states and runs the loop
        (lipsync's keeps the audio frozen); ``guider_factories`` (video, audio) replace the ones
        made from ``steps_params`` and the negative prompt.
        """
        v_pos, a_pos = self.contexts[0].video_encoding, self.contexts[0].audio_encoding
        if guided:
            v_neg, a_neg = self.contexts[1].video_encoding, self.contexts[1].audio_encoding
            video_factory, audio_factory = guider_factories or (
                create_multimodal_guider_factory(params=steps_params.video_guider_params, negative_context=v_neg),
                create_multimodal_guider_factory(params=steps_params.audio_guider_params, negative_context=a_neg),
            )
            inner = batched_guider_denoising_func(
                video_guider_factory=video_factory,
                audio_guider_factory=audio_factory,
                v_context=v_pos,
                a_context=a_pos,
                transformer=transformer,
                max_batch=self.spec.guidance_batch,
            )
        else:
            inner = simple_denoising_func(video_context=v_pos, audio_context=a_pos, transformer=transformer)
        total = len(sigmas) - 1
        calls = [0]

        def with_progress(video_state: Any, audio_state: Any, sigmas: torch.Tensor, step_index: int) -> Any:
            result = inner(video_state, audio_state, sigmas, step_index)
            calls[0] += 1
            if calls[0] % evaluations_per_step == 0 and calls[0] // evaluations_per_step <= total:
                for observe in self.step_observers:
                    observe(stage, calls[0] // evaluations_per_step, total, result[0], shape)
                self.progress(stage, calls[0] // evaluations_per_step, total)
            return result

        def loop(sigmas: torch.Tensor, video_state: Any, audio_state: Any, stepper: Any) -> Any:
            return sampler(
                sigmas=sigmas, video_state=video_state, audio_state=audio_state, stepper=stepper,
                denoise_fn=with_progress,
            )

        self.progress(stage, 0, total)
        video_state, audio_state = driver(
            output_shape=shape,
            conditionings=conditionings,
            noiser=GaussianNoiser(generator=self.generator),
            sigmas=sigmas,
            stepper=stepper or EulerDiffusionStep(),
            denoising_loop_fn=loop,
            components=self.components,
            dtype=self.dtype,
            device=self.device,
            **extra,
        )
        for observe in DENOISE_OBSERVERS:
            observe(stage, video_state, audio_state)
        return video_state, audio_state


def user_loras(spec: JobSpec) -> tuple[LoraPathStrengthAndSDOps, ...]:
    """The job's LoRAs as ltx-core fuses them, with the renaming ltx-pipelines' ``--lora`` uses."""
    return tuple(
        LoraPathStrengthAndSDOps(str(lora.path), lora.strength, LTXV_LORA_COMFY_RENAMING_MAP) for lora in spec.loras
    )


def generate(
    spec: JobSpec,
    emit: Emit,
    *,
    scope: Callable[[], contextlib.AbstractContextManager[Any]] = torch.inference_mode,
    ledger_factory: Callable[..., LtxLedger] = LtxLedger,
) -> DoneEvent:
    """Render one clip.

    ``scope`` is a parameter only so a test can prove what it guards; ``ledger_factory``
    only so the GPU benchmark can build full-size models with random weights
    (``bench/random_weights.py``) and run this same phase sequence through them.
    """
    return run_scoped(spec, emit, scope, lambda device, tracker: _generate(spec, device, tracker, emit, ledger_factory))


def _generate(
    spec: JobSpec, device: torch.device, tracker: PhaseTracker, emit: Emit, ledger_factory: Callable[..., LtxLedger]
) -> DoneEvent:
    run = new_run(spec, device, tracker, emit, ledger_factory)
    if run.spec.request.mode == "retake":
        from generator.ltx2 import retake

        return retake.render(run)
    if run.spec.request.mode == "lipsync":
        from generator.ltx2 import lipsync

        return lipsync.render(run)
    if run.spec.draft != "off":
        # Draft and finalize are this run cut after stage 1 (docs/DESIGN.md, 'Drafts and previews').
        from generator.ltx2 import draft

        return draft.render(run)
    if run.spec.request.mode == "extend":
        from generator.ltx2 import extend

        return extend.render(run)
    cond_1, cond_2 = encode_inputs(run)
    if run.kind == "two_stage_hq":
        video_state, audio_state = hq_stages(run, cond_1, cond_2, *run.stage_1_size())
    else:
        video_state, audio_state = stage_1(run, cond_1, keep_transformer=run.reuse)
        if run.two_stages:
            video_state, audio_state = refine(run, video_state, audio_state, cond_2)
    return finish(run, video_state, audio_state)


def new_run(
    spec: JobSpec, device: torch.device, tracker: PhaseTracker, emit: Emit, ledger_factory: Callable[..., LtxLedger]
) -> _Run:
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    checkpoint = main_checkpoint(spec)
    if spec.weights == "fp8_scaled_mm":
        check_device(device)  # before any model is read
    if spec.cuda_graphs:
        check_cuda_graphs(device)
    # The VRAM budget's plan: it may lower the guidance batch or the decode tiles, and streams big models.
    # A host RAM budget bounds what streaming pins too; without one, streamed blocks are all pinned.
    pin_limit = int(spec.host_ram_budget_gib * 2**30) if spec.host_ram_budget_gib > 0 else None
    planner = Planner.for_job(spec, device, tracker, pin_limit_bytes=pin_limit)
    spec = planner.spec
    ledger = ledger_factory(
        dtype=dtype,
        device=device,
        checkpoint_path=str(checkpoint),
        gemma_root_path=str(spec.models.gemma_root),
        spatial_upsampler_path=str(spec.models.spatial_upsampler) if spec.models.spatial_upsampler else None,
        # fp8_scaled_mm builds the fp8-cast weights and swaps the Linears after (generator/ltx2/scaled_mm.py).
        quantization=QuantizationPolicy.fp8_cast() if spec.weights != "bf16" else None,
        # The owner's LoRAs: every transformer this ledger builds fuses them (docs/DESIGN.md, 'Modes').
        **({"loras": user_loras(spec)} if spec.loras else {}),
        store=weight_store_for(spec),
    )
    tracker.loads = ledger.store.counter
    ledger = planner.ledger(ledger)
    run = _Run(
        spec=spec, device=device, dtype=dtype, tracker=tracker, emit=emit, ledger=ledger,
        generator=torch.Generator(device=device).manual_seed(spec.request.seed),
        components=PipelineComponents(dtype=dtype, device=device),
        params=detect_params(str(checkpoint)),
    )
    if spec.preview_every_seconds > 0:
        from generator.preview import Previewer

        run.step_observers.append(Previewer(run))
    return run


def encode_inputs(
    run: _Run, chosen: tuple[list[Any], Callable[..., list[Any]]] | None = None
) -> tuple[list[Any], list[Any]]:
    """Prompts (from the embedding cache when it has them), then image encode: sets ``run.contexts``;
    returns the two stages' image conditionings. ``chosen``: the conditioning images and their helper
    when the mode picks them itself (extend: the clip's last frames), else the job's images."""
    spec, req, tracker, ledger = run.spec, run.spec.request, run.tracker, run.ledger
    device, dtype = run.device, run.dtype
    images, condition = conditioning_images(spec) if chosen is None else chosen
    width_1, height_1 = run.stage_1_size()
    encode_prompts(run)

    with tracker.phase("image_encode"):
        encoder = tracker.watch(ledger.video_encoder(), "video encoder")
        cond_1 = condition(images, height_1, width_1, encoder, dtype, device)
        cond_2 = condition(images, req.height, req.width, encoder, dtype, device) if run.two_stages else []
        del encoder
    return cond_1, cond_2


def encode_prompts(run: _Run) -> None:
    """The prompt (and, guided, the negative prompt) into ``run.contexts``, from the embedding cache if it has them."""
    spec, req, device, dtype = run.spec, run.spec.request, run.device, run.dtype
    prompts = [req.prompt, req.negative_prompt or DEFAULT_NEGATIVE_PROMPT] if run.guided else [req.prompt]
    checkpoint = main_checkpoint(spec)
    cache = (
        EmbeddingCache(spec.embedding_cache_dir, spec.embedding_cache_bytes)
        if spec.embedding_cache_dir is not None and spec.embedding_cache_bytes > 0 else None
    )
    run.contexts = prompt_contexts(
        prompts, ledger=run.ledger, tracker=run.tracker, device=device, dtype=dtype, progress=run.progress,
        cache=cache, identity=lambda: model_identity(checkpoint, Path(str(spec.models.gemma_root)), dtype, device),
    )


def preparer(spec: JobSpec) -> Callable[[Any], Any]:
    """What a built transformer goes through before it runs: scaled-mm Linears, compiled blocks (both optional)."""
    return functools.partial(
        prepare_transformer, scaled_mm=spec.weights == "fp8_scaled_mm", compile_blocks=spec.compile_blocks,
        cache_dir=spec.compile_cache_dir, cuda_graphs=spec.cuda_graphs,
    )


def stage_1(run: _Run, cond_1: list[Any], *, keep_transformer: bool, **denoise: Any) -> tuple[Any, Any]:
    """Stage 1 (the whole denoise for one_stage): the video and audio states; with
    ``keep_transformer`` the transformer stays in ``run.kept_transformer`` for stage 2.
    ``denoise`` goes to ``_Run.denoise`` (a mode's driver and guiders)."""
    req, tracker, device = run.spec.request, run.tracker, run.device
    width_1, height_1 = run.stage_1_size()
    with tracker.phase("stage_1"):
        keep_until = "stage_2" if keep_transformer else None
        transformer = tracker.watch(preparer(run.spec)(run.ledger.transformer()), "transformer", until=keep_until)
        if run.guided:
            steps = req.steps or run.params.num_inference_steps
            sigmas = LTX2Scheduler().execute(steps=steps).to(dtype=torch.float32, device=device)
        else:
            sigmas = torch.tensor(DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)
        shape_1 = VideoPixelShape(batch=1, frames=req.frames, width=width_1, height=height_1, fps=req.fps)
        video_state, audio_state = run.denoise(
            "generating", transformer, sigmas, shape_1, cond_1,
            guided=run.guided, steps_params=run.params, **denoise,
        )
        for observe in run.step_observers:
            close = getattr(observe, "close", None)
            if close is not None:
                close()  # a preview decoder lives only as long as stage 1
        if keep_transformer:
            run.kept_transformer = transformer
        del transformer
    return video_state, audio_state


def refine(run: _Run, video_state: Any, audio_state: Any, cond_2: list[Any], **denoise: Any) -> tuple[Any, Any]:
    """Upsample stage 1's latent and run stage 2 (with stage 1's transformer when it was kept);
    ``denoise`` goes to ``_Run.denoise``."""
    spec, req, tracker, ledger, device = run.spec, run.spec.request, run.tracker, run.ledger, run.device
    prepare = preparer(spec)
    with tracker.phase("upsample"):
        run.progress("upsampling", 0, 1)
        encoder = tracker.watch(ledger.video_encoder(), "video encoder")
        upsampler = tracker.watch(ledger.spatial_upsampler(), "spatial upsampler")
        upscaled = upsample_video(latent=video_state.latent[:1], video_encoder=encoder, upsampler=upsampler)
        del encoder, upsampler, video_state

    with tracker.phase("stage_2"):
        transformer, run.kept_transformer = run.kept_transformer, None
        if run.kind == "two_stage":
            assert spec.models.distilled_lora is not None
            lora = LoraPathStrengthAndSDOps(str(spec.models.distilled_lora), 1.0, LTXV_LORA_COMFY_RENAMING_MAP)
            if transformer is not None:
                transformer = ledger.transformer_with_loras((lora,), kept=transformer)
            else:
                transformer = tracker.watch(prepare(ledger.transformer_with_loras((lora,))), "transformer + LoRA")
        elif transformer is None:
            transformer = tracker.watch(prepare(ledger.transformer()), "transformer")
        sigmas = torch.tensor(STAGE_2_DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)
        shape_2 = VideoPixelShape(batch=1, frames=req.frames, width=req.width, height=req.height, fps=req.fps)
        video_state, audio_state = run.denoise(
            "refining", transformer, sigmas, shape_2, cond_2, guided=False, steps_params=run.params,
            noise_scale=sigmas[0], initial_video_latent=upscaled, initial_audio_latent=audio_state.latent,
            **denoise,
        )
        del transformer, upscaled
    return video_state, audio_state


Join = Callable[[Iterator[np.ndarray], "tuple[np.ndarray, int] | None"],
               "tuple[Iterator[np.ndarray], tuple[np.ndarray, int] | None]"]


def finish(
    run: _Run, video_state: Any, audio_state: Any, spec: JobSpec | None = None,
    audio_track: tuple[np.ndarray, int] | None = None, *, join: Join | None = None,
) -> DoneEvent:
    """Decode the audio, then stream the tiled video decode into the encoder; ``spec`` (default the
    job's) says the clip's size and where it goes; a given ``audio_track`` (lipsync's: the user's
    own) is the clip's sound instead of the decoded latent. ``join`` (extend) puts the decoded frames
    and audio into a longer clip; it must stay lazy, so the decode still runs as the encoder consumes it."""
    spec = spec or run.spec
    req, tracker, ledger = spec.request, run.tracker, run.ledger
    if req.audio and audio_track is None:
        with tracker.phase("audio_decode"):
            run.progress("decoding audio", 0, 1)
            audio_decoder = tracker.watch(ledger.audio_decoder(), "audio decoder")
            vocoder = tracker.watch(ledger.vocoder(), "vocoder")
            audio = vae_decode_audio(audio_state.latent, audio_decoder, vocoder)
            audio_track = (audio.waveform.float().cpu().numpy(), int(audio.sampling_rate))
            del audio_decoder, vocoder, audio
    del audio_state

    def decoded(latent: torch.Tensor) -> Iterator[np.ndarray]:
        decoder = tracker.watch(ledger.video_decoder(), "video decoder")
        for observe in DECODER_OBSERVERS:
            observe(decoder)
        tiling = TilingConfig(
            spatial_config=SpatialTilingConfig(spec.tiling.spatial_px, spec.tiling.spatial_overlap_px),
            temporal_config=TemporalTilingConfig(spec.tiling.temporal_frames, spec.tiling.temporal_overlap_frames),
        )
        for chunk in vae_decode_video(latent, decoder, tiling, run.generator):
            if chunk.shape[0]:
                yield chunk.cpu().numpy()

    # The decoder is lazy: it is built and runs inside stream_clip, as the encoder consumes it, inside the scope.
    frames = decoded(video_state.latent)
    del video_state
    if join is not None:
        frames, audio_track = join(frames, audio_track)
    done = stream_clip(spec, tracker, frames, run.progress, audio_track)
    log.info("weights read: %.3f GB in %d tensors", ledger.store.bytes_read() / 1e9, len(ledger.store.reads))
    # What this job read, in order: the next standby stages it (generator/ltx2/staging.py).
    ledger.store.finish(run.spec.prepared_dir if run.spec.host_ram_budget_gib > 0 else None)
    return done
