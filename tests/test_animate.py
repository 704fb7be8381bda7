"""``ltxbot animate`` end to end: intake, store, worker, real generator, on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.conftest import TINY_TILING, clean_env, image_bytes, tiny_model_settings

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, tiny_models: Path) -> None:
    models = "\n".join(f"  {k}: {v}" for k, v in tiny_model_settings(tiny_models).items())
    tiling = "\n".join(f"  {k}: {v}" for k, v in TINY_TILING.items())
    (tmp_path / "config.yaml").write_text(
        f"data_dir: data\nmodels:\n{models}\nvae_tiling:\n{tiling}\n"
        "generation:\n  frames: 9\n  steps: 2\n  audio: false\n"
        "generator:\n  device: cpu\n  fp8_cast: false\n"
    )


def ltxbot(tmp_path: Path, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in clean_env().items() if k not in {"FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"}}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)


def test_animate_writes_a_valid_clip_and_records_the_job(tmp_path: Path, tiny_models: Path) -> None:
    write_config(tmp_path, tiny_models)
    (tmp_path / "photo.jpg").write_bytes(image_bytes("JPEG", (400, 300)))
    result = ltxbot(tmp_path, "animate", "photo.jpg", "waves roll in", "--width", "128", "--height", "128",
                    "--out", "clip.mp4", columns=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "clip.mp4\n"  # stdout is for scripts: the clip's path and nothing else
    # Over a pipe: no escape codes, no redraws (text mode reads a "\r" redraw as a new line), and
    # everything fits the width it was given.
    assert "\x1b" not in result.stderr
    assert all(len(line) <= 60 for line in result.stderr.splitlines()), result.stderr
    refining = [line for line in result.stderr.splitlines() if "refining" in line]
    assert len(refining) == 1 and "3/3" in refining[0] and "elapsed" in refining[0] and "left" in refining[0]
    table = result.stderr[result.stderr.index("peak GiB"):]  # the per-phase table
    assert all(name in table for name in ("text_encode", "stage_1", "stage_2", "video_decode", "finalize"))
    with av.open(str(tmp_path / "clip.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and {(f.width, f.height) for f in frames} == {(128, 128)}
    listing = ltxbot(tmp_path, "jobs")
    assert "succeeded" in listing.stdout and "local" in listing.stdout
    detail = json.loads(ltxbot(tmp_path, "job", "1", "--json").stdout)
    assert detail["status"] == "succeeded" and "video_decode" in [p["name"] for p in detail["phases"]]


def test_animate_with_a_hostile_image_prints_the_intake_error(tmp_path: Path, tiny_models: Path) -> None:
    write_config(tmp_path, tiny_models)
    (tmp_path / "evil.png").write_bytes(image_bytes("GIF"))
    result = ltxbot(tmp_path, "animate", "evil.png", "waves")
    assert result.returncode == 2
    assert "GIF" in result.stderr and "unsupported_type" in result.stderr and "Traceback" not in result.stderr
