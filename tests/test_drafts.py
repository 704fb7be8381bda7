"""Draft and finalize, and live previews, through the real generator on the tiny checkpoints (CPU).

The finalized clip must be the full run's clip bit for bit (frames and audio samples as
decoded from the mp4s), for both two-stage kinds; the draft stops after stage 1 and the
finalize starts after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from generator.protocol import DoneEvent, JobSpec, PhaseEvent, PreviewEvent
from tests.test_generator import make_spec, read_clip, run_generator

# Eight generator processes in the module fixture: on a busy CI core that is minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import av

    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, None
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, audio


def _run(tmp_path: Path, name: str, spec: JobSpec, **change: Any) -> tuple[JobSpec, list[Any]]:
    work = tmp_path / name
    work.mkdir()
    spec = spec.model_copy(update={"output_path": work / "clip.mp4", **change})
    code, events = run_generator(work, spec)
    assert code == 0, events[-1]
    return spec, events


def _phases(events: list[Any]) -> list[str]:
    return [e.name for e in events if isinstance(e, PhaseEvent)]


KINDS = {"two_stage": True, "distilled": False}  # pipeline: audio


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> dict[str, Any]:
    """For each two-stage kind: the full run, its draft, the finalize of that draft; for distilled
    also the finalize of another seed's draft. Each run is its own generator process."""
    tmp_path = tmp_path_factory.mktemp("drafts")
    out: dict[str, Any] = {}
    for pipeline, audio in KINDS.items():
        root = tmp_path / pipeline
        root.mkdir()
        base = make_spec(root, tiny_models, pipeline=pipeline, audio=audio, width=128, height=64, frames=9)
        state = root / "kept" / "draft.pt"
        out[pipeline] = {
            "full": _run(root, "full", base),
            "draft": _run(root, "draft", base, draft="draft", draft_state=state),
            "final": _run(root, "final", base, draft="finalize", draft_state=state),
            "state": state,
        }
        if pipeline == "distilled":
            other_state = root / "other.pt"
            other = base.model_copy(update={"request": base.request.model_copy(update={"seed": 4})})
            _run(root, "other-draft", other, draft="draft", draft_state=other_state)
            out[pipeline]["other"] = _run(root, "other-final", base, draft="finalize", draft_state=other_state)
    return out


@pytest.mark.parametrize("pipeline", list(KINDS))
def test_a_draft_stops_after_stage_1_and_keeps_its_state(clips: dict[str, Any], pipeline: str) -> None:
    audio = KINDS[pipeline]
    draft, events = clips[pipeline]["draft"]
    assert "stage_2" not in _phases(events) and "upsample" not in _phases(events)
    assert {"text_encode", "stage_1", "keep_draft"} <= set(_phases(events))
    clip = read_clip(draft.output_path)
    assert clip["size"] == {(64, 32)} and clip["frames"] == 9 and clip["audio"] == (1 if audio else 0)
    assert clips[pipeline]["state"].is_file()
    done = events[-1]
    assert isinstance(done, DoneEvent) and (done.width, done.height) == (64, 32) and done.leaked_models == []


@pytest.mark.parametrize("pipeline", list(KINDS))
def test_finalize_of_a_draft_is_the_full_clip_bit_for_bit(clips: dict[str, Any], pipeline: str) -> None:
    audio = KINDS[pipeline]
    (full, _), (final, events) = clips[pipeline]["full"], clips[pipeline]["final"]
    phases = _phases(events)
    assert "text_encode" not in phases and "embeddings" not in phases and "stage_1" not in phases
    assert phases[:3] == ["load_draft", "upsample", "stage_2"]
    assert events[-1].leaked_models == []
    (frames, sound), (full_frames, full_sound) = _decoded(final.output_path), _decoded(full.output_path)
    assert frames.shape == full_frames.shape == (9, 64, 128, 3)
    assert np.array_equal(frames, full_frames)
    assert (sound is None) == (not audio) and (sound is None or np.array_equal(sound, full_sound))


def test_a_finalize_from_another_seeds_draft_is_another_clip(clips: dict[str, Any]) -> None:
    (full, _), (other, _) = clips["distilled"]["full"], clips["distilled"]["other"]
    assert not np.array_equal(_decoded(other.output_path)[0], _decoded(full.output_path)[0])


def test_finalize_without_its_draft_fails_clearly(tmp_path: Path, tiny_models: Path) -> None:
    spec = make_spec(tmp_path, tiny_models, pipeline="distilled", audio=False, frames=9)
    spec = spec.model_copy(update={"draft": "finalize", "draft_state": tmp_path / "gone.pt"})
    code, events = run_generator(tmp_path, spec)
    assert code == 2 and events[-1].code == "invalid_spec"
    assert "cannot be finalized" in events[-1].message and "gone" in events[-1].message


def test_previews_during_stage_1_leave_the_clip_unchanged(tmp_path: Path, tiny_models: Path) -> None:
    from PIL import Image

    base = make_spec(tmp_path, tiny_models, pipeline="two_stage", audio=False, width=128, height=64, frames=9,
                     steps=4)
    plain, _ = _run(tmp_path, "plain", base)
    shown, events = _run(tmp_path, "shown", base, preview_every_seconds=0.001, preview_dir=tmp_path / "previews")
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    # Every step of stage 1 but its last (the interval is tiny here), none in stage 2.
    assert [p.step for p in previews] == [1, 2, 3] and {p.stage for p in previews} == {"generating"}
    for preview in previews:
        with Image.open(preview.path) as image:
            assert image.size == (preview.width, preview.height) == (64, 32) and image.mode == "RGB"
    # Each preview comes before the step's progress event and while stage 1 runs.
    names = [e.event if not isinstance(e, PhaseEvent) else f"phase:{e.name}" for e in events]
    assert names.index("preview") < names.index("phase:stage_1")
    assert events[-1].leaked_models == []
    assert np.array_equal(_decoded(shown.output_path)[0], _decoded(plain.output_path)[0])
