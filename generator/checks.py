"""Cheap checks of the model files before any heavy import or load.

Reads safetensors headers directly (8-byte length + JSON), so a missing or wrong
file is reported in milliseconds, naming the file and its config key.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from generator.protocol import JobSpec, ModelFiles


class ModelFilesError(Exception):
    """A model file is missing or is not what its config key says."""


def safetensors_metadata(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise ValueError("header too large")
        header = json.loads(handle.read(length))
    meta: dict[str, Any] = header.get("__metadata__") or {}
    return meta


def required_files(spec: JobSpec) -> list[str]:
    kind = spec.request.pipeline
    if kind == "two_stage":
        return ["checkpoint", "distilled_lora", "spatial_upsampler", "gemma_root"]
    if kind == "distilled":
        return ["distilled_checkpoint", "spatial_upsampler", "gemma_root"]
    return ["checkpoint", "gemma_root"]


def main_checkpoint(spec: JobSpec) -> Path:
    path = spec.models.distilled_checkpoint if spec.request.pipeline == "distilled" else spec.models.checkpoint
    assert path is not None
    return path


def check_model_files(spec: JobSpec) -> None:
    """Raise ModelFilesError for the first missing or wrong file of this job's pipeline."""
    models: ModelFiles = spec.models
    for key in required_files(spec):
        path: Path | None = getattr(models, key)
        if path is None:
            raise ModelFilesError(f"models.{key} is not set; the {spec.request.pipeline} pipeline needs it.")
        if key == "gemma_root":
            _check_gemma_root(path)
            continue
        if not path.is_file():
            raise ModelFilesError(f"models.{key}: {path.name} was not found.")
        try:
            meta = safetensors_metadata(path)
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"models.{key}: {path.name} is not a readable safetensors file ({exc}).") from None
        if key in {"checkpoint", "distilled_checkpoint", "spatial_upsampler"} and "config" not in meta:
            raise ModelFilesError(
                f"models.{key}: {path.name} has no 'config' metadata; use the official LTX-2 file, "
                "not a converted one."
            )
        if key in {"checkpoint", "distilled_checkpoint"}:
            config = json.loads(meta["config"])
            if "transformer" not in config or "vae" not in config:
                raise ModelFilesError(f"models.{key}: {path.name} is not an LTX-2 audio-video checkpoint.")


def _check_gemma_root(root: Path) -> None:
    if not root.is_dir():
        raise ModelFilesError(f"models.gemma_root: folder {root.name} was not found.")
    for pattern in ("tokenizer.model", "preprocessor_config.json", "model*.safetensors"):
        if next(root.rglob(pattern), None) is None:
            raise ModelFilesError(f"models.gemma_root: {pattern} was not found in {root.name}.")
