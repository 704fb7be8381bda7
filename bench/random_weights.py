"""Full-size LTX-2.3 models with deterministic random weights, built through the production loaders.

The benchmark writes header-only model files: the official file names and layouts
with the official ``config`` metadata but (almost) no tensors. ``RandomLedger`` is
the production ``LtxLedger`` (same builders, configurators, key maps, fp8-cast
policy, module ops) with one change: each builder's state-dict loader reads the
config from those files as production does, and returns random tensors of every
shape the model expects, generated directly on the target device. Memory and time
do not depend on the weights' values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ltx_core.loader.primitives import StateDict
from ltx_core.loader.sd_ops import SDOps
from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
from ltx_core.model.transformer import LTXModelConfigurator
from ltx_core.model.upsampler import LatentUpsamplerConfigurator
from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator
from ltx_core.text_encoders.gemma.config import GEMMA3_CONFIG_FOR_LTX
from safetensors import safe_open
from safetensors.torch import save_file

from generator.ltx2.models import EmbeddingsProcessorForGemma, GemmaFromConfigJson, LtxLedger

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
SEED = 20261122
WEIGHT_STD = 0.02
BUILDERS = (
    "transformer_builder", "vae_decoder_builder", "vae_encoder_builder", "audio_decoder_builder",
    "vocoder_builder", "embeddings_processor_builder", "text_encoder_builder", "upsampler_builder",
)


class RandomLoader:
    """A state-dict loader: the config from the real file's metadata, random tensors for the weights."""

    def __init__(self, inner: Any, configurator: Any, seed: int) -> None:
        self.inner = inner
        self.configurator = configurator
        self.seed = seed

    def metadata(self, path: str) -> dict[str, Any]:
        return self.inner.metadata(path)  # type: ignore[no-any-return]

    def load(self, path: str | list[str], sd_ops: SDOps | None = None, device: torch.device | None = None) -> StateDict:
        device = device or torch.device("cpu")
        # Made on the GPU whenever there is one, then moved: a model built on the host for streaming
        # (generator/ltx2/plan.py) gets the same values as one built on the GPU.
        made_on = torch.device("cuda") if torch.cuda.is_available() else device
        first = path[0] if isinstance(path, list) else path
        config = self.metadata(first)
        with torch.device("meta"):
            model = self.configurator.from_config(config)
        generator = torch.Generator(device=made_on).manual_seed(self.seed)
        sd: dict[str, torch.Tensor] = {}
        size = 0
        dtypes: set[torch.dtype] = set()
        # Buffers too, persistent or not: the builder refuses a model with any tensor left on meta.
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for key, meta in tensors.items():
            if meta.dtype.is_floating_point:
                # Checkpoints store bf16; the fp8-cast policy downcasts Linear weights from it.
                value = torch.empty(meta.shape, dtype=torch.bfloat16, device=made_on).normal_(
                    0.0, WEIGHT_STD, generator=generator
                )
            else:
                value = torch.zeros(meta.shape, dtype=meta.dtype, device=made_on)
            pairs = list(sd_ops.apply_to_key_value(key, value)) if sd_ops is not None else [(key, value)]
            if len(pairs) == 1:
                # Value operations (the fp8 downcast) apply; renames do not: ``key`` is already the
                # model's own name, while ops like the vocoder's prefix strip expect checkpoint names.
                pairs = [(key, pairs[0][1])]
            # One key may feed two (Gemma's tied lm_head takes embed_tokens' tensor): move it once, or the
            # host-built model gets two copies and streaming puts both on the GPU.
            moved: dict[int, torch.Tensor] = {}
            for new_key, new_value in pairs:
                if id(new_value) not in moved:
                    moved[id(new_value)] = new_value.to(device)
                    size += new_value.nbytes
                sd[new_key] = moved[id(new_value)]
                dtypes.add(new_value.dtype)
        del model
        return StateDict(sd=sd, device=device, size=size, dtype=dtypes)


class RandomLedger(LtxLedger):
    """The production ledger with random-weight loaders (see the module docstring)."""

    def build_model_builders(self) -> None:
        super().build_model_builders()
        for index, name in enumerate(BUILDERS):
            builder = getattr(self, name, None)
            if builder is None:
                continue
            loader = RandomLoader(builder.model_loader, builder.model_class_configurator, SEED + index)
            setattr(self, name, replace(builder, model_loader=loader))

    def transformer_with_loras(self, loras: tuple[Any, ...], kept: Any = None) -> Any:
        # Stage 2 keeps stage 1's transformer; no LoRA file exists at full size, so nothing is fused.
        if kept is not None:
            log.info("benchmark: distilled LoRA fusion skipped (%d LoRA)", len(loras))
            return kept
        return super().transformer_with_loras(loras)

    def with_loras(self, loras: tuple[Any, ...]) -> RandomLedger:
        # No LoRA file exists at full size: stage 2 runs the same transformer without the
        # fusion step (measured separately: +0.19 GiB transient, 3.9 s; gpu-h100 note).
        if loras:
            log.info("benchmark: distilled LoRA fusion skipped (%d LoRA)", len(loras))
        return RandomLedger(
            dtype=self.dtype, device=self.device, checkpoint_path=self.checkpoint_path,
            gemma_root_path=self.gemma_root_path, spatial_upsampler_path=self.spatial_upsampler_path,
            loras=(), registry=self.registry, quantization=self.quantization,
        )


def full_configs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(checkpoint config, upsampler config, Gemma config.json), without the provenance notes."""
    checkpoint = {k: v for k, v in json.loads((CONFIGS / "ltx-2.3-22b.json").read_text()).items() if k != "_source"}
    upsampler = {
        k: v for k, v in json.loads((CONFIGS / "ltx-2.3-spatial-upscaler-x2.json").read_text()).items()
        if k != "_source"
    }
    # ltx-core hard-codes Gemma 3 12B (text_encoders/gemma/config.py); Hugging Face ships the same config.json.
    return checkpoint, upsampler, GEMMA3_CONFIG_FOR_LTX.to_dict()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Leave a file as it is when it already holds ``data``: the embedding cache keys on the
    model files' modification times, and every benchmark job writes these files again."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.write_bytes(data)


def _header_file(path: Path, metadata: dict[str, str]) -> None:
    # Compared as parsed metadata: safetensors writes a header's keys in no fixed order.
    if path.is_file():
        with safe_open(str(path), "pt") as existing:
            if existing.metadata() == metadata:
                return
    save_file({"header_only": torch.zeros(1)}, str(path), metadata=metadata)


def write_header_models(root: Path, tokenizer_from: Path, *, tiny: dict[str, Any] | None = None) -> dict[str, Path]:
    """Header-only model files in the official layout; ``tiny`` swaps in small configs for CPU tests.

    ``tokenizer_from`` is a Gemma folder with tokenizer files (the tiny one: token ids
    only index the embedding table, so the vocabulary size does not change the work).
    """
    checkpoint_config, upsampler_config, gemma_config = full_configs()
    if tiny is not None:
        checkpoint_config, upsampler_config, gemma_config = tiny["checkpoint"], tiny["upsampler"], tiny["gemma"]
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "ltx-2.3-22b-dev.safetensors"
    _header_file(checkpoint, {"config": json.dumps(checkpoint_config), "model_version": "2.3.0"})
    upsampler = root / "ltx-2.3-spatial-upscaler-x2-1.0.safetensors"
    _header_file(upsampler, {"config": json.dumps(upsampler_config)})
    lora = root / "ltx-2.3-22b-distilled-lora-384.safetensors"
    _header_file(lora, {})
    gemma = root / "gemma-3-12b-it"
    gemma.mkdir(exist_ok=True)
    for item in tokenizer_from.iterdir():
        if item.suffix != ".safetensors" and item.name != "config.json" and item.is_file():
            _write_if_changed(gemma / item.name, item.read_bytes())
    _write_if_changed(gemma / "config.json", json.dumps(gemma_config).encode())
    _header_file(gemma / "model-00001-of-00001.safetensors", {})
    return {"checkpoint": checkpoint, "distilled_checkpoint": checkpoint, "distilled_lora": lora,
            "spatial_upsampler": upsampler, "gemma_root": gemma}


def parameter_counts(models: dict[str, Path]) -> dict[str, float]:
    """Billions of parameters per component, built on the meta device from the files' own configs."""
    from generator.checks import safetensors_metadata

    checkpoint_config = json.loads(safetensors_metadata(models["checkpoint"])["config"])
    upsampler_config = json.loads(safetensors_metadata(models["spatial_upsampler"])["config"])
    gemma_config = json.loads((models["gemma_root"] / "config.json").read_text())
    counts: dict[str, float] = {}
    builds = {
        "transformer": (LTXModelConfigurator, checkpoint_config),
        "embeddings_processor": (EmbeddingsProcessorForGemma.for_root(models["gemma_root"]), checkpoint_config),
        "gemma": (GemmaFromConfigJson, gemma_config),
        "video_decoder": (VideoDecoderConfigurator, checkpoint_config),
        "video_encoder": (VideoEncoderConfigurator, checkpoint_config),
        "spatial_upsampler": (LatentUpsamplerConfigurator, upsampler_config),
        "audio_decoder": (AudioDecoderConfigurator, checkpoint_config),
        "vocoder": (VocoderConfigurator, checkpoint_config),
    }
    for name, (configurator, config) in builds.items():
        with torch.device("meta"):
            model = configurator.from_config(config)
        counts[name] = sum(p.numel() for p in model.parameters()) / 1e9
        if name == "transformer":
            counts["transformer_blocks"] = sum(
                p.numel() for key, p in model.named_parameters() if key.startswith("transformer_blocks.")
            ) / 1e9
        del model
    return counts


# What the official files measure (docs/LIBRARIES.md, 'Measurements that set the defaults'): a config
# with a missing key builds a different model silently, so the full-size run refuses to start when these are off.
EXPECTED_BILLIONS = {
    "transformer": (18.9, 19.1), "transformer_blocks": (18.5, 18.6), "embeddings_processor": (3.1, 3.25),
    # Gemma 3 12B is 12.19 B with its vision tower; the generator builds the language model alone.
    "gemma": (11.7, 11.85), "video_decoder": (0.40, 0.42), "video_encoder": (0.31, 0.33),
    "spatial_upsampler": (0.49, 0.51),
}


def check_full_size(counts: dict[str, float]) -> list[str]:
    return [
        f"{name}: {counts[name]:.3f} B parameters, expected {low}-{high} B"
        for name, (low, high) in EXPECTED_BILLIONS.items()
        if not low <= counts[name] <= high
    ]
