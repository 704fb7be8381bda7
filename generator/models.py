"""Model building for LTX-2: ltx-core's ModelLedger, with Gemma read from its own config.json.

ltx-core 1.0.0 hard-codes the 12B Gemma 3 layout (encoder_configurator.py:25-30,
69-72). We keep every stock builder and replace only two: the text encoder is built
from the Gemma root's ``config.json`` (identical to the hard-coded one for the real
model), and the embeddings processor takes its input width from the same file.
"""

from __future__ import annotations

import contextlib
import json
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ltx_core.loader.module_ops import ModuleOps
from ltx_core.loader.sft_loader import SafetensorsModelStateDictLoader
from ltx_core.model.transformer.feed_forward import FeedForward
from ltx_core.text_encoders.gemma import EmbeddingsProcessorConfigurator, GemmaTextEncoder
from ltx_core.text_encoders.gemma.encoders import encoder_configurator
from ltx_core.text_encoders.gemma.encoders.encoder_configurator import GemmaTextEncoderConfigurator
from ltx_pipelines.utils.model_ledger import ModelLedger
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from generator.checks import ModelFilesError

# Feed-forward layers run over at most this many tokens at once. The 4x-wide hidden
# activation of a 2048x1536x97 stage-2 pass (39,936 tokens) is 1.2 GiB, twice with
# the GELU; in 4,096-token chunks it is a tenth of that. Per-token math: same result.
FEED_FORWARD_CHUNK_TOKENS = 4096


def chunk_feed_forward(model: torch.nn.Module, chunk_tokens: int = FEED_FORWARD_CHUNK_TOKENS) -> torch.nn.Module:
    """Make every FeedForward in ``model`` process long sequences in chunks of ``chunk_tokens``."""

    def forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] <= chunk_tokens:
            return self.net(x)  # type: ignore[no-any-return]
        out: torch.Tensor | None = None
        for start in range(0, x.shape[1], chunk_tokens):
            part = self.net(x[:, start : start + chunk_tokens])
            if out is None:
                out = part.new_empty((*x.shape[:2], *part.shape[2:]))
            out[:, start : start + part.shape[1]] = part
            del part
        assert out is not None
        return out

    for module in model.modules():
        if isinstance(module, FeedForward):
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
    return model


CHUNKED_FEED_FORWARD = ModuleOps(
    name="chunked_feed_forward",
    matcher=lambda model: any(isinstance(m, FeedForward) for m in model.modules()),
    mutator=chunk_feed_forward,
)


def gemma_config_path(gemma_root: Path) -> Path | None:
    found = sorted(gemma_root.rglob("config.json"))
    return found[0] if found else None


class GemmaRootLoader(SafetensorsModelStateDictLoader):
    """Hugging Face Gemma shards carry no config metadata: read the root's config.json."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self._config = config

    def metadata(self, path: str) -> dict[str, Any]:
        return self._config


class GemmaFromConfigJson(GemmaTextEncoderConfigurator):
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GemmaTextEncoder:
        if not config:
            return super().from_config(config)
        with torch.device("meta"):
            model = Gemma3ForConditionalGeneration(Gemma3Config.from_dict(config))
        return GemmaTextEncoder(model=model)


@contextlib.contextmanager
def _gemma_dims(hidden_size: int, num_hidden_layers: int) -> Iterator[None]:
    """``_create_feature_extractor`` takes Gemma's dims from a module global; lend it ours."""
    original = encoder_configurator.GEMMA3_CONFIG_FOR_LTX
    encoder_configurator.GEMMA3_CONFIG_FOR_LTX = types.SimpleNamespace(  # type: ignore[assignment]
        text_config=types.SimpleNamespace(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
    )
    try:
        yield
    finally:
        encoder_configurator.GEMMA3_CONFIG_FOR_LTX = original


class EmbeddingsProcessorForGemma(EmbeddingsProcessorConfigurator):
    gemma_hidden_size: int | None = None
    gemma_layers: int | None = None

    @classmethod
    def for_root(cls, gemma_root: Path) -> type[EmbeddingsProcessorForGemma]:
        config_path = gemma_config_path(gemma_root)
        if config_path is None:
            return cls
        text = json.loads(config_path.read_text()).get("text_config", {})
        return type(
            "EmbeddingsProcessorForThisGemma",
            (cls,),
            {"gemma_hidden_size": text.get("hidden_size"), "gemma_layers": text.get("num_hidden_layers")},
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        if cls.gemma_hidden_size is None or cls.gemma_layers is None:
            return super().from_config(config)
        with _gemma_dims(cls.gemma_hidden_size, cls.gemma_layers):
            return super().from_config(config)


class LtxLedger(ModelLedger):
    """ModelLedger whose Gemma builders honour the Gemma root; every model is checked for meta weights."""

    def build_model_builders(self) -> None:
        super().build_model_builders()
        if hasattr(self, "transformer_builder"):
            self.transformer_builder: Any = replace(
                self.transformer_builder, module_ops=(*self.transformer_builder.module_ops, CHUNKED_FEED_FORWARD)
            )
        if self.gemma_root_path is None or not hasattr(self, "text_encoder_builder"):
            return
        root = Path(self.gemma_root_path)
        config_path = gemma_config_path(root)
        config = json.loads(config_path.read_text()) if config_path else {}
        self.text_encoder_builder: Any = replace(
            self.text_encoder_builder,
            model_class_configurator=GemmaFromConfigJson,
            model_loader=GemmaRootLoader(config),
        )
        self.embeddings_processor_builder: Any = replace(
            self.embeddings_processor_builder, model_class_configurator=EmbeddingsProcessorForGemma.for_root(root)
        )

    def with_loras(self, loras: tuple[Any, ...]) -> LtxLedger:
        # The stock method returns a plain ModelLedger and would drop our builders.
        return LtxLedger(
            dtype=self.dtype,
            device=self.device,
            checkpoint_path=self.checkpoint_path,
            gemma_root_path=self.gemma_root_path,
            spatial_upsampler_path=self.spatial_upsampler_path,
            loras=loras,
            registry=self.registry,
            quantization=self.quantization,
        )

    def transformer(self) -> Any:
        return _loaded(super().transformer, "transformer", "checkpoint")

    def video_encoder(self) -> Any:
        return _loaded(super().video_encoder, "video VAE encoder", "checkpoint")

    def video_decoder(self) -> Any:
        return _loaded(super().video_decoder, "video VAE decoder", "checkpoint")

    def audio_decoder(self) -> Any:
        return _loaded(super().audio_decoder, "audio VAE decoder", "checkpoint")

    def vocoder(self) -> Any:
        return _loaded(super().vocoder, "vocoder", "checkpoint")

    def text_encoder(self) -> Any:
        return _loaded(super().text_encoder, "Gemma text encoder", "gemma_root")

    def gemma_embeddings_processor(self) -> Any:
        return _loaded(super().gemma_embeddings_processor, "embeddings processor", "checkpoint")

    def spatial_upsampler(self) -> Any:
        return _loaded(super().spatial_upsampler, "spatial upsampler", "spatial_upsampler")


def _loaded(build: Callable[[], torch.nn.Module], what: str, key: str) -> Any:
    """ltx-core loads with strict=False and returns a meta model when weights are missing."""
    try:
        model = build()
    except NotImplementedError as exc:  # .to(device) on a meta model: "Cannot copy out of meta tensor"
        if "meta" not in str(exc):
            raise
        raise ModelFilesError(
            f"models.{key}: the {what} weights are incomplete; the file does not match this model."
        ) from None
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    missing += [name for name, b in model.named_buffers() if b.is_meta]
    if missing:
        raise ModelFilesError(
            f"models.{key}: the {what} weights are incomplete ({len(missing)} tensors missing, "
            f"first: {missing[0]}); the file does not match this model."
        )
    return model
