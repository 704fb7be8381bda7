"""The LTX-Video family: tiny checkpoints in the official layouts, rendered on CPU by the real
generator subprocess in the family's own interpreter (``.venv-ltxv``)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.db.models import JobStatus
from bot.db.store import JobStore
from bot.worker import Worker
from generator.protocol import DoneEvent, ErrorEvent, JobSpec, PhaseEvent, ProgressEvent, StartedEvent, parse_event
from tests.conftest import ROOT, TINY_TILING, clean_env, image_bytes
from tests.test_generator import read_clip
from tests.test_worker import queue_job

pytestmark = pytest.mark.slow

MULTI_SCALE_PHASES = ["text_encode", "stage_1", "upsample", "stage_2", "video_decode", "finalize"]


def ltxv_spec(tmp_path: Path, files: dict[str, str], **request: Any) -> JobSpec:
    image = tmp_path / "in.png"
    image.write_bytes(image_bytes(size=(200, 120)))
    return JobSpec.model_validate({
        "request": {"prompt": "waves roll in", "family": "ltxv", "width": 160, "height": 96, "frames": 25,
                    "steps": 3, "seed": 3, "pipeline": "distilled", "audio": False} | request,
        "image_path": str(image),
        "output_path": str(tmp_path / "out" / "clip.mp4"),
        "ltxv_models": files,
        "tiling": TINY_TILING,
        "device": "cpu",
    })


def run_ltxv(python: Path, tmp_path: Path, spec: JobSpec | str) -> tuple[int, list[Any], str]:
    path = tmp_path / "spec.json"
    path.write_text(spec if isinstance(spec, str) else spec.model_dump_json())
    proc = subprocess.run([str(python), "-m", "generator", str(path)], capture_output=True, text=True,
                          env=clean_env(), timeout=240, cwd=tmp_path)
    events = [parse_event(line) for line in proc.stdout.splitlines()]  # every stdout line must be an event
    return proc.returncode, events, proc.stderr


@pytest.mark.parametrize(
    ("pipeline", "phases"),
    [
        ("distilled", MULTI_SCALE_PHASES),
        ("two_stage", MULTI_SCALE_PHASES),
        ("one_stage", ["text_encode", "stage_1", "video_decode", "finalize"]),
    ],
)
def test_tiny_ltxv_renders_an_mp4_with_exact_frames_and_size(
    tmp_path: Path, ltxv_python: Path, tiny_ltxv: dict[str, str], pipeline: str, phases: list[str]
) -> None:
    # 160x96: the multi-scale passes render at 96x64 and 192x128, so the resize back and the
    # spatial decode tiles (64 px) are both on the path.
    spec = ltxv_spec(tmp_path, tiny_ltxv, pipeline=pipeline)
    code, events, stderr = run_ltxv(ltxv_python, tmp_path, spec)
    assert code == 0, stderr[-3000:]
    started = events[0]
    assert isinstance(started, StartedEvent) and started.family == "ltxv"
    assert started.libraries["ltx-video"] == "0.1.2"
    assert started.libraries["transformers"].startswith("4.51.")
    assert "ltx-core" not in started.libraries
    assert [e.name for e in events if isinstance(e, PhaseEvent)] == phases
    decoding = [e for e in events if isinstance(e, ProgressEvent) and e.stage == "decoding video"]
    assert decoding[-1].step == decoding[-1].total == 25 and len(decoding) > 2  # streamed, window by window
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.frames == 25 and (done.width, done.height) == (160, 96) and not done.has_audio
    assert done.leaked_models == []
    clip = read_clip(spec.output_path)
    assert clip["frames"] == 25 and clip["size"] == {(160, 96)} and clip["audio"] == 0
    assert clip["codec"] == "h264" and clip["pix_fmt"] == "yuv420p"
    assert not list(spec.output_path.parent.glob(".*partial*"))


def test_the_decode_runs_inside_the_scope_and_the_guard_has_teeth(
    tmp_path: Path, ltxv_python: Path, tiny_ltxv: dict[str, str]
) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(ltxv_spec(tmp_path, tiny_ltxv, frames=33).model_dump_json())

    def records(mode: str) -> list[bool]:
        done = subprocess.run([str(ltxv_python), "tests/support/ltxv_probe.py", "scope", str(spec_path), mode],
                              capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=240, check=True)
        result: list[bool] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    scoped = records("scoped")
    assert len(scoped) >= 4 and not any(scoped)  # several windows and tiles, none with grad
    unscoped = records("unscoped")
    assert unscoped and all(unscoped)


def test_windowed_decode_matches_the_one_shot_decode(ltxv_python: Path, tiny_ltxv: dict[str, str]) -> None:
    done = subprocess.run([str(ltxv_python), "tests/support/ltxv_probe.py", "stream", tiny_ltxv["checkpoint"]],
                          capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=240, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] == [65, 65]  # 9 latent frames: 1 + 8 x 8
    assert result["shape"] == [65, 64, 96, 3]
    assert result["max_diff"] <= 1  # six latent frames of context: the same pixels, window by window
    assert result["narrow_max_diff"] > result["max_diff"]  # and the context is what makes it so


def test_the_generators_loaders_read_what_the_packages_own_loaders_read(
    ltxv_python: Path, tiny_ltxv: dict[str, str]
) -> None:
    done = subprocess.run([str(ltxv_python), "tests/support/ltxv_probe.py", "loaders", tiny_ltxv["checkpoint"]],
                          capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=240, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("transformer", "vae"):
        assert result[name]["tensors"] > 10 and result[name]["same_keys"] and result[name]["equal"], result


@pytest.mark.parametrize(
    ("request_change", "message"),
    [
        ({"width": 150}, "Width must be a multiple of 32 for LTX-Video; got 150, try 128 or 160"),
        ({"frames": 20}, "Frames must be one more than a multiple of 8"),
        ({"audio": True}, "LTX-Video makes silent clips"),
    ],
)
def test_the_models_constraints_are_checked_at_the_boundary(
    tmp_path: Path, ltxv_python: Path, tiny_ltxv: dict[str, str], request_change: dict[str, Any], message: str
) -> None:
    spec = json.loads(ltxv_spec(tmp_path, tiny_ltxv).model_dump_json())
    spec["request"] |= request_change
    code, events, _ = run_ltxv(ltxv_python, tmp_path, json.dumps(spec))
    assert code == 2
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "invalid_spec"
    assert message in events[-1].message


def test_missing_or_misplaced_files_are_named(tmp_path: Path, ltxv_python: Path, tiny_ltxv: dict[str, str]) -> None:
    missing = ltxv_spec(tmp_path, {**tiny_ltxv, "distilled_checkpoint": str(tmp_path / "nope.safetensors")})
    code, events, _ = run_ltxv(ltxv_python, tmp_path, missing)
    assert code == 4 and isinstance(events[-1], ErrorEvent) and events[-1].code == "model_missing"
    assert "ltxv.distilled_checkpoint: nope.safetensors was not found" in events[-1].message

    swapped = ltxv_spec(tmp_path, {**tiny_ltxv, "checkpoint": tiny_ltxv["distilled_checkpoint"]}, pipeline="two_stage")
    code, events, _ = run_ltxv(ltxv_python, tmp_path, swapped)
    assert code == 4 and isinstance(events[-1], ErrorEvent)
    assert "is a distilled checkpoint" in events[-1].message


@pytest.fixture
def both_families(make_settings: Callable[..., Settings], ltxv_python: Path, tiny_ltxv: dict[str, str]) -> Settings:
    return make_settings(ltxv={"enabled": True, "python": str(ltxv_python), **tiny_ltxv})


@pytest.mark.parametrize("standby", [False, True])
async def test_a_job_of_each_family_back_to_back_each_in_its_own_interpreter(
    both_families: Settings, store: JobStore, standby: bool
) -> None:
    ltx2_id = await queue_job(both_families, store, frames=9)
    ltxv_id = await queue_job(both_families, store, frames=17, family="ltxv", pipeline="distilled")
    worker = Worker(both_families, store, standby=standby)
    started: dict[int, StartedEvent] = {}

    async def listen(job: Any, event: Any) -> None:
        if isinstance(event, StartedEvent):
            started[job.id] = event

    worker.listeners.append(listen)
    try:
        await worker.prepare_standby()
        first = await worker.step()
        second = await worker.step()
    finally:
        await worker.close()
    assert first is not None and second is not None
    assert (first.id, second.id) == (ltx2_id, ltxv_id)
    for job in (first, second):
        assert job.status == JobStatus.SUCCEEDED, job.error_message
        assert Path(job.output_path or "").is_file()
    assert started[ltx2_id].family == "ltx2" and "ltx-core" in started[ltx2_id].libraries
    assert started[ltx2_id].libraries["transformers"].startswith("4.57.")
    assert started[ltxv_id].family == "ltxv" and "ltx-video" in started[ltxv_id].libraries
    assert started[ltxv_id].libraries["transformers"].startswith("4.51.")
    assert started[ltx2_id].pid != started[ltxv_id].pid
    ltxv_phases = [p["name"] for p in second.phases or []]
    assert ltxv_phases == MULTI_SCALE_PHASES


async def test_a_job_for_a_family_that_is_not_enabled_fails_clearly(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    settings = make_settings(worker={"unserved_grace_seconds": 0})
    job_id = await queue_job(settings, store, frames=9, family="ltxv", pipeline="distilled")
    await Worker(settings, store).step()
    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.FAILED and job.error_code == "invalid"
    assert "LTX-Video model family is not enabled" in (job.error_message or "")


def test_the_ltxv_benchmark_runs_its_cases_through_the_production_phases(tmp_path: Path, ltxv_python: Path) -> None:
    done = subprocess.run([str(ltxv_python), "-m", "bench.ltxv_vram", "--tiny", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=clean_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["case"]["name"] for r in report["results"]] == ["tiny distilled 160x96x25", "tiny two_stage 128x64x17"]
    for result in report["results"]:
        assert [p["name"] for p in result["phases"]] == MULTI_SCALE_PHASES
        assert result["frames"] == result["case"]["frames"] and result["leaked_models"] == []
        assert set(result["step_seconds"]) == {"generating", "refining"}
    table = (tmp_path / "table.md").read_text()
    assert "| stage_2 |" in table and "peak allocated / reserved" in table


async def test_a_standby_waiting_in_the_other_familys_interpreter_is_replaced(
    both_families: Settings, store: JobStore
) -> None:
    worker = Worker(both_families, store, standby=True)
    started: list[StartedEvent] = []

    async def listen(job: Any, event: Any) -> None:
        if isinstance(event, StartedEvent):
            started.append(event)

    worker.listeners.append(listen)
    try:
        await worker.prepare_standby()  # nothing queued: it waits in the default (LTX-2) interpreter
        waiting = worker._standby
        assert waiting is not None and worker._standby_family == "ltx2"
        job_id = await queue_job(both_families, store, frames=17, family="ltxv", pipeline="distilled")
        job = await worker.step()
    finally:
        await worker.close()
    assert job is not None and job.id == job_id and job.status == JobStatus.SUCCEEDED, job and job.error_message
    assert waiting.returncode is not None  # the LTX-2 standby was stopped, not handed the job
    assert [e.family for e in started] == ["ltxv"] and started[0].pid != waiting.pid
