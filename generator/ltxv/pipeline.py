"""The LTX-Video 0.9.x image-to-video run, composed from the ``ltx-video`` package.

Runs only in the LTX-Video interpreter (``.venv-ltxv``): the package pins
``transformers<4.52``, which ltx-core cannot use. Same contract as the LTX-2 backend
(``generator.ltx2.pipeline``): one ``torch.inference_mode()`` scope over the whole run,
the encoder's consumption of the decoded frames included (the package's
multi-scale wrapper has no no-grad of its own); the same phase tracker; each model
built for its phase and freed after it.

The package's ``LTXMultiScalePipeline`` and ``infer()`` are not used as they are:
they run both passes, the upsampler and an eager one-shot decode in one call. Here
the passes are called one by one with precomputed T5 embeddings and
``output_type="latent"`` (T5 is freed before the transformer is built), the latent
upsampler gets its own phase, and the decode is ours: latent-time windows with
context, spatial tiles with blended overlaps, each window streamed into the mp4
encoder, so decode memory stays flat in clip length. The package's own tiling
switches raise on 0.9.1+ VAEs (docs/LIBRARIES.md, 'ltx-video 0.1.2').
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ltx_video.inference import load_image_to_tensor_with_resize_and_crop
from ltx_video.models.autoencoders.causal_video_autoencoder import CausalVideoAutoencoder
from ltx_video.models.autoencoders.latent_upsampler import LatentUpsampler
from ltx_video.models.autoencoders.vae_encode import normalize_latents, un_normalize_latents, vae_decode
from ltx_video.models.transformers.symmetric_patchifier import SymmetricPatchifier
from ltx_video.models.transformers.transformer3d import Transformer3DModel
from ltx_video.pipelines.pipeline_ltx_video import ConditioningItem, LTXVideoPipeline, adain_filter_latent
from ltx_video.schedulers.rf import RectifiedFlowScheduler
from ltx_video.utils.skip_layer_strategy import SkipLayerStrategy
from safetensors import safe_open
from transformers import T5EncoderModel, T5Tokenizer

from generator.checks import main_checkpoint, safetensors_metadata
from generator.encode import stream_clip
from generator.phases import PhaseTracker, run_scoped
from generator.protocol import DoneEvent, JobSpec, PipelineKind, ProgressEvent, Tiling

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]
# Called with the VAE right before the decode (tests hook submodules here).
DECODER_OBSERVERS: list[Callable[[torch.nn.Module], None]] = []

# infer()'s defaults (ltx_video/inference.py: InferenceConfig).
DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"
IMAGE_COND_NOISE_SCALE = 0.15
TEXT_MAX_TOKENS = 256
# From the official multi-scale configs (Lightricks/LTX-Video configs/ltxv-13b-0.9.7-{dev,distilled}.yaml).
DOWNSCALE_FACTOR = 0.6666666
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025
DEV_STEPS = 30
DEV_FIRST_PASS: dict[str, Any] = {
    "guidance_scale": [1, 1, 6, 8, 6, 1, 1],
    "stg_scale": [0, 0, 4, 4, 4, 2, 1],
    "rescaling_scale": [1, 1, 0.5, 0.5, 1, 1, 1],
    "guidance_timesteps": [1.0, 0.996, 0.9933, 0.9850, 0.9767, 0.9008, 0.6180],
    "skip_block_list": [[], [11, 25, 35, 39], [22, 35, 39], [28], [28], [28], [28]],
    "skip_final_inference_steps": 3,
    "cfg_star_rescale": True,
}
DEV_SECOND_PASS: dict[str, Any] = {
    "guidance_scale": [1],
    "stg_scale": [1],
    "rescaling_scale": [1],
    "guidance_timesteps": [1.0],
    "skip_block_list": [27],
    "skip_initial_inference_steps": 3,
    "cfg_star_rescale": True,
}
DISTILLED_FIRST_PASS: dict[str, Any] = {
    "timesteps": [1.0000, 0.9937, 0.9875, 0.9812, 0.9750, 0.9094, 0.7250],
    "guidance_scale": 1,
    "stg_scale": 0,
    "rescaling_scale": 1,
    "skip_block_list": [42],
}
DISTILLED_SECOND_PASS: dict[str, Any] = {**DISTILLED_FIRST_PASS, "timesteps": [0.9094, 0.7250, 0.4219]}


def _only_blocks_below(skip: list[Any], layers: int) -> list[Any]:
    """The official lists name blocks of the 48-layer 13B model; smaller models drop the ones they lack."""
    if skip and isinstance(skip[0], list):
        return [[b for b in blocks if b < layers] for blocks in skip]
    return [b for b in skip if b < layers]


def pass_settings(kind: PipelineKind, steps: int | None, layers: int) -> list[dict[str, Any]]:
    """Keyword arguments of each pipeline pass: two for the multi-scale kinds, one for one_stage."""
    if kind == "distilled":
        passes = [dict(DISTILLED_FIRST_PASS), dict(DISTILLED_SECOND_PASS)]
    else:
        n = steps or DEV_STEPS
        # The official skips are for 30 steps; keep their share when the owner asks for fewer.
        # one_stage runs the whole schedule; the multi-scale first pass leaves its end to the second.
        skip_1 = 0 if kind == "one_stage" else round(DEV_FIRST_PASS["skip_final_inference_steps"] * n / DEV_STEPS)
        passes = [{**DEV_FIRST_PASS, "num_inference_steps": n, "skip_final_inference_steps": skip_1}]
        if kind == "two_stage":
            # The second pass starts from the upsampled latents, so it must skip at least its first (pure noise) step.
            n_2 = max(n, 2)
            skip_2 = max(1, round(DEV_SECOND_PASS["skip_initial_inference_steps"] * n_2 / DEV_STEPS))
            passes.append({**DEV_SECOND_PASS, "num_inference_steps": n_2, "skip_initial_inference_steps": skip_2})
    for settings in passes:
        settings["skip_block_list"] = _only_blocks_below(settings["skip_block_list"], layers)
    return passes


def pass_steps(settings: dict[str, Any]) -> int:
    if "timesteps" in settings:
        return len(settings["timesteps"])
    n = int(settings["num_inference_steps"])
    return n - int(settings.get("skip_initial_inference_steps", 0)) - int(settings.get("skip_final_inference_steps", 0))


def first_pass_size(width: int, height: int) -> tuple[int, int]:
    """As ``LTXMultiScalePipeline``: two thirds of the size, floored to the VAE's 32."""
    w, h = int(width * DOWNSCALE_FACTOR), int(height * DOWNSCALE_FACTOR)
    return w - w % 32, h - h % 32


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return "cpu"


def _read_tensors(path: Path, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Only this model's tensors, straight onto the device.

    The package's ``from_pretrained`` reads every tensor of the single file once per model
    (VAE, transformer and scheduler: three full reads of a 28 GB 13B checkpoint).
    """
    with safe_open(str(path), framework="pt", device=_device_name(device)) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}  # noqa: SIM118


def load_transformer(path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    with torch.device("meta"):
        transformer = Transformer3DModel.from_config(config["transformer"])
    transformer.load_state_dict(_read_tensors(path, "model.diffusion_model.", device), assign=True)
    return transformer.to(device=device, dtype=dtype).eval()


def build_vae(vae_config: dict[str, Any]) -> Any:
    # from_config rewrites the config's "dims" in place: give it a copy.
    return CausalVideoAutoencoder.from_config(copy.deepcopy(vae_config))


def load_vae(path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    vae = build_vae(config["vae"])
    vae.load_state_dict(_read_tensors(path, "vae.", device))
    return vae.to(device=device, dtype=dtype).eval()


def encode_text(
    encoder: Any, tokenizer: Any, text: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``LTXVideoPipeline.encode_prompt`` computes, so the pipeline can run without T5 loaded."""
    tokens = tokenizer(
        text.strip(), padding="max_length", max_length=TEXT_MAX_TOKENS, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    embeds = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds, mask


def load_text_encoder(root: Path, device: torch.device, dtype: torch.dtype) -> Any:
    encoder = T5EncoderModel.from_pretrained(str(root), subfolder="text_encoder", torch_dtype=dtype)
    return encoder.to(device).eval()


def load_upsampler(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    return LatentUpsampler.from_pretrained(str(path)).to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class Loaders:
    """How each model is built. The GPU benchmark swaps in full-size random-weight builders."""

    text_encoder: Callable[[Path, torch.device, torch.dtype], Any] = load_text_encoder
    transformer: Callable[[Path, dict[str, Any], torch.device, torch.dtype], Any] = load_transformer
    vae: Callable[[Path, dict[str, Any], torch.device, torch.dtype], Any] = load_vae
    upsampler: Callable[[Path, torch.device, torch.dtype], Any] = load_upsampler


def generate(
    spec: JobSpec,
    emit: Emit,
    *,
    scope: Callable[[], contextlib.AbstractContextManager[Any]] = torch.inference_mode,
    loaders: Loaders = Loaders(),
) -> DoneEvent:
    """Render one clip.

    ``scope`` is a parameter only so a test can prove what it guards; ``loaders`` only so
    the GPU benchmark (``bench/ltxv_vram.py``) can run this same sequence on full-size models.
    """
    return run_scoped(spec, emit, scope, lambda device, tracker: _generate(spec, device, tracker, emit, loaders))


def _generate(spec: JobSpec, device: torch.device, tracker: PhaseTracker, emit: Emit, loaders: Loaders) -> DoneEvent:
    req = spec.request
    files = spec.ltxv_models
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    checkpoint = main_checkpoint(spec)
    config = json.loads(safetensors_metadata(checkpoint)["config"])
    passes = pass_settings(req.pipeline, req.steps, int(config["transformer"].get("num_layers", 0)))
    multi_scale = len(passes) == 2
    width_1, height_1 = first_pass_size(req.width, req.height) if multi_scale else (req.width, req.height)
    generator = torch.Generator(device=device).manual_seed(req.seed)

    def progress(stage: str, step: int, total: int) -> None:
        emit(ProgressEvent(stage=stage, step=step, total=total))

    with tracker.phase("text_encode"):
        progress("reading the prompt", 0, 1)
        assert files.text_encoder_root is not None
        root = str(files.text_encoder_root)
        tokenizer = T5Tokenizer.from_pretrained(root, subfolder="tokenizer", legacy=True)
        text_encoder = tracker.watch(loaders.text_encoder(files.text_encoder_root, device, dtype), "text encoder")
        negative = req.negative_prompt or DEFAULT_NEGATIVE_PROMPT
        (prompt_embeds, prompt_mask), (negative_embeds, negative_mask) = (
            encode_text(text_encoder, tokenizer, text, device) for text in (req.prompt, negative)
        )
        del text_encoder, tokenizer

    with tracker.phase("stage_1"):
        # The VAE stays to the decode: the pipeline encodes the conditioning image inside each pass.
        vae = tracker.watch(loaders.vae(checkpoint, config, device, dtype), "video VAE", until="video_decode")
        transformer = tracker.watch(
            loaders.transformer(checkpoint, config, device, dtype), "transformer",
            until="stage_2" if multi_scale else "stage_1",
        )
        pipe = LTXVideoPipeline(
            transformer=transformer, patchifier=SymmetricPatchifier(patch_size=1), text_encoder=None,
            tokenizer=None, scheduler=RectifiedFlowScheduler.from_config(config["scheduler"]), vae=vae,
            prompt_enhancer_image_caption_model=None, prompt_enhancer_image_caption_processor=None,
            prompt_enhancer_llm_model=None, prompt_enhancer_llm_tokenizer=None,
            allowed_inference_steps=config.get("allowed_inference_steps"),
        )
        image = load_image_to_tensor_with_resize_and_crop(str(spec.image_path), req.height, req.width)
        conditioning = [ConditioningItem(image.to(device), 0, req.image_strength)]

        def run_pass(stage: str, settings: dict[str, Any], width: int, height: int, **extra: Any) -> torch.Tensor:
            total = pass_steps(settings)
            progress(stage, 0, total)
            result = pipe(
                height=height, width=width, num_frames=req.frames, frame_rate=req.fps,
                prompt=None, negative_prompt=None,
                prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_mask,
                negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask,
                generator=generator, output_type="latent", conditioning_items=conditioning,
                skip_layer_strategy=SkipLayerStrategy.AttentionValues, is_video=True,
                vae_per_channel_normalize=True, image_cond_noise_scale=IMAGE_COND_NOISE_SCALE,
                mixed_precision=False, offload_to_cpu=False, enhance_prompt=False,
                callback_on_step_end=lambda _pipe, i, _t, _kw: progress(stage, i + 1, total),
                **settings, **extra,
            )
            latents: torch.Tensor = result.images
            return latents

        latents = run_pass("generating", passes[0], width_1, height_1)
        if not multi_scale:
            del pipe, transformer

    if multi_scale:
        with tracker.phase("upsample"):
            progress("upsampling", 0, 1)
            assert files.spatial_upsampler is not None
            upsampler = tracker.watch(loaders.upsampler(files.spatial_upsampler, device, dtype), "spatial upsampler")
            # As LTXMultiScalePipeline._upsample_latents, then its AdaIN against the first pass.
            raw = un_normalize_latents(latents, vae, vae_per_channel_normalize=True)
            upsampled = normalize_latents(
                upsampler(raw.to(dtype)).to(latents.dtype), vae, vae_per_channel_normalize=True
            )
            del raw
            upsampled = adain_filter_latent(latents=upsampled, reference_latents=latents)
            del upsampler, latents

        with tracker.phase("stage_2"):
            latents = run_pass("refining", passes[1], width_1 * 2, height_1 * 2, latents=upsampled)
            del pipe, transformer, upsampled

    for observe in DECODER_OBSERVERS:
        observe(vae)
    # Lazy: the windows are decoded inside stream_clip, as the encoder consumes them, inside the scope.
    frames = decode_stream(vae, latents, spec.tiling, generator, (req.height, req.width))
    del vae, latents
    return stream_clip(spec, tracker, frames, progress)


# --- the decode: latent-time windows with context, spatial tiles, streamed -------------------


def decode_stream(
    vae: Any, latents: torch.Tensor, tiling: Tiling, generator: torch.Generator, size: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Yield uint8 (frames, height, width, 3) chunks of the clip, in order, one latent window at a time.

    The decoder is not causal, so each window is decoded with ``context`` latent frames on
    both sides and only its own frames are kept; latent 0 decodes to one frame and every
    later latent to eight (frame ``8k`` is the last frame of latent ``k``).
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timestep: torch.Tensor | None = None
    if vae.decoder.timestep_conditioning:
        # infer()'s decode noise: the model was trained to decode slightly noisy latents.
        latents = latents * (1 - DECODE_NOISE_SCALE) + noise * DECODE_NOISE_SCALE
        timestep = torch.tensor([DECODE_TIMESTEP], device=latents.device)
    del noise
    count = latents.shape[2]
    chunk = max(1, tiling.temporal_frames // 8)
    context = max(1, math.ceil(tiling.temporal_overlap_frames / 8))
    for start in range(0, count, chunk):
        end = min(count, start + chunk)
        lo, hi = max(0, start - context), min(count, end + context)
        pixels = _decode_tiled(vae, latents[:, :, lo:hi], timestep, tiling)
        first = 0 if start == 0 else 8 * (start - 1) + 1
        last = 8 * (end - 1)
        video = pixels[0, :, first - 8 * lo : last - 8 * lo + 1]  # (3, frames, H, W)
        del pixels
        video = (video.float() / 2 + 0.5).clamp(0, 1).transpose(0, 1)  # (frames, 3, H, W)
        if tuple(video.shape[-2:]) != size:
            # LTXMultiScalePipeline renders the second pass at twice the first and resizes the pixels back.
            video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
        yield video.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    weights = torch.ones(length)
    if overlap > 0:
        edge = torch.linspace(0, 1, overlap + 2)[1:-1]
        if fade_in:
            weights[:overlap] = edge
        if fade_out:
            weights[-overlap:] = edge.flip(0)
    return weights


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _decode_tiled(vae: Any, latents: torch.Tensor, timestep: torch.Tensor | None, tiling: Tiling) -> torch.Tensor:
    """Decode (1, C, F, h, w) latents in spatial tiles blended over their overlap; (1, 3, frames, H, W)."""
    h, w = latents.shape[-2:]
    tile = max(1, tiling.spatial_px // 32)
    overlap = min(tiling.spatial_overlap_px // 32, tile - 1)
    if h <= tile and w <= tile:
        whole: torch.Tensor = vae_decode(latents, vae, is_video=True, vae_per_channel_normalize=True, timestep=timestep)
        return whole
    stride = tile - overlap
    rows, cols = _starts(h, tile, stride), _starts(w, tile, stride)
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    for y in rows:
        for x in cols:
            part = vae_decode(latents[..., y : y + tile, x : x + tile], vae, is_video=True,
                              vae_per_channel_normalize=True, timestep=timestep).float()
            scale = part.shape[-1] // min(tile, w - x)
            ph, pw = part.shape[-2:]
            if out is None:
                out = torch.zeros((*part.shape[:3], h * scale, w * scale), device=part.device)
                weight = torch.zeros((h * scale, w * scale), device=part.device)
            assert weight is not None
            mask = torch.outer(
                _ramp(ph, overlap * scale, y > 0, y + tile < h), _ramp(pw, overlap * scale, x > 0, x + tile < w)
            ).to(part.device)
            out[..., y * scale : y * scale + ph, x * scale : x * scale + pw] += part * mask
            weight[y * scale : y * scale + ph, x * scale : x * scale + pw] += mask
            del part
    assert out is not None and weight is not None
    return out / weight
