"""Cheap checks of the model files before any heavy import or load.

Reads safetensors headers directly (8-byte length + JSON), so a missing or wrong
file is reported in milliseconds, naming the file and its config key.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from generator.protocol import JobSpec, LtxvModelFiles, ModelFiles


class ModelFilesError(Exception):
    """A model file is missing or is not what its config key says."""


class UnsupportedOnDeviceError(Exception):
    """A setting this device cannot run (fp8 matmul without fp8 tensor cores); the message names it."""


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
    if spec.family == "ltxv":
        main = "distilled_checkpoint" if kind == "distilled" else "checkpoint"
        upsampler = [] if kind == "one_stage" else ["spatial_upsampler"]
        return [main, *upsampler, "text_encoder_root"]
    if kind in {"two_stage", "two_stage_hq"}:
        return ["checkpoint", "distilled_lora", "spatial_upsampler", "gemma_root"]
    if kind == "distilled":
        return ["distilled_checkpoint", "spatial_upsampler", "gemma_root"]
    return ["checkpoint", "gemma_root"]


def main_checkpoint(spec: JobSpec) -> Path:
    models = spec.ltxv_models if spec.family == "ltxv" else spec.models
    path = models.distilled_checkpoint if spec.request.pipeline == "distilled" else models.checkpoint
    assert path is not None
    return path


def check_model_files(spec: JobSpec) -> None:
    """Raise ModelFilesError for the first missing or wrong file of this job's pipeline."""
    ltxv = spec.family == "ltxv"
    models: ModelFiles | LtxvModelFiles = spec.ltxv_models if ltxv else spec.models
    section, family = ("ltxv", "LTX-Video") if ltxv else ("models", "LTX-2")
    pipeline = f"LTX-Video {spec.request.pipeline}" if ltxv else spec.request.pipeline
    for key in required_files(spec):
        path: Path | None = getattr(models, key)
        if path is None:
            raise ModelFilesError(f"{section}.{key} is not set; the {pipeline} pipeline needs it.")
        if key in {"gemma_root", "text_encoder_root"}:
            (_check_t5_root if ltxv else _check_gemma_root)(path)
            continue
        if not path.is_file():
            raise ModelFilesError(f"{section}.{key}: {path.name} was not found.")
        try:
            meta = safetensors_metadata(path)
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"{section}.{key}: {path.name} is not a readable safetensors file ({exc}).") from None
        if key in {"checkpoint", "distilled_checkpoint", "spatial_upsampler"} and "config" not in meta:
            raise ModelFilesError(
                f"{section}.{key}: {path.name} has no 'config' metadata; use the official {family} file, "
                "not a converted one."
            )
        if key in {"checkpoint", "distilled_checkpoint"}:
            _check_checkpoint_config(f"{section}.{key}", path, json.loads(meta["config"]), ltxv)
    for lora in spec.loras:
        # The bot checked these when the job came in; the file may have gone since.
        if not lora.path.is_file():
            raise ModelFilesError(f"loras.{lora.name}.file: {lora.path.name} was not found.")
        try:
            safetensors_metadata(lora.path)
        except (OSError, ValueError) as exc:
            raise ModelFilesError(
                f"loras.{lora.name}.file: {lora.path.name} is not a readable safetensors file ({exc})."
            ) from None


def checkpoint_version(path: Path) -> str | None:
    """An LTX-2 checkpoint's ``model_version`` metadata (``2.3.0``), or None when it has none or is unreadable."""
    try:
        version = safetensors_metadata(path).get("model_version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, str) and version else None


def _check_checkpoint_config(key: str, path: Path, config: dict[str, Any], ltxv: bool) -> None:
    if not ltxv and ("transformer" not in config or "vae" not in config):
        raise ModelFilesError(f"{key}: {path.name} is not an LTX-2 audio-video checkpoint.")
    if ltxv and (not {"transformer", "vae"} <= config.keys() or "audio_vae" in config):
        raise ModelFilesError(f"{key}: {path.name} is not an LTX-Video 0.9.x checkpoint.")
    if ltxv and key == "ltxv.checkpoint" and config.get("allowed_inference_steps"):
        raise ModelFilesError(
            f"ltxv.checkpoint: {path.name} is a distilled checkpoint; set it as ltxv.distilled_checkpoint "
            "and use the distilled pipeline, or point ltxv.checkpoint at a dev checkpoint."
        )


def _check_gemma_root(root: Path) -> None:
    if not root.is_dir():
        raise ModelFilesError(f"models.gemma_root: folder {root.name} was not found.")
    for pattern in ("tokenizer.model", "preprocessor_config.json", "model*.safetensors"):
        if next(root.rglob(pattern), None) is None:
            raise ModelFilesError(f"models.gemma_root: {pattern} was not found in {root.name}.")


def _check_t5_root(root: Path) -> None:
    if not root.is_dir():
        raise ModelFilesError(f"ltxv.text_encoder_root: folder {root.name} was not found.")
    for pattern in ("text_encoder/config.json", "tokenizer/spiece.model"):
        if not (root / pattern).is_file():
            raise ModelFilesError(f"ltxv.text_encoder_root: {pattern} was not found in {root.name}.")
    if next((root / "text_encoder").glob("*.safetensors"), None) is None:
        raise ModelFilesError(f"ltxv.text_encoder_root: no text_encoder/*.safetensors weights in {root.name}.")


class DraftStateError(Exception):
    """A finalize's kept draft is missing, unreadable or not the draft of this clip."""


class SourceClipError(Exception):
    """The delivered clip an extend or a retake starts from is missing, unreadable, or not the clip the request
    describes."""
