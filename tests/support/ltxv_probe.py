"""Checks that must run inside the LTX-Video interpreter; the tests call this script with it.

``scope SPEC scoped|unscoped``: render SPEC and print, as JSON, ``torch.is_grad_enabled()``
as recorded by a forward hook on the VAE decoder's last conv at every decode.

``stream``: decode one set of tiny latents in one window and in small windows with
enough context, print the frame counts and the largest pixel difference.

``loaders CHECKPOINT``: load the transformer and the VAE with the package's own
``from_pretrained`` and with the generator's per-model reads; print whether they match.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from generator.ltxv import pipeline as ltxv
from generator.protocol import JobSpec, Tiling


def scope(spec_path: str, mode: str) -> list[bool]:
    records: list[bool] = []

    def observe(vae: Any) -> None:
        vae.decoder.conv_out.register_forward_hook(lambda *_: records.append(torch.is_grad_enabled()))

    spec = JobSpec.model_validate_json(Path(spec_path).read_text())
    ltxv.DECODER_OBSERVERS.append(observe)
    chosen: Any = contextlib.nullcontext if mode == "unscoped" else torch.inference_mode
    ltxv.generate(spec, lambda event: None, scope=chosen)
    return records


def stream(checkpoint: str) -> dict[str, Any]:
    from generator.checks import safetensors_metadata

    config = json.loads(safetensors_metadata(Path(checkpoint))["config"])
    device = torch.device("cpu")
    with torch.inference_mode():
        vae = ltxv.load_vae(Path(checkpoint), config, device, torch.float32)
        shape = (1, config["vae"]["latent_channels"], 9, 2, 3)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))

        def decode(tiling: Tiling) -> torch.Tensor:
            chunks = ltxv.decode_stream(vae, latents, tiling, torch.Generator().manual_seed(7), (64, 96))
            return torch.cat([torch.from_numpy(chunk) for chunk in chunks])

        whole = decode(Tiling(temporal_frames=128, temporal_overlap_frames=0))
        windowed = decode(Tiling(temporal_frames=16, temporal_overlap_frames=48))
        narrow = decode(Tiling(temporal_frames=16, temporal_overlap_frames=8))
    return {
        "frames": [whole.shape[0], windowed.shape[0]],
        "shape": list(whole.shape),
        "max_diff": int((whole.int() - windowed.int()).abs().max()),
        "narrow_max_diff": int((whole.int() - narrow.int()).abs().max()),
    }


def loaders(checkpoint: str) -> dict[str, Any]:
    from ltx_video.models.autoencoders.causal_video_autoencoder import CausalVideoAutoencoder
    from ltx_video.models.transformers.transformer3d import Transformer3DModel

    from generator.checks import safetensors_metadata

    path = Path(checkpoint)
    config = json.loads(safetensors_metadata(path)["config"])
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    pairs = {
        "transformer": (Transformer3DModel.from_pretrained(path), ltxv.load_transformer(path, config, cpu, bf16)),
        "vae": (CausalVideoAutoencoder.from_pretrained(path), ltxv.load_vae(path, config, cpu, bf16)),
    }
    result: dict[str, Any] = {}
    for name, (official, ours) in pairs.items():
        theirs, mine = official.state_dict(), ours.state_dict()
        result[name] = {
            "tensors": len(theirs),
            "same_keys": sorted(theirs) == sorted(mine),
            "equal": all(torch.equal(theirs[k].to(torch.bfloat16), mine[k]) for k in theirs if k in mine),
        }
    return result


if __name__ == "__main__":
    if sys.argv[1] == "scope":
        print(json.dumps(scope(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "loaders":
        print(json.dumps(loaders(sys.argv[2])))
    else:
        print(json.dumps(stream(sys.argv[2])))
