"""Tiny random-weight LTX-2.3 model files in the official layouts, for tests and smoke tests.

Every component is built on the meta device by ltx-core's own configurator from a
tiny config, filled with deterministic random values, renamed to the official key
prefixes and saved in bf16 (LoRA fusion only accepts bf16 or fp8 base weights).
The same builders that load the real files load these.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SEED = 1234
MODEL_VERSION = "2.3.0"

# A 2.3-layout config: V2 feature extractor (caption projection before the
# connector), gated attention, split RoPE in float64, BWE vocoder. Every key that
# ltx-core's configurators would otherwise fill with a silent default is given.
TINY_TRANSFORMER: dict[str, Any] = {
    "dropout": 0.0,
    "attention_bias": True,
    "num_vector_embeds": None,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "cross_attention_norm": True,
    "double_self_attention": False,
    "upcast_attention": False,
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "qk_norm": "rms_norm",
    "positional_embedding_type": "rope",
    "use_audio_video_cross_attention": True,
    "share_ff": False,
    "av_cross_ada_norm": True,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 128,
    "out_channels": 128,
    "num_layers": 2,
    "cross_attention_dim": 32,
    "norm_eps": 1e-06,
    "attention_type": "default",
    "positional_embedding_theta": 10000.0,
    "positional_embedding_max_pos": [20, 2048, 2048],
    "timestep_scale_multiplier": 1000,
    "use_middle_indices_grid": True,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 8,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_cross_attention_dim": 16,
    "audio_positional_embedding_max_pos": [20],
    "av_ca_timestep_scale_multiplier": 1000,
    "rope_type": "split",
    "frequencies_precision": "float64",
    "apply_gated_attention": True,
    "cross_attention_adaln": True,
    "caption_channels": 64,
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "caption_proj_input_norm": False,
    "caption_projection_second_linear": False,
    "connector_num_attention_heads": 2,
    "connector_attention_head_dim": 16,
    "connector_num_layers": 1,
    "connector_positional_embedding_max_pos": [4096],
    "connector_apply_gated_attention": True,
    "audio_connector_num_attention_heads": 2,
    "audio_connector_attention_head_dim": 8,
    "audio_connector_num_layers": 1,
}

TINY_VAE: dict[str, Any] = {
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "patch_size": 4,
    "norm_layer": "pixel_norm",
    "latent_log_var": "uniform",
    "causal_decoder": False,
    "timestep_conditioning": False,
    "spatial_padding_mode": "zeros",
    "encoder_blocks": [["compress_space", {}], ["compress_time", {}], ["compress_all", {}], ["compress_all", {}]],
    "decoder_blocks": [
        ["compress_all", {"multiplier": 2}],
        ["compress_all", {"multiplier": 2}],
        ["compress_all", {"multiplier": 2}],
    ],
    "decoder_base_channels": 4,
}

TINY_AUDIO_VAE: dict[str, Any] = {
    "model": {
        "params": {
            "sampling_rate": 16000,
            "ddconfig": {
                "ch": 128,
                "out_ch": 2,
                "in_channels": 2,
                "ch_mult": [1, 1, 1],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "resolution": 256,
                "z_channels": 8,
                "double_z": True,
                "mel_bins": 64,
                "norm_type": "pixel",
                "causality_axis": "height",
                "mid_block_add_attention": False,
                "dropout": 0.0,
            },
        }
    },
    "preprocessing": {
        "stft": {"hop_length": 160, "filter_length": 1024, "causal": True},
        "mel": {"n_mel_channels": 64},
    },
}

_AMP = {"resblock": "AMP1", "stereo": True, "activation": "snakebeta", "use_tanh_at_final": False,
        "use_bias_at_final": False, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]]}
TINY_VOCODER: dict[str, Any] = {
    "vocoder": {**_AMP, "upsample_rates": [4, 4, 10], "upsample_kernel_sizes": [8, 8, 20],
                "upsample_initial_channel": 32},
    "bwe": {**_AMP, "upsample_rates": [6, 5, 8], "upsample_kernel_sizes": [12, 11, 16],
            "upsample_initial_channel": 32, "input_sampling_rate": 16000, "output_sampling_rate": 48000,
            "n_fft": 256, "hop_length": 80, "num_mels": 64},
}

TINY_UPSAMPLER: dict[str, Any] = {
    "in_channels": 128,
    "mid_channels": 32,
    "num_blocks_per_stage": 1,
    "dims": 3,
    "spatial_upsample": True,
    "temporal_upsample": False,
    "spatial_scale": 2.0,
    "rational_resampler": False,
}

TINY_GEMMA: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "boi_token_index": 7,
    "eoi_token_index": 8,
    "image_token_index": 9,
    "mm_tokens_per_image": 4,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "vocab_size": 400,
        "sliding_window": 64,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "vision_use_head": False,
    },
}

_SPECIAL_SYMBOLS = ["<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                    "<image_soft_token>"]
_TOKENIZER_TEXT = (
    "a cat walks on the beach at sunset while waves roll in and the camera slowly pans left. "
    "a woman smiles and turns her head, wind moves her hair, soft light, cinematic motion. "
    "the city at night with cars passing, neon signs flicker, rain falls on the street. "
    "blurry, out of focus, overexposed, low contrast, noise, jittery movement, artifacts. "
)


@dataclass(frozen=True)
class TinyModels:
    checkpoint: Path
    distilled_lora: Path
    spatial_upsampler: Path
    gemma_root: Path

    def config_lines(self) -> str:
        return "\n".join(
            [
                "models:",
                f"  checkpoint: {self.checkpoint}",
                f"  distilled_checkpoint: {self.checkpoint}",
                f"  distilled_lora: {self.distilled_lora}",
                f"  spatial_upsampler: {self.spatial_upsampler}",
                f"  gemma_root: {self.gemma_root}",
            ]
        )


def tiny_checkpoint_config() -> dict[str, Any]:
    return {
        "transformer": TINY_TRANSFORMER,
        "vae": TINY_VAE,
        "audio_vae": TINY_AUDIO_VAE,
        "vocoder": TINY_VOCODER,
    }


def _fill(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("std-of-means"):
        return torch.ones(shape)
    if name.endswith(("mean-of-means", ".bias")) or "mean-of-stds" in name or name.endswith("channel"):
        return torch.zeros(shape)
    if len(shape) == 1 and ("norm" in name or name.endswith(("scale", "alpha", "beta"))):
        return torch.ones(shape)
    if "mel" in name or "stft" in name or "window" in name or "basis" in name:
        return torch.rand(shape, generator=generator) * 0.01 + 0.001
    if len(shape) == 0:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * 0.02


def random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = module.state_dict(keep_vars=True)
    return {
        name: _fill(name, tensor.shape, generator).to(torch.bfloat16)
        for name, tensor in state.items()
        if tensor.is_floating_point()
    }


def _meta(configurator: Any, config: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        module: torch.nn.Module = configurator.from_config(config)
    return module


def write_tiny_models(root: Path, seed: int = SEED) -> TinyModels:
    """Write the tiny checkpoint, distilled LoRA, upsampler and Gemma root under ``root``."""
    from ltx_core.model.audio_vae import (
        AudioDecoderConfigurator,
        AudioEncoderConfigurator,
        VocoderConfigurator,
    )
    from ltx_core.model.transformer import LTXModelConfigurator
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

    from generator.ltx2.models import EmbeddingsProcessorForGemma

    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    config = tiny_checkpoint_config()
    gemma_root = write_tiny_gemma(root / "gemma", generator)

    tensors: dict[str, torch.Tensor] = {}
    transformer = _meta(LTXModelConfigurator, config)
    transformer_state = random_state(transformer, generator)
    tensors |= {f"model.diffusion_model.{k}": v for k, v in transformer_state.items()}

    video_vae = (("vae.encoder.", VideoEncoderConfigurator), ("vae.decoder.", VideoDecoderConfigurator))
    for prefix, configurator in video_vae:
        for key, value in random_state(_meta(configurator, config), generator).items():
            if key.startswith("per_channel_statistics."):
                tensors[f"vae.{key}"] = value
            else:
                tensors[prefix + key] = value
    for prefix, configurator in (
        ("audio_vae.encoder.", AudioEncoderConfigurator),
        ("audio_vae.decoder.", AudioDecoderConfigurator),
    ):
        for key, value in random_state(_meta(configurator, config), generator).items():
            if key.startswith("per_channel_statistics."):
                tensors[f"audio_vae.{key}"] = value
            else:
                tensors[prefix + key] = value
    tensors |= {f"vocoder.{k}": v for k, v in random_state(_meta(VocoderConfigurator, config), generator).items()}

    processor_configurator = EmbeddingsProcessorForGemma.for_root(gemma_root)
    for key, value in random_state(_meta(processor_configurator, config), generator).items():
        if key.startswith("feature_extractor."):
            tensors["text_embedding_projection." + key.removeprefix("feature_extractor.")] = value
        elif key.startswith("video_connector."):
            tensors["model.diffusion_model.video_embeddings_connector." + key.removeprefix("video_connector.")] = value
        elif key.startswith("audio_connector."):
            tensors["model.diffusion_model.audio_embeddings_connector." + key.removeprefix("audio_connector.")] = value

    checkpoint = root / "ltx-2.3-tiny-dev.safetensors"
    save_file(tensors, str(checkpoint), metadata={"config": json.dumps(config), "model_version": MODEL_VERSION})

    upsampler = root / "ltx-2.3-tiny-spatial-upscaler-x2.safetensors"
    upsampler_state = random_state(_meta(LatentUpsamplerConfigurator, TINY_UPSAMPLER), generator)
    save_file(upsampler_state, str(upsampler), metadata={"config": json.dumps(TINY_UPSAMPLER)})

    lora = root / "ltx-2.3-tiny-distilled-lora.safetensors"
    save_file(_tiny_lora(transformer_state, generator), str(lora))
    return TinyModels(checkpoint=checkpoint, distilled_lora=lora, spatial_upsampler=upsampler, gemma_root=gemma_root)


def write_tiny_lora(checkpoint: Path, path: Path, seed: int = SEED + 1) -> Path:
    """A tiny random LoRA for ``checkpoint``'s transformer (an owner's LoRA, as a camera-control one would be)."""
    prefix = "model.diffusion_model."
    with safe_open(str(checkpoint), "pt") as handle:
        keys = [key for key in handle.keys() if key.startswith(prefix)]  # noqa: SIM118 (safe_open has no __iter__)
        shapes = {key.removeprefix(prefix): torch.empty(tuple(handle.get_slice(key).get_shape()), device="meta")
                  for key in keys}
    save_file(_tiny_lora(shapes, torch.Generator().manual_seed(seed)), str(path))
    return path


def _tiny_lora(transformer_state: dict[str, torch.Tensor], generator: torch.Generator, rank: int = 4) -> dict[
    str, torch.Tensor
]:
    targets = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", ".ff.net.0.proj.weight",
               ".ff.net.2.weight")
    lora: dict[str, torch.Tensor] = {}
    for key, weight in transformer_state.items():
        if not key.startswith("transformer_blocks.") or not key.endswith(targets) or weight.ndim != 2:
            continue
        module = key.removesuffix(".weight")
        out_features, in_features = weight.shape
        lora[f"diffusion_model.{module}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) * 0.02
        ).to(torch.bfloat16)
        lora[f"diffusion_model.{module}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 0.02
        ).to(torch.bfloat16)
    return lora


def official_gemma_key(key: str) -> str:
    """A ``Gemma3ForConditionalGeneration`` state-dict key as google/gemma-3-12b-it's safetensors name it
    (transformers now nests the submodules under ``model.``; the released files keep the older names,
    which its ``_checkpoint_conversion_mapping`` renames on load)."""
    return (
        key.replace("model.language_model.", "language_model.model.", 1)
        .replace("model.vision_tower.", "vision_tower.", 1)
        .replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
    )


def write_tiny_gemma(root: Path, generator: torch.Generator) -> Path:
    """A Gemma 3 root as Hugging Face ships it: config, tokenizer, processor config, weights."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_GEMMA, indent=2))
    _write_tokenizer(root)
    Gemma3ImageProcessor(
        size={"height": 56, "width": 56}, image_seq_length=TINY_GEMMA["mm_tokens_per_image"]
    ).save_pretrained(str(root))

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config.from_dict(TINY_GEMMA))
    weights: dict[str, torch.Tensor] = {}
    for key, value in random_state(model, generator).items():
        if key.startswith("lm_head."):
            continue  # tied to embed_tokens; the official files do not carry it
        weights[official_gemma_key(key)] = value
    save_file(weights, str(root / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    return root


def _write_tokenizer(root: Path) -> None:
    import sentencepiece as spm
    from transformers import GemmaTokenizerFast

    corpus = root / ".tokenizer-corpus.txt"
    corpus.write_text("\n".join(s.strip() for s in _TOKENIZER_TEXT.split(". ")) * 20 + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(root / "tokenizer"),
            vocab_size=TINY_GEMMA["text_config"]["vocab_size"],
            model_type="bpe",
            byte_fallback=True,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            bos_piece="<bos>",
            eos_piece="<eos>",
            user_defined_symbols=_SPECIAL_SYMBOLS,
            minloglevel=2,
        )
    finally:
        corpus.unlink(missing_ok=True)
    (root / "tokenizer.vocab").unlink(missing_ok=True)
    fast = GemmaTokenizerFast(vocab_file=str(root / "tokenizer.model"))
    fast.backend_tokenizer.save(str(root / "tokenizer.json"))
    # Hand-written in the official form: a 5.x save_pretrained() file breaks 4.x.
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1024,
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


if __name__ == "__main__":
    # `ltxbot models tiny` runs this in the generator's interpreter and prints these lines.
    print(write_tiny_models(Path(sys.argv[1])).config_lines())
