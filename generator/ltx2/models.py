"""Model building for LTX-2: ltx-core's ModelLedger, with our Gemma builder and two memory ops.

ltx-core 1.0.0 hard-codes the 12B Gemma 3 layout (encoder_configurator.py:25-30,
69-72). We keep every stock builder and change these: the text encoder is built from
the Gemma root's ``config.json`` (identical to the hard-coded one for the real model)
and without its vision tower, which prompt encoding never calls; the embeddings
processor takes its input width from the same file; the transformer runs its
feed-forward in token chunks and keeps per-token AdaLN values as their distinct rows.
Every builder reads through one ``WeightStore`` and only the keys its model holds, and
stage 2 can take stage 1's transformer with the distilled LoRA fused in place
(``generator/ltx2/weights.py``). Each change gives ltx-core's own numbers
(``tests/test_models.py``, ``tests/test_weights.py``).
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
from ltx_core.loader import KeyValueOperationResult, LoraPathStrengthAndSDOps
from ltx_core.loader.module_ops import ModuleOps
from ltx_core.loader.registry import Registry
from ltx_core.loader.sd_ops import SDOps
from ltx_core.model.transformer.feed_forward import FeedForward
from ltx_core.model.transformer.model import LTXModel
from ltx_core.model.transformer.transformer import BasicAVTransformerBlock
from ltx_core.model.transformer.transformer_args import TransformerArgsPreprocessor
from ltx_core.text_encoders.gemma import EmbeddingsProcessorConfigurator, GemmaTextEncoder
from ltx_core.text_encoders.gemma.encoders import encoder_configurator
from ltx_core.text_encoders.gemma.encoders.encoder_configurator import (
    GEMMA_MODEL_OPS,
    GemmaTextEncoderConfigurator,
)
from ltx_pipelines.utils.model_ledger import ModelLedger
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from generator.checks import ModelFilesError
from generator.ltx2.weights import StoreLoader, UsedKeysBuilder, WeightStore, fuse_loras_in_place

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


class TokenTimesteps:
    """Per-token AdaLN coefficients kept as their few distinct rows plus an index per token.

    With image conditioning every token carries its own timestep, so ltx-core keeps a
    (batch, tokens, 9 x 4096) tensor through the whole forward: 2.7 GiB at 2048x1536x97
    in stage 2. The tokens take two or three distinct values (conditioned or not), so we
    keep those rows and gather per block, which is the tensor each block built anyway.
    """

    def __init__(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        self.rows = rows  # (distinct values, coefficients)
        self.index = index  # (batch, tokens) -> row


def _prepare_timestep_by_value(
    self: TransformerArgsPreprocessor,
    timestep: torch.Tensor,
    adaln: torch.nn.Module,
    batch_size: int,
    hidden_dtype: torch.dtype,
) -> tuple[Any, torch.Tensor]:
    per_token = timestep.reshape(batch_size, -1)
    if per_token.shape[1] == 1:
        shared: tuple[Any, torch.Tensor] = TransformerArgsPreprocessor._prepare_timestep(
            self, timestep, adaln, batch_size, hidden_dtype  # type: ignore[arg-type]
        )
        return shared
    values, index = torch.unique(per_token * self.timestep_scale_multiplier, return_inverse=True)
    rows, embedded = adaln(values, hidden_dtype=hidden_dtype)
    return TokenTimesteps(rows, index), embedded[index]


def _ada_values_by_value(
    self: BasicAVTransformerBlock, scale_shift_table: torch.Tensor, batch_size: int, timestep: Any, indices: slice
) -> tuple[torch.Tensor, ...]:
    if not isinstance(timestep, TokenTimesteps):
        dense: tuple[torch.Tensor, ...] = BasicAVTransformerBlock.get_ada_values(
            self, scale_shift_table, batch_size, timestep, indices
        )
        return dense
    rows = timestep.rows.reshape(timestep.rows.shape[0], scale_shift_table.shape[0], -1)[:, indices, :]
    table = scale_shift_table[indices].unsqueeze(0).to(device=rows.device, dtype=rows.dtype)
    return (table + rows)[timestep.index].unbind(dim=2)


def timesteps_by_value(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s per-token AdaLN coefficients :class:`TokenTimesteps` (same values, less memory)."""
    for module in model.modules():
        if isinstance(module, BasicAVTransformerBlock):
            module.get_ada_values = types.MethodType(_ada_values_by_value, module)  # type: ignore[method-assign]
        if isinstance(module, LTXModel):
            for name in ("video_args_preprocessor", "audio_args_preprocessor"):
                preprocessor = getattr(module, name, None)
                simple = getattr(preprocessor, "simple_preprocessor", preprocessor)
                if isinstance(simple, TransformerArgsPreprocessor):
                    simple._prepare_timestep = types.MethodType(  # type: ignore[method-assign]
                        _prepare_timestep_by_value, simple
                    )
    return model


TIMESTEPS_BY_VALUE = ModuleOps(
    name="timesteps_by_value",
    matcher=lambda model: any(isinstance(m, LTXModel) for m in model.modules()),
    mutator=timesteps_by_value,
)


def gemma_config_path(gemma_root: Path) -> Path | None:
    found = sorted(gemma_root.rglob("config.json"))
    return found[0] if found else None


class GemmaFromConfigJson(GemmaTextEncoderConfigurator):
    """Gemma 3 from the root's config.json, text only.

    Prompt encoding runs ``model.model`` on token ids alone: the vision tower and its
    projector (0.42 B parameters, 0.78 GiB in bf16) are never called, so they are not
    built and their weights are never read (``GEMMA_TEXT_KEY_OPS``).
    """

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GemmaTextEncoder:
        if not config:
            return super().from_config(config)
        with torch.device("meta"):
            model = Gemma3ForConditionalGeneration(Gemma3Config.from_dict(config))
        model.model.vision_tower = None
        model.model.multi_modal_projector = None
        return GemmaTextEncoder(model=model)


# ltx-core's GEMMA_LLM_KEY_OPS less the vision tower and projector keys; the tied lm_head
# still takes embed_tokens (the same tensor, no copy), or the builder would find it on meta.
GEMMA_TEXT_KEY_OPS = (
    SDOps("GEMMA_TEXT_KEY_OPS")
    .with_matching(prefix="language_model.model.")
    .with_replacement("language_model.model.", "model.model.language_model.")
    .with_kv_operation(
        operation=lambda key, value: [
            KeyValueOperationResult(key, value),
            KeyValueOperationResult("model.lm_head.weight", value),
        ],
        key_prefix="model.model.language_model.embed_tokens.weight",
    )
)


def populate_language_model(module: GemmaTextEncoder) -> GemmaTextEncoder:
    """ltx-core's ``create_and_populate`` less its vision-tower buffer: the tower is not built."""
    model = module.model
    language_model = model.model.language_model
    config = model.config.text_config
    dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    local_rope_freqs = 1.0 / (config.rope_local_base_freq**exponents)
    inv_freqs, _ = ROPE_INIT_FUNCTIONS[config.rope_scaling["rope_type"]](config)
    embed_scale = torch.tensor(config.hidden_size**0.5, device="cpu")
    language_model.embed_tokens.register_buffer("embed_scale", embed_scale)
    language_model.rotary_emb_local.register_buffer("inv_freq", local_rope_freqs)
    language_model.rotary_emb.register_buffer("inv_freq", inv_freqs)
    return module


GEMMA_TEXT_MODEL_OPS = GEMMA_MODEL_OPS._replace(name="GemmaTextModel", mutator=populate_language_model)


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


# Every builder ModelLedger may make; each reads through the ledger's store.
BUILDERS = (
    "transformer_builder", "vae_decoder_builder", "vae_encoder_builder", "audio_encoder_builder",
    "audio_decoder_builder", "vocoder_builder", "embeddings_processor_builder", "text_encoder_builder",
    "upsampler_builder",
)


class LtxLedger(ModelLedger):
    """ModelLedger whose Gemma builders honour the Gemma root; every model is checked for meta weights.

    All builders read through ``store``. With ``used_keys_only`` (the default) each reads
    only the keys its model holds; ``False`` keeps ltx-core's reads (every key the SDOps
    match), which the loading benchmark measures side by side.
    """

    def __init__(
        self,
        dtype: torch.dtype,
        device: torch.device,
        checkpoint_path: str | None = None,
        gemma_root_path: str | None = None,
        spatial_upsampler_path: str | None = None,
        loras: tuple[LoraPathStrengthAndSDOps, ...] = (),
        registry: Registry | None = None,
        quantization: Any = None,
        *,
        store: WeightStore | None = None,
        used_keys_only: bool = True,
    ) -> None:
        # ModelLedger.__init__ calls build_model_builders, which needs these.
        self.store = store if store is not None else WeightStore()
        self.used_keys_only = used_keys_only
        super().__init__(
            dtype=dtype, device=device, checkpoint_path=checkpoint_path, gemma_root_path=gemma_root_path,
            spatial_upsampler_path=spatial_upsampler_path, loras=loras, registry=registry,
            quantization=quantization,
        )

    def build_model_builders(self) -> None:
        super().build_model_builders()
        if hasattr(self, "transformer_builder"):
            self.transformer_builder: Any = replace(
                self.transformer_builder,
                module_ops=(*self.transformer_builder.module_ops, CHUNKED_FEED_FORWARD, TIMESTEPS_BY_VALUE),
            )
        if self.gemma_root_path is not None and hasattr(self, "text_encoder_builder"):
            root = Path(self.gemma_root_path)
            config_path = gemma_config_path(root)
            config = json.loads(config_path.read_text()) if config_path else {}
            self.text_encoder_builder: Any = replace(
                self.text_encoder_builder,
                model_class_configurator=GemmaFromConfigJson,
                # Hugging Face Gemma shards carry no config metadata: the root's config.json stands in.
                model_loader=StoreLoader(self.store, config=config),
                model_sd_ops=GEMMA_TEXT_KEY_OPS,
                module_ops=tuple(
                    GEMMA_TEXT_MODEL_OPS if op is GEMMA_MODEL_OPS else op
                    for op in self.text_encoder_builder.module_ops
                ),
            )
            self.embeddings_processor_builder: Any = replace(
                self.embeddings_processor_builder, model_class_configurator=EmbeddingsProcessorForGemma.for_root(root)
            )
        if not self.used_keys_only:
            return
        for name in BUILDERS:
            builder = getattr(self, name, None)
            if builder is None:
                continue
            loader = builder.model_loader
            if not isinstance(loader, StoreLoader):
                # The fp8-cast transformer is the one build whose prepared copy is smaller than its
                # source (18 GiB for 42 GB); the others would be copies of their files
                # (docs/DESIGN.md, 'Prepared weights and staging').
                prepare = name == "transformer_builder" and self.quantization is not None
                loader = StoreLoader(self.store, prepare=prepare)
            setattr(self, name, replace(UsedKeysBuilder.of(builder), model_loader=loader))

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
            store=self.store,
            used_keys_only=self.used_keys_only,
        )

    def transformer(self) -> Any:
        model = _loaded(super().transformer, "transformer", "checkpoint")
        if self.quantization is None:
            # ltx-core casts the state dict to the ledger's dtype only when no LoRA is fused.
            model = model.to(self.dtype)
        return model

    def transformer_with_loras(self, loras: tuple[LoraPathStrengthAndSDOps, ...], kept: Any = None) -> Any:
        """The transformer with ``loras`` added: ``kept`` (a transformer this ledger built) fused in place,
        or, without one, a fresh build from the checkpoint as ltx-pipelines makes it.

        Both give the same tensors (``fuse_loras_in_place``); the first reads only the
        LoRA files. A ledger that already fuses LoRAs builds afresh: ltx-core sums all
        deltas before one rounding, which fusing on top would not reproduce.
        """
        if kept is None or self.loras:
            return self.with_additional_loras(loras).transformer()
        # The quantized build passes no dtype to ltx-core (model_ledger.py), the plain one the ledger's.
        fuse_loras_in_place(
            kept.velocity_model, self.transformer_builder, loras, None if self.quantization else self.dtype
        )
        return kept

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
