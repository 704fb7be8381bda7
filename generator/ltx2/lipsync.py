"""Lip-sync: ltx-pipelines' ``A2VidPipelineTwoStage`` composed into the project's run.

The user's audio track (already through the bot's audio intake: a stereo 16-bit WAV in the
uploads folder, as long as the clip) is encoded by the audio VAE and held fixed while both
stages denoise the video around it: the audio latent enters with no noise and a zero
denoise mask, so every step's cross-attention sees the real sound. Stage 1 is guided on the
video only (the audio guider has ltx-core's default, neutral parameters and no negative
prompt, as in the stock class); stage 2 is the distilled refine. The clip carries the user's
own samples, not a VAE round trip of them, as the stock class returns them.

Prompts, image conditioning, the transformer reuse, the upsample, the tiled decode and the
streaming encode are the shared stage functions of ``generator/ltx2/pipeline.py``;
``tests/test_lipsync.py`` checks frames and audio against the stock class bit for bit
(docs/DESIGN.md, 'Lip-sync').
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ltx_core.components.guiders import MultiModalGuiderParams, create_multimodal_guider_factory
from ltx_core.model.audio_vae import encode_audio as vae_encode_audio
from ltx_core.types import AudioLatentShape
from ltx_pipelines.utils.helpers import noise_audio_state, noise_video_state
from ltx_pipelines.utils.media_io import decode_audio_from_file

from generator.protocol import DoneEvent

if TYPE_CHECKING:
    from generator.ltx2.pipeline import _Run


@dataclass(frozen=True)
class FrozenAudio:
    """The audio "state" a lip-sync stage hands on: its latent is the user's, unchanged."""

    latent: torch.Tensor


def audio_track(run: _Run) -> tuple[Any, torch.Tensor]:
    """The user's audio as ltx-pipelines reads it (clipped to the clip's duration) and its latent,
    cut to the clip's audio-latent length."""
    spec, req, tracker = run.spec, run.spec.request, run.tracker
    assert spec.audio_path is not None, "protocol.py requires audio_path for lipsync"
    duration = req.frames / req.fps
    with tracker.phase("audio_encode"):
        run.progress("encoding audio", 0, 1)
        decoded = decode_audio_from_file(str(spec.audio_path), run.device, 0.0, duration)
        if decoded is None:
            raise ValueError("audio_file: the audio upload has no audio stream")
        encoder = tracker.watch(run.ledger.audio_encoder(), "audio encoder")
        latent = vae_encode_audio(decoded, encoder)
        del encoder
        shape = AudioLatentShape.from_duration(batch=1, duration=duration, channels=8, mel_bins=16)
        latent = latent[:, :, : shape.frames]
    return decoded, latent


def video_only(
    *,
    output_shape: Any,
    conditionings: list[Any],
    noiser: Any,
    sigmas: torch.Tensor,
    stepper: Any,
    denoising_loop_fn: Any,
    components: Any,
    dtype: torch.dtype,
    device: torch.device,
    noise_scale: float = 1.0,
    initial_video_latent: torch.Tensor | None = None,
    initial_audio_latent: torch.Tensor | None = None,
) -> tuple[Any, FrozenAudio]:
    """ltx-pipelines' ``denoise_video_only``, returning the frozen audio latent beside the video state.

    Same calls in the same order: the video noise is drawn first, then the audio's (at scale
    0, but it still advances the shared generator, which the decoder's noise follows).
    """
    assert initial_audio_latent is not None, "lipsync always carries the user's audio latent"
    video_state, video_tools = noise_video_state(
        output_shape=output_shape, noiser=noiser, conditionings=conditionings, components=components,
        dtype=dtype, device=device, noise_scale=noise_scale, initial_latent=initial_video_latent,
    )
    audio_state, _ = noise_audio_state(
        output_shape=output_shape, noiser=noiser, conditionings=[], components=components,
        dtype=dtype, device=device, noise_scale=0.0, initial_latent=initial_audio_latent,
    )
    audio_state = replace(audio_state, denoise_mask=torch.zeros_like(audio_state.denoise_mask))
    video_state, _ = denoising_loop_fn(sigmas, video_state, audio_state, stepper)
    video_state = video_tools.clear_conditioning(video_state)
    video_state = video_tools.unpatchify(video_state)
    return video_state, FrozenAudio(initial_audio_latent)


def render(run: _Run) -> DoneEvent:
    """Prompts and image, the audio encode, stage 1 (video guided, audio frozen), upsample and
    stage 2 (audio frozen), then the decode, with the user's samples as the clip's sound."""
    from generator.ltx2.pipeline import encode_inputs, finish, refine, stage_1  # the pipeline imports this module

    cond_1, cond_2 = encode_inputs(run)
    decoded, latent = audio_track(run)
    # The stock class guides the video with the checkpoint's parameters and the negative prompt,
    # and the audio with ltx-core's defaults and no negative context (a2vid_two_stage.py).
    v_neg = run.contexts[1].video_encoding
    guiders = (
        create_multimodal_guider_factory(params=run.params.video_guider_params, negative_context=v_neg),
        create_multimodal_guider_factory(params=MultiModalGuiderParams()),
    )
    video_state, _ = stage_1(
        run, cond_1, keep_transformer=run.reuse, driver=video_only, guider_factories=guiders,
        initial_audio_latent=latent,
    )
    video_state, _ = refine(run, video_state, FrozenAudio(latent), cond_2, driver=video_only)
    del latent
    waveform = decoded.waveform.squeeze(0).float().cpu().numpy()
    track = (np.ascontiguousarray(waveform), int(decoded.sampling_rate))
    del decoded
    return finish(run, video_state, None, audio_track=track)
