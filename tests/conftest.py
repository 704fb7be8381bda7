"""Shared fixtures: settings on a temporary data dir, a migrated store, tiny models, images.

The store is SQLite unless a module asks for more: overriding ``db_backend`` with
``params=["sqlite", "postgresql"]`` runs each of its tests on both databases.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.config import Settings, load_settings
from bot.db.migrate import upgrade
from bot.db.store import JobStore
from tests.support.postgres import pg_url, postgres_server  # noqa: F401  (fixtures for every module)

ROOT = Path(__file__).resolve().parents[1]
_TINY_SCRIPT = "from pathlib import Path; import sys; from generator.ltx2.tiny import write_tiny_models; " \
               "write_tiny_models(Path(sys.argv[1]))"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint set, written once per run (in a subprocess: keeps torch out of the test process)."""
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-c", _TINY_SCRIPT, str(root)], check=True, capture_output=True)
    return root


# Built by `make test` (the Makefile's ltxv target): the LTX-Video family's own interpreter.
LTXV_PYTHON = ROOT / ".venv-ltxv" / "bin" / "python"


@pytest.fixture(scope="session")
def ltxv_python() -> Path:
    if not LTXV_PYTHON.exists():
        pytest.fail(f"no LTX-Video interpreter at {LTXV_PYTHON}: run `make test` (or `make ltxv`) to build it")
    return LTXV_PYTHON


@pytest.fixture(scope="session")
def tiny_ltxv(tmp_path_factory: pytest.TempPathFactory, ltxv_python: Path) -> dict[str, str]:
    """Tiny LTX-Video files, written by the LTX-Video interpreter with that package's own classes."""
    root = tmp_path_factory.mktemp("tiny-ltxv")
    done = subprocess.run([str(ltxv_python), "-m", "generator.ltxv.tiny", str(root)], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    files: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return files


def tiny_model_settings(root: Path) -> dict[str, Any]:
    return {
        "checkpoint": str(root / "ltx-2.3-tiny-dev.safetensors"),
        "distilled_checkpoint": str(root / "ltx-2.3-tiny-dev.safetensors"),
        "distilled_lora": str(root / "ltx-2.3-tiny-distilled-lora.safetensors"),
        "spatial_upsampler": str(root / "ltx-2.3-tiny-spatial-upscaler-x2.safetensors"),
        "gemma_root": str(root / "gemma"),
    }


TINY_TILING = {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16, "temporal_overlap_frames": 8}


@pytest.fixture
def make_settings(tmp_path: Path, tiny_models: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "models": tiny_model_settings(tiny_models),
            "vae_tiling": TINY_TILING,
            "generation": {"frames": 9, "pipeline": "two_stage", "steps": 2, "audio": False},
            "generator": {"device": "cpu", "fp8_cast": False, "kill_grace_seconds": 2, "timeout_base_seconds": 120},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return load_settings(None, **base)

    return factory


@pytest.fixture
def db_backend() -> str:
    return "sqlite"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, db_backend: str, tmp_path: Path) -> str:
    """An empty database of the requested backend: a SQLite file, or a fresh PostgreSQL database."""
    if db_backend == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[JobStore]:
    job_store = JobStore.from_url(db_url)
    await upgrade(job_store.engine)
    yield job_store
    await job_store.close()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (320, 240), mode: str = "RGB", **save: Any) -> bytes:
    """An asymmetric gradient, so orientation mistakes show in the pixels."""
    w, h = size
    image = Image.new("RGB", size)
    image.putdata([(x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), 64) for y in range(h) for x in range(w)])
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LTXBOT_", "DISCORD_"))}
    return env


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; its last line of output."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]
