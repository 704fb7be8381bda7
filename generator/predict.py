"""Each phase's GPU memory peak for a request, predicted without torch (the bot imports this).

The model is the one the generator's planner uses (``generator/ltx2/plan.py``), so the
prediction and the plan cannot drift: a phase's peak allocated memory is its fixed part
(weights that never stream, constant activations), the weights of the blocks it keeps
resident, and activations linear in the phase's token count. Under a budget a phase keeps
as many blocks resident as fit beside its activations and its streaming slots; the rest
stream. The coefficients are fitted to the benchmark's own measurements by
``bench/fit_predict.py`` and stored as data (``generator/predict_coefficients.json``);
docs/DESIGN.md, 'VRAM budget and streaming'.

A whole-process figure adds the CUDA context and the allocator's reserve over its
allocations (``process_overhead_gib``), which is what a card's owner sees in nvidia-smi
and what a budget bounds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

COEFFICIENTS = Path(__file__).with_name("predict_coefficients.json")
PHASES = ("text_encode", "embeddings", "image_encode", "stage_1", "upsample", "stage_2", "audio_decode",
          "video_decode", "finalize")
GIB = 2**30


@dataclass(frozen=True)
class PhaseModel:
    """One phase's memory: ``fixed_gib + resident blocks x block_gib + per_token_gib x tokens``."""

    fixed_gib: float
    per_token_gib: float = 0.0
    basis: str = "none"  # what "tokens" counts: none, stage_1, stage_2, pixels, frames
    block_gib: float = 0.0
    blocks: int = 0
    slots: int = 2
    other_gib: float = 0.0  # weights in fixed_gib that never stream (the planner measures its model's own)
    # Extra activations per extra guidance pass batched into one forward, as a share of the per-token part.
    batch_share: float = 0.0


@dataclass(frozen=True)
class PhasePlan:
    resident: int
    streamed: int
    peak_gib: float  # predicted peak allocated
    slots: int = 2  # device slots the streamed blocks pass through (1: no prefetch, least memory)


def tokens(basis: str, pipeline: str, width: int, height: int, frames: int) -> float:
    latent_frames = (frames - 1) // 8 + 1
    half = pipeline != "one_stage"
    if basis == "stage_1":
        scale = 64 if half else 32
        return (width / scale) * (height / scale) * latent_frames
    if basis == "stage_2":
        return (width / 32) * (height / 32) * latent_frames
    if basis == "pixels":
        return width * height / 1e6
    if basis == "frames":
        return float(frames)
    return 0.0


# A streamed plan fills the budget to within a block, so what the fit does not see must fit in
# what it leaves: cuDNN and cuBLAS workspaces, allocator rounding. Measured on the H200
# (bench/results/h200-vram-budget-2): transients 0.1-0.3 GiB over the predicted peak ran out
# of memory (2048x1536x97 at 16 GiB, the 8 GiB embeddings), and an upsample planned to 0.04 GiB
# under the cap gave other stage-2 bits than the unconstrained run, most likely cuDNN falling
# back to a convolution algorithm with a smaller workspace.
STREAM_HEADROOM_GIB = 0.5


def stream_headroom_gib(budget_gib: float) -> float:
    """GiB a streamed plan leaves free under ``budget_gib`` (a tenth of small budgets: the tests' tiny ones)."""
    return min(STREAM_HEADROOM_GIB, budget_gib / 10)


def plan_phase(model: PhaseModel, activation_gib: float, budget_gib: float | None) -> PhasePlan:
    """How many blocks stay resident under ``budget_gib`` (allocator GiB), and the peak that gives.

    With no budget, or one that holds everything, every block is resident. Otherwise the
    blocks that fit beside the fixed part, the activations and the streaming slots stay;
    at least none, so a budget below the streaming floor gives the floor (and will not fit).
    """
    full = model.fixed_gib + model.blocks * model.block_gib + activation_gib
    if budget_gib is None or model.blocks == 0 or full <= budget_gib:
        return PhasePlan(model.blocks, 0, full)
    budget_gib -= stream_headroom_gib(budget_gib)
    # Two slots let the next block's copy overlap this one's compute; a budget below that floor
    # gets one slot (each copy then waits for the block before it).
    slots = min(model.slots, model.blocks)
    room = budget_gib - model.fixed_gib - activation_gib - slots * model.block_gib
    if room < 0:
        slots = 1
        room = budget_gib - model.fixed_gib - activation_gib - model.block_gib
    resident = max(0, min(model.blocks - slots, math.floor(room / model.block_gib + 1e-9)))
    streamed = model.blocks - resident
    return PhasePlan(resident, streamed, model.fixed_gib + activation_gib + (resident + slots) * model.block_gib,
                     slots)


@dataclass(frozen=True)
class Prediction:
    phases: dict[str, float]  # predicted peak allocated GiB per phase
    plans: dict[str, PhasePlan]
    process_overhead_gib: float

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values())

    @property
    def process_peak_gib(self) -> float:
        return self.peak_gib + self.process_overhead_gib

    def fits(self, budget_gib: float | None) -> bool:
        return budget_gib is None or self.process_peak_gib <= budget_gib


@cache
def _load(path: Path = COEFFICIENTS) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def phase_models(family: str, data: dict[str, Any] | None = None) -> dict[str, PhaseModel] | None:
    table = (data or _load()).get("families", {}).get(family)
    if table is None:
        return None
    return {name: PhaseModel(**values) for name, values in table["phases"].items()}


def allocator_budget(budget_gib: float | None, data: dict[str, Any] | None = None) -> float | None:
    """The whole-process budget less the CUDA context and the allocator's reserve: what allocations may use."""
    if budget_gib is None:
        return None
    return budget_gib - float((data or _load())["process_overhead_gib"])


def predict(
    family: str, pipeline: str, width: int, height: int, frames: int, audio: bool, budget_gib: float | None,
    *, guidance_batch: int = 1, data: dict[str, Any] | None = None,
) -> Prediction | None:
    """Each phase's predicted peak (allocated GiB) for the request, or None for a family with no fitted model."""
    data = data or _load()
    models = phase_models(family, data)
    if models is None:
        return None
    limit = allocator_budget(budget_gib, data)
    present = [name for name in PHASES if name in models
               and not (name in ("upsample", "stage_2") and pipeline == "one_stage")
               and not (name == "audio_decode" and not audio)]
    activation = {name: activation_gib(models[name], name, pipeline, width, height, frames, guidance_batch)
                  for name in present}
    # One transformer serves stage 1, is kept through the upsample and serves stage 2: one plan
    # for all three, made for the largest of their needs (as the planner makes it).
    group = [name for name in present if name in TRANSFORMER_PHASES]
    shared: PhasePlan | None = None
    if group:
        first = models[group[0]]
        need = max(models[n].fixed_gib - first.other_gib + activation[n] for n in group)
        shared = plan_phase(PhaseModel(fixed_gib=first.other_gib, block_gib=first.block_gib, blocks=first.blocks,
                                       slots=first.slots), need, limit)
    phases: dict[str, float] = {}
    plans: dict[str, PhasePlan] = {}
    for name in present:
        model = models[name]
        if shared is not None and name in group:
            on_device = shared.resident + (shared.slots if shared.streamed else 0)
            plan = PhasePlan(shared.resident, shared.streamed,
                             model.fixed_gib + activation[name] + on_device * model.block_gib, shared.slots)
        else:
            plan = plan_phase(model, activation[name], limit)
        phases[name] = round(plan.peak_gib, 4)
        plans[name] = plan
    return Prediction(phases, plans, float(data["process_overhead_gib"]))


# Phases that hold the (one, kept) transformer; the upsample holds it between the stages.
TRANSFORMER_PHASES = ("stage_1", "upsample", "stage_2")


def activation_gib(model: PhaseModel, name: str, pipeline: str, width: int, height: int, frames: int,
                   guidance_batch: int = 1) -> float:
    """The phase's activations that grow with its tokens (the guided stage 1 also with its batch)."""
    per_token = model.per_token_gib
    if name == "stage_1" and pipeline != "distilled":
        per_token *= 1 + model.batch_share * (guidance_batch - 1)
    return per_token * tokens(model.basis, pipeline, width, height, frames)


# Sizes tried when a request does not fit, largest first (landscape 4:3 and 16:9 and their portraits).
_SHAPES = ((4, 3), (16, 9), (1, 1), (3, 4), (9, 16))


def largest_fit(
    family: str, pipeline: str, width: int, height: int, frames: int, audio: bool, budget_gib: float,
    *, multiple: int = 64, guidance_batch: int = 1, data: dict[str, Any] | None = None,
) -> tuple[int, int, int] | None:
    """The largest (width, height, frames) that fits: first the asked size with fewer frames, then the asked
    frames (or fewer) at a smaller size of the same aspect. None when even the smallest does not fit."""

    def fits(w: int, h: int, f: int) -> bool:
        found = predict(family, pipeline, w, h, f, audio, budget_gib, guidance_batch=guidance_batch, data=data)
        return found is None or found.fits(budget_gib)

    for f in range(frames, 8, -8):
        if fits(width, height, f):
            return width, height, f
    scale = 1.0
    while True:
        scale *= 0.9
        w = max(multiple, int(width * scale) // multiple * multiple)
        h = max(multiple, int(height * scale) // multiple * multiple)
        if fits(w, h, frames):
            return w, h, frames
        if w == multiple and h == multiple:
            break
    for f in range(frames, 8, -8):
        if fits(multiple, multiple, f):
            return multiple, multiple, f
    return None


def least_vram_gib(
    family: str, pipeline: str, width: int, height: int, frames: int, audio: bool, *, guidance_batch: int = 1,
) -> float | None:
    """The smallest whole-process budget the request can run in, everything that can stream streamed.

    Stored with the job: a worker whose budget is below it passes the job by (bot/db/claims.py).
    """
    found = predict(family, pipeline, width, height, frames, audio, 0.01, guidance_batch=guidance_batch)
    return None if found is None else round(found.process_peak_gib, 3)
