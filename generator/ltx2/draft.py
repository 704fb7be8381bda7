"""Draft and finalize: the two-stage run cut after stage 1, with what stage 2 needs kept on disk.

A draft runs the text encode, the embeddings, the image encode and stage 1, keeps stage 1's
video and audio latents, the prompt embedding stage 2 uses, stage 2's image conditioning and
the torch.Generator's state after stage 1 in ``spec.draft_state``, then decodes stage 1's
half-size latents into a clip of their own. A finalize reads that state back, sets the
generator to it and runs the full run's own ``refine`` and ``finish``: the same tensors into
the same functions with the same random stream, so its clip is the full run's bit for bit
(tests/test_drafts.py; docs/DESIGN.md, 'Drafts and previews').
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from ltx_core.conditioning.types.latent_cond import VideoConditionByLatentIndex

from generator.checks import DraftStateError
from generator.ltx2.pipeline import encode_inputs, finish, refine, stage_1

if TYPE_CHECKING:
    from generator.ltx2.pipeline import _Run
    from generator.protocol import DoneEvent, GenerationRequest

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# What must match between a draft and its finalize for the kept tensors to fit the run.
SHAPE_FIELDS = ("width", "height", "frames", "fps", "pipeline", "audio")


class KeptContext(NamedTuple):
    """The part of the prompt's embeddings that stage 2 reads (it is not guided)."""

    video_encoding: torch.Tensor
    audio_encoding: torch.Tensor | None


@dataclass
class KeptLatent:
    latent: torch.Tensor


def render(run: _Run) -> DoneEvent:
    return draft(run) if run.spec.draft == "draft" else finalize(run)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu").clone()


def draft(run: _Run) -> DoneEvent:
    spec, req = run.spec, run.spec.request
    assert spec.draft_state is not None
    cond_1, cond_2 = encode_inputs(run)
    video_state, audio_state = stage_1(run, cond_1, keep_transformer=False)
    with run.tracker.phase("keep_draft"):
        run.progress("keeping the draft", 0, 1)
        for item in cond_2:
            if not isinstance(item, VideoConditionByLatentIndex):
                raise DraftStateError(f"a draft cannot keep a {type(item).__name__} conditioning")
        context = run.contexts[0]
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "request": req.model_dump(mode="json"),
            "video": _cpu(video_state.latent[:1]),
            "audio": _cpu(audio_state.latent),
            "video_encoding": _cpu(context.video_encoding),
            "audio_encoding": _cpu(context.audio_encoding),
            "conditionings": [
                {"latent": _cpu(item.latent), "strength": float(item.strength), "latent_idx": int(item.latent_idx)}
                for item in cond_2
            ],
            # Stage 2's noise and the decoder's come next from this one shared stream.
            "rng": run.generator.get_state(),
        }
        _save(spec.draft_state, state)
        del state, cond_2, context
    run.contexts = []
    width_1, height_1 = run.stage_1_size()
    half = spec.model_copy(update={"request": req.model_copy(update={"width": width_1, "height": height_1})})
    return finish(run, video_state, audio_state, half)


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-write leaves no half a draft behind


def load_state(path: Path, req: GenerationRequest) -> dict[str, Any]:
    """The kept draft, checked against this job; only tensors and plain values are unpickled."""
    if not path.is_file():
        raise DraftStateError("the draft's kept latents are gone (deleted after their keeping time, or purged)")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DraftStateError(f"the draft's kept latents cannot be read ({type(exc).__name__})") from exc
    if state.get("format") != STATE_FORMAT:
        raise DraftStateError("the draft was kept by another version of the generator")
    kept, wanted = state["request"], req.model_dump(mode="json")
    different = [name for name in SHAPE_FIELDS if kept.get(name) != wanted.get(name)]
    if different:
        raise DraftStateError(f"the kept draft has another {', '.join(different)} than this clip")
    return state


def finalize(run: _Run) -> DoneEvent:
    spec, device = run.spec, run.device
    assert spec.draft_state is not None
    with run.tracker.phase("load_draft"):
        run.progress("reading the draft", 0, 1)
        state = load_state(spec.draft_state, spec.request)

        def on_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        video, audio = on_device(state["video"]), on_device(state["audio"])
        assert video is not None and audio is not None
        video_encoding = on_device(state["video_encoding"])
        assert video_encoding is not None
        run.contexts = [KeptContext(video_encoding, on_device(state["audio_encoding"]))]
        cond_2 = [
            VideoConditionByLatentIndex(latent=item["latent"].to(device), strength=item["strength"],
                                        latent_idx=item["latent_idx"])
            for item in state["conditionings"]
        ]
        run.generator.set_state(state["rng"])
        del state
    video_state, audio_state = refine(run, KeptLatent(video), KeptLatent(audio), cond_2)
    del video, audio, cond_2
    run.contexts = []
    return finish(run, video_state, audio_state)
