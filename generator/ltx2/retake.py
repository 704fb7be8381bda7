"""Retake: a time region of a delivered clip made again, ltx-pipelines' ``RetakePipeline`` composed.

The stock class encodes the whole source clip (video, and audio when it has a track) into
latents, marks the latent frames that overlap ``[start, end)`` seconds for denoising
(``TemporalRegionMask``: ``denoise_mask`` 1 inside, 0 outside, video and audio alike), and runs
one denoising stage at the clip's own size from those latents; outside the region the latents
stay the source's, bit for bit. Guided with the dev checkpoint (``one_stage``) or distilled.
Here the same steps run in the project's own phases (docs/DESIGN.md, 'Retake'): prompts
through the embedding cache, the source encode with each encoder freed before the next model,
the stage with the planner's transformer, and ``finish``'s tiled decode streamed into the
encoder, all inside the run's one inference scope. The stock class is never called; the test
compares with it frame for frame (tests/test_retake.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from ltx_core.components.schedulers import LTX2Scheduler
from ltx_core.types import VideoPixelShape
from ltx_pipelines.retake import TemporalRegionMask, _encode_audio_for_retake
from ltx_pipelines.utils.constants import DISTILLED_SIGMA_VALUES
from ltx_pipelines.utils.helpers import noise_audio_state, noise_video_state
from ltx_pipelines.utils.media_io import decode_audio_from_file, get_videostream_metadata, load_video_conditioning

from generator.checks import SourceClipError

if TYPE_CHECKING:
    from pathlib import Path

    from generator.ltx2.pipeline import _Run
    from generator.protocol import DoneEvent, GenerationRequest

STAGE = "retaking"  # the progress name the card shows


def check_source(path: Path | None, req: GenerationRequest) -> None:
    """The source clip is there and is the clip the request describes (its frames and fps); before any model loads.

    A size that differs is fitted by the stock loader (resize and centre crop), as for any clip.
    """
    if path is None or not path.is_file():
        raise SourceClipError("the clip to retake is no longer stored")
    try:
        fps, frames, _width, _height = get_videostream_metadata(str(path))
    except Exception as exc:  # PyAV raises its own error types for a file it cannot read
        raise SourceClipError(f"the clip to retake cannot be read ({type(exc).__name__})") from None
    if round(fps, 3) != req.fps:
        raise SourceClipError(f"the clip runs at {fps:g} fps, not the {req.fps} the job says")
    if frames < req.frames:
        raise SourceClipError(f"the clip has {frames} frames, fewer than the {req.frames} the job says")


def masked_states(audio_conditionings: list[Any]) -> Any:
    """ltx-pipelines' ``denoise_audio_video`` with conditionings on the audio state too (the retake's mask).

    The stock helper gives audio none; the retake class noises video then audio from the one
    generator, as this does, so the random stream is the same.
    """
    def states(
        output_shape: VideoPixelShape, conditionings: list[Any], noiser: Any, sigmas: torch.Tensor, stepper: Any,
        denoising_loop_fn: Any, components: Any, dtype: torch.dtype, device: torch.device,
        initial_video_latent: torch.Tensor | None = None, initial_audio_latent: torch.Tensor | None = None,
    ) -> tuple[Any, Any]:
        video_state, video_tools = noise_video_state(
            output_shape=output_shape, noiser=noiser, conditionings=conditionings, components=components,
            dtype=dtype, device=device, initial_latent=initial_video_latent,
        )
        audio_state, audio_tools = noise_audio_state(
            output_shape=output_shape, noiser=noiser, conditionings=audio_conditionings, components=components,
            dtype=dtype, device=device, initial_latent=initial_audio_latent,
        )
        video_state, audio_state = denoising_loop_fn(sigmas, video_state, audio_state, stepper)
        video_state = video_tools.unpatchify(video_tools.clear_conditioning(video_state))
        audio_state = audio_tools.unpatchify(audio_tools.clear_conditioning(audio_state))
        return video_state, audio_state

    return states


def encode_source(run: _Run, shape: VideoPixelShape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The source clip's video latent, and its audio latent (None when the clip has no audio track)."""
    spec, req, tracker, ledger = run.spec, run.spec.request, run.tracker, run.ledger
    source = str(spec.source_video_path)
    with tracker.phase("source_encode"):
        run.progress("reading the clip", 0, 1)
        encoder = tracker.watch(ledger.video_encoder(), "video encoder")
        pixels = load_video_conditioning(
            video_path=source, height=req.height, width=req.width, frame_cap=req.frames, dtype=run.dtype,
            device=run.device,
        )
        video_latent = encoder(pixels)
        del encoder, pixels
        audio_latent = None
        audio_in = decode_audio_from_file(source, run.device)
        if audio_in is not None:
            audio_encoder = tracker.watch(ledger.audio_encoder(), "audio encoder")
            audio_latent = _encode_audio_for_retake(
                audio_encoder=audio_encoder, waveform=audio_in.waveform.squeeze(0),
                waveform_sr=audio_in.sampling_rate, output_shape=shape, dtype=run.dtype,
            )
            del audio_encoder
        del audio_in
    return video_latent, audio_latent


def render(run: _Run) -> DoneEvent:
    from generator.ltx2.pipeline import encode_prompts, finish, preparer  # the pipeline imports this module

    spec, req, tracker, device = run.spec, run.spec.request, run.tracker, run.device
    assert req.retake_start is not None and req.retake_end is not None
    check_source(spec.source_video_path, req)
    # The stock class reads fps from the file as a float; check_source made sure it is the request's.
    fps = float(req.fps)
    shape = VideoPixelShape(batch=1, frames=req.frames, width=req.width, height=req.height, fps=fps)
    encode_prompts(run)
    video_latent, audio_latent = encode_source(run, shape)
    video_mask = [TemporalRegionMask(start_time=req.retake_start, end_time=req.retake_end, fps=fps)]
    # Without a source track the stock class leaves the audio unmasked (all of it new), as here.
    audio_mask = [] if audio_latent is None else [
        TemporalRegionMask(start_time=req.retake_start, end_time=req.retake_end, fps=fps)]

    with tracker.phase("stage_1"):
        transformer = tracker.watch(preparer(spec)(run.ledger.transformer()), "transformer")
        if run.guided:
            steps = req.steps or run.params.num_inference_steps
            sigmas = LTX2Scheduler().execute(steps=steps).to(dtype=torch.float32, device=device)
        else:
            sigmas = torch.tensor(DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)
        video_state, audio_state = run.denoise(
            STAGE, transformer, sigmas, shape, video_mask, guided=run.guided, steps_params=run.params,
            driver=masked_states(audio_mask), initial_video_latent=video_latent, initial_audio_latent=audio_latent,
        )
        del transformer, video_latent, audio_latent
    return finish(run, video_state, audio_state)
