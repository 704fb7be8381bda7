"""``ltxbot models tiny``: the writer runs in the generator's interpreter, so the bot's stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import clean_env

_IN_PROCESS = (
    "import sys\n"
    "from bot.cli import main\n"
    "code = main(['models', 'tiny', sys.argv[1]])\n"
    "print('torch imported' if 'torch' in sys.modules else 'no torch', code)\n"
)


def test_models_tiny_writes_the_files_without_importing_torch_here(tmp_path: Path) -> None:
    """A fresh interpreter, so no other test's imports can put torch in ``sys.modules`` first."""
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS, "tiny"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "no torch 0"
    printed = yaml.safe_load("\n".join(done.stdout.strip().splitlines()[:-1]))
    assert set(printed["models"]) == {"checkpoint", "distilled_checkpoint", "distilled_lora", "spatial_upsampler",
                                      "gemma_root"}
    for path in printed["models"].values():
        assert Path(path).is_relative_to(tmp_path / "tiny") and Path(path).exists(), path
    assert printed["generator"] == {"device": "cpu", "fp8_cast": False}
