"""``ltxbot animate --draft --preview-dir`` then ``ltxbot finalize``, on the tiny checkpoint (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest

from tests.conftest import image_bytes
from tests.test_animate import ltxbot, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _size(path: Path) -> set[tuple[int, int]]:
    with av.open(str(path)) as container:
        return {(f.width, f.height) for f in container.decode(video=0)}


def test_a_local_draft_with_previews_then_its_finalize(tmp_path: Path, tiny_models: Path) -> None:
    write_config(tmp_path, tiny_models)
    (tmp_path / "photo.png").write_bytes(image_bytes(size=(256, 128)))
    result = ltxbot(tmp_path, "animate", "photo.png", "waves roll in", "--width", "128", "--height", "64",
                    "--draft", "--preview-dir", "shots", "--out", "draft.mp4")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "draft.mp4\n" and "ltxbot finalize 1" in result.stderr
    assert _size(tmp_path / "draft.mp4") == {(64, 32)}
    previews = sorted((tmp_path / "shots").glob("*.png"))
    assert [p.name for p in previews] == ["preview-0001.png"]  # steps 2: a preview after step 1
    detail = json.loads(ltxbot(tmp_path, "job", "1", "--json").stdout)
    assert "stage_2" not in [p["name"] for p in detail["phases"]]

    final = ltxbot(tmp_path, "finalize", "1", "--out", "final.mp4")
    assert final.returncode == 0, final.stderr
    assert _size(tmp_path / "final.mp4") == {(128, 64)}
    names = [p["name"] for p in json.loads(ltxbot(tmp_path, "job", "2", "--json").stdout)["phases"]]
    assert names[:3] == ["load_draft", "upsample", "stage_2"] and "stage_1" not in names

    # Not a draft, or one already gone: a clear sentence, no render.
    assert "not a finished draft" in ltxbot(tmp_path, "finalize", "2").stderr
    (tmp_path / "data" / "jobs" / "1" / "draft.pt").unlink()
    gone = ltxbot(tmp_path, "finalize", "1")
    assert gone.returncode == 2 and "was deleted" in gone.stderr
