"""Tiny random-weight LTX-Video 0.9.x model files in the official layouts, for tests and smoke tests.

Runs in the LTX-Video interpreter (``.venv-ltxv``): it builds the models with the
``ltx-video`` package's own classes and saves them as Lightricks ships them:

- one single-file checkpoint: ``model.diffusion_model.*`` (transformer) and ``vae.*``
  tensors, with ``metadata["config"]`` = ``{transformer, vae, scheduler[, allowed_inference_steps]}``;
  a dev file and a distilled twin that carries ``allowed_inference_steps``;
- the spatial latent upsampler, its config at the top of the metadata;
- a PixArt-style text encoder folder: ``text_encoder/`` (T5EncoderModel) and
  ``tokenizer/`` (the slow sentencepiece T5Tokenizer).

The shapes follow the 0.9.8 configs with tiny widths; see docs/LIBRARIES.md, 'ltx-video 0.1.2'.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from generator.ltx2.tiny import SEED, random_state
from generator.ltxv.pipeline import DISTILLED_FIRST_PASS, DISTILLED_SECOND_PASS, build_vae

T5_D_MODEL = 32
LATENT_CHANNELS = 32

TINY_TRANSFORMER: dict[str, Any] = {
    "_class_name": "Transformer3DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 8,
    "attention_type": "default",
    "caption_channels": T5_D_MODEL,
    "cross_attention_dim": 16,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": LATENT_CHANNELS,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "num_attention_heads": 2,
    "num_embeds_ada_norm": 1000,
    "num_layers": 2,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": LATENT_CHANNELS,
    "upcast_attention": False,
    "use_linear_projection": False,
    "qk_norm": "rms_norm",
    "standardization_norm": "rms_norm",
    "positional_embedding_type": "rope",
    "positional_embedding_theta": 10000.0,
    "positional_embedding_max_pos": [20, 2048, 2048],
    "timestep_scale_multiplier": 1000,
    "causal_temporal_positioning": True,
}

# The package's demo VAE shape (32x spatial, 8x temporal), timestep-conditioned like 0.9.1+.
TINY_VAE: dict[str, Any] = {
    "_class_name": "CausalVideoAutoencoder",
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "encoder_blocks": [
        ["res_x", {"num_layers": 1}],
        ["compress_space_res", {"multiplier": 2}],
        ["compress_time_res", {"multiplier": 2}],
        ["compress_all_res", {"multiplier": 2}],
        ["compress_all_res", {"multiplier": 2}],
        ["res_x", {"num_layers": 1}],
    ],
    "decoder_blocks": [
        ["res_x", {"num_layers": 1, "inject_noise": False}],
        ["compress_all", {"residual": True, "multiplier": 2}],
        ["compress_all", {"residual": True, "multiplier": 2}],
        ["compress_all", {"residual": True, "multiplier": 2}],
        ["res_x", {"num_layers": 1, "inject_noise": False}],
    ],
    "encoder_base_channels": 8,
    "decoder_base_channels": 8,
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
    "timestep_conditioning": True,
    "spatial_padding_mode": "replicate",
}

# The 0.9.x scheduler config (ltx_video/utils/diffusers_config_mapping.py, OURS_SCHEDULER_CONFIG).
SCHEDULER: dict[str, Any] = {
    "_class_name": "RectifiedFlowScheduler",
    "num_train_timesteps": 1000,
    "shifting": "SD3",
    "base_resolution": None,
    "target_shift_terminal": 0.1,
}

TINY_UPSAMPLER: dict[str, Any] = {
    "_class_name": "LatentUpsampler",
    "in_channels": LATENT_CHANNELS,
    "mid_channels": 32,  # GroupNorm(32, mid_channels) needs a multiple of 32
    "num_blocks_per_stage": 1,
    "dims": 3,
    "spatial_upsample": True,
    "temporal_upsample": False,
}

TINY_T5: dict[str, Any] = {
    "d_model": T5_D_MODEL,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
}

# Every timestep of the distilled schedules, as a distilled checkpoint lists them.
ALLOWED_DISTILLED_STEPS = sorted(
    {*DISTILLED_FIRST_PASS["timesteps"], *DISTILLED_SECOND_PASS["timesteps"]}, reverse=True
)

_CORPUS = (
    "a cat walks across the garden. the camera pans slowly to the left. waves roll onto a sandy beach. "
    "a woman turns her head and smiles. leaves fall from an old oak tree. the city lights flicker at night. "
    "a dog runs through tall grass. clouds drift over snowy mountains. rain falls on a quiet street"
)


@dataclass(frozen=True)
class TinyLtxv:
    checkpoint: Path
    distilled_checkpoint: Path
    spatial_upsampler: Path
    text_encoder_root: Path

    def settings(self) -> dict[str, str]:
        return {
            "checkpoint": str(self.checkpoint),
            "distilled_checkpoint": str(self.distilled_checkpoint),
            "spatial_upsampler": str(self.spatial_upsampler),
            "text_encoder_root": str(self.text_encoder_root),
        }


def write_tiny_ltxv(root: Path, seed: int = SEED) -> TinyLtxv:
    """Write the tiny dev and distilled checkpoints, the upsampler and the T5 folder under ``root``."""
    from ltx_video.models.autoencoders.latent_upsampler import LatentUpsampler
    from ltx_video.models.transformers.transformer3d import Transformer3DModel

    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        transformer = Transformer3DModel.from_config(TINY_TRANSFORMER)
        upsampler = LatentUpsampler.from_config(TINY_UPSAMPLER)
    vae = build_vae(TINY_VAE)

    tensors = {f"model.diffusion_model.{k}": v for k, v in random_state(transformer, generator).items()}
    tensors |= {f"vae.{k}": v for k, v in random_state(vae, generator).items()}
    channels = (LATENT_CHANNELS,)
    tensors["vae.per_channel_statistics.std-of-means"] = (torch.rand(channels, generator=generator) + 0.5).bfloat16()
    tensors["vae.per_channel_statistics.mean-of-means"] = (torch.randn(channels, generator=generator) * 0.1).bfloat16()

    config: dict[str, Any] = {"transformer": TINY_TRANSFORMER, "vae": TINY_VAE, "scheduler": SCHEDULER}
    dev = root / "ltxv-tiny-dev.safetensors"
    save_file(tensors, str(dev), metadata={"config": json.dumps(config)})
    distilled = root / "ltxv-tiny-distilled.safetensors"
    config_distilled = {**config, "allowed_inference_steps": ALLOWED_DISTILLED_STEPS}
    save_file(tensors, str(distilled), metadata={"config": json.dumps(config_distilled)})

    upsampler_path = root / "ltxv-tiny-spatial-upscaler.safetensors"
    save_file(random_state(upsampler, generator), str(upsampler_path),
              metadata={"config": json.dumps(TINY_UPSAMPLER)})

    text_root = root / "t5"
    write_text_encoder(text_root)
    return TinyLtxv(dev, distilled, upsampler_path, text_root)


def write_text_encoder(root: Path) -> None:
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    corpus = root / ".corpus.txt"
    corpus.write_text("\n".join(s.strip() for s in _CORPUS.split(". ")) * 20 + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tokenizer_dir / "spiece"), vocab_size=60, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
        )
    finally:
        corpus.unlink(missing_ok=True)
    (tokenizer_dir / "spiece.vocab").unlink(missing_ok=True)
    tokenizer = T5Tokenizer(vocab_file=str(tokenizer_dir / "spiece.model"), extra_ids=0, legacy=True)
    tokenizer.save_pretrained(str(tokenizer_dir))
    torch.manual_seed(SEED)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5)).to(torch.bfloat16)
    encoder.save_pretrained(str(root / "text_encoder"))


if __name__ == "__main__":
    print(json.dumps(write_tiny_ltxv(Path(sys.argv[1])).settings()))
