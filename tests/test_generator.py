"""The generator on the tiny checkpoint, on CPU: real subprocesses, real mp4s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import pytest

from generator.protocol import DoneEvent, ErrorEvent, JobSpec, PhaseEvent, parse_event
from tests.conftest import TINY_TILING, clean_env, image_bytes, tiny_model_settings

pytestmark = pytest.mark.slow


def make_spec(tmp_path: Path, tiny_models: Path, **request: Any) -> JobSpec:
    image = tmp_path / "in.png"
    image.write_bytes(image_bytes(size=(128, 128)))
    extra = {k: request.pop(k) for k in ("max_bytes", "crf", "models", "fp8_cast", "end_image_path") if k in request}
    return JobSpec.model_validate({
        "request": {"prompt": "waves roll in", "width": 128, "height": 128, "frames": 17, "steps": 2,
                    "seed": 3, "pipeline": "two_stage", "audio": True} | request,
        "image_path": str(image),
        "output_path": str(tmp_path / "out" / "clip.mp4"),
        "models": extra.pop("models", tiny_model_settings(tiny_models)),
        "tiling": TINY_TILING,
        "device": "cpu",
        "fp8_cast": extra.pop("fp8_cast", False),
        **extra,
    })


def run_generator(tmp_path: Path, spec: JobSpec | str, env: dict[str, str] | None = None) -> tuple[int, list[Any]]:
    path = tmp_path / "spec.json"
    path.write_text(spec if isinstance(spec, str) else spec.model_dump_json())
    proc = subprocess.run([sys.executable, "-m", "generator", str(path)], capture_output=True, text=True,
                          env=(env or clean_env()), timeout=240)
    events = [parse_event(line) for line in proc.stdout.splitlines()]  # every stdout line must be an event
    return proc.returncode, events


def read_clip(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = [f for f in container.decode(video=0)]
        return {
            "frames": len(frames),
            "size": {(f.width, f.height) for f in frames},
            "fps": float(video.average_rate),
            "audio": len(container.streams.audio),
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
        }


EXPECTED_PHASES = {
    "two_stage": ["text_encode", "embeddings", "image_encode", "stage_1", "upsample", "stage_2", "audio_decode",
                  "video_decode", "finalize"],
    "distilled": ["text_encode", "embeddings", "image_encode", "stage_1", "upsample", "stage_2", "video_decode",
                  "finalize"],
    "one_stage": ["text_encode", "embeddings", "image_encode", "stage_1", "audio_decode", "video_decode",
                  "finalize"],
    "two_stage_hq": ["text_encode", "embeddings", "image_encode", "stage_1", "upsample", "stage_2", "audio_decode",
                     "video_decode", "finalize"],
}


@pytest.mark.parametrize(("pipeline", "audio", "width", "height", "fp8"), [
    ("two_stage", True, 128, 128, False),
    ("distilled", False, 128, 192, True),
    ("one_stage", True, 96, 64, False),
    ("two_stage_hq", True, 128, 64, False),
])
def test_each_pipeline_renders_exact_frames_size_and_audio(
    tmp_path: Path, tiny_models: Path, pipeline: str, audio: bool, width: int, height: int, fp8: bool
) -> None:
    spec = make_spec(tmp_path, tiny_models, pipeline=pipeline, audio=audio, width=width, height=height, fp8_cast=fp8)
    code, events = run_generator(tmp_path, spec)
    assert code == 0, events
    assert events[0].event == "started" and isinstance(events[-1], DoneEvent)
    clip = read_clip(spec.output_path)
    assert clip["frames"] == 17
    assert clip["size"] == {(width, height)}
    assert clip["fps"] == 24.0
    assert clip["audio"] == (1 if audio else 0)
    assert (clip["codec"], clip["pix_fmt"]) == ("h264", "yuv420p")
    phases = [e for e in events if isinstance(e, PhaseEvent)]
    assert [p.name for p in phases] == EXPECTED_PHASES[pipeline]
    assert all(p.seconds >= 0 and p.peak_rss_gib > 0 for p in phases)
    done = events[-1]
    assert [p.name for p in done.phases] == EXPECTED_PHASES[pipeline]
    assert done.leaked_models == []
    assert done.frames == 17 and done.bytes == spec.output_path.stat().st_size
    with spec.output_path.open("rb") as handle:  # +faststart: the index comes before the media data
        head = handle.read(4096)
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_malformed_spec_exits_2_with_invalid_spec(tmp_path: Path) -> None:
    code, events = run_generator(tmp_path, json.dumps({"request": {"prompt": "x", "frames": 100}}))
    assert code == 2
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "invalid_spec"


def test_missing_checkpoint_exits_4_naming_the_file_and_key(tmp_path: Path, tiny_models: Path) -> None:
    models = tiny_model_settings(tiny_models) | {"checkpoint": str(tmp_path / "ltx-2.3-22b-dev.safetensors")}
    code, events = run_generator(tmp_path, make_spec(tmp_path, tiny_models, models=models))
    assert code == 4
    assert events[-1].code == "model_missing"
    assert "models.checkpoint" in events[-1].message and "ltx-2.3-22b-dev.safetensors" in events[-1].message


def test_wrong_file_as_checkpoint_is_model_missing(tmp_path: Path, tiny_models: Path) -> None:
    models = tiny_model_settings(tiny_models)
    models["checkpoint"] = models["spatial_upsampler"]  # a real safetensors file, but not a checkpoint
    code, events = run_generator(tmp_path, make_spec(tmp_path, tiny_models, models=models))
    assert code == 4 and "not an LTX-2" in events[-1].message


def test_injected_oom_exits_3(tmp_path: Path, tiny_models: Path) -> None:
    env = clean_env() | {"LTXBOT_FAULT": "oom@stage_1"}
    code, events = run_generator(tmp_path, make_spec(tmp_path, tiny_models, audio=False), env)
    assert code == 3
    assert events[-1].code == "oom" and "fewer frames" in events[-1].message


def test_abrupt_crash_mid_decode_leaves_no_clip(tmp_path: Path, tiny_models: Path) -> None:
    spec = make_spec(tmp_path, tiny_models, audio=False, frames=33)
    env = clean_env() | {"LTXBOT_FAULT": "kill@video_decode"}
    code, events = run_generator(tmp_path, spec, env)
    assert code == -9
    assert not any(isinstance(e, DoneEvent) for e in events)
    assert any(e.event == "progress" and e.stage == "decoding video" and e.step > 0 for e in events)
    assert not spec.output_path.exists()


def test_clip_over_max_bytes_is_reencoded_under_it(tmp_path: Path, tiny_models: Path) -> None:
    big = make_spec(tmp_path, tiny_models, audio=True, frames=33, crf=0)
    code, events = run_generator(tmp_path, big)
    assert code == 0
    full_size = big.output_path.stat().st_size
    limit = full_size // 2
    small = make_spec(tmp_path, tiny_models, audio=True, frames=33, crf=0, max_bytes=limit)
    code, events = run_generator(tmp_path, small)
    assert code == 0, events
    assert events[-1].reencoded is True
    assert small.output_path.stat().st_size <= limit
    clip = read_clip(small.output_path)
    assert clip["frames"] == 33 and clip["audio"] == 1


def test_clip_that_cannot_fit_fails_clearly(tmp_path: Path, tiny_models: Path) -> None:
    spec = make_spec(tmp_path, tiny_models, audio=False, crf=0, max_bytes=4096, width=256, height=256, frames=33)
    code, events = run_generator(tmp_path, spec)
    assert code == 5 and events[-1].code == "too_large" and "fewer frames" in events[-1].message
    assert not spec.output_path.exists()
    assert not list(spec.output_path.parent.glob("*.mp4"))


def test_generator_stdout_is_only_events_even_with_library_prints(tmp_path: Path, tiny_models: Path) -> None:
    # tqdm and ltx-pipelines print progress; all of it must land on stderr.
    code, events = run_generator(tmp_path, make_spec(tmp_path, tiny_models, audio=False, frames=9))
    assert code == 0 and all(e.event in {"started", "phase", "progress", "done"} for e in events)
    assert (tmp_path / "out" / "clip.mp4").stat().st_size > 0


def test_default_steps_follow_the_checkpoints_version(tmp_path: Path, tiny_models: Path) -> None:
    """ltx-pipelines reads `model_version` from the checkpoint: 2.3 schedules 30 steps, 2.0 40."""
    totals = {}
    for version in ("2.3.0", "2.0.0"):
        work = tmp_path / version
        work.mkdir()
        checkpoint = work / "ltx-tiny-dev.safetensors"
        subprocess.run(
            [sys.executable, "-c", "import sys\nfrom safetensors import safe_open\n"
             "from safetensors.torch import save_file\nwith safe_open(sys.argv[1], 'pt') as f:\n"
             "    meta = f.metadata() | {'model_version': sys.argv[3]}\n"
             "    save_file({k: f.get_tensor(k) for k in f.keys()}, sys.argv[2], metadata=meta)",
             str(tiny_models / "ltx-2.3-tiny-dev.safetensors"), str(checkpoint), version],
            check=True, env=clean_env(), timeout=120,
        )
        models = tiny_model_settings(tiny_models) | {"checkpoint": str(checkpoint)}
        spec = make_spec(work, tiny_models, pipeline="one_stage", steps=None, width=96, height=64, frames=9,
                         models=models)
        (work / "spec.json").write_text(spec.model_dump_json())
        with subprocess.Popen([sys.executable, "-m", "generator", str(work / "spec.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean_env()) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # the first step of stage 1 announces the schedule's length
                event = parse_event(line)
                if event.event == "progress" and event.stage == "generating":
                    totals[version] = event.total
                    break
            proc.kill()
    assert totals == {"2.3.0": 30, "2.0.0": 40}
