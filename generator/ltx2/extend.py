"""Extend: a new segment that continues a delivered clip, joined to it into one longer clip.

The new segment is an ordinary run of the request's pipeline (``generator/ltx2/pipeline.py``:
the same phases, tracker, scope and streaming encode) whose conditioning images are the clip's
last frames (docs/DESIGN.md, 'Extend'). Its first ``EXTEND_OVERLAP_FRAMES`` frames stand for the
clip's last ones: frames 0, 4 and 8 of the overlap condition it through ltx-pipelines'
``combined_image_conditionings`` (frame 0 replaces the first latent frame, the others are guiding
keyframes), so a ``two_stage`` extension is ``TI2VidTwoStagesPipeline`` given those three images,
step for step. The join streams the clip's own decoded frames into the encoder, then the
segment's frames after the overlap, as the decoder yields them; the audio crossfades over the
overlap (the stock image pipelines do not condition audio, so the segment's sound is new).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from ltx_pipelines.utils.args import ImageConditioningInput
from ltx_pipelines.utils.helpers import combined_image_conditionings
from PIL import Image

from generator.checks import SourceClipError
from generator.encode import decoding
from generator.ltx2.hq import hq_stages
from generator.protocol import EXTEND_OVERLAP_FRAMES

if TYPE_CHECKING:
    from generator.ltx2.pipeline import _Run
    from generator.protocol import DoneEvent, JobSpec

# Which of the overlap's frames condition the segment: its first (the latent frame it replaces), a
# middle one and the clip's very last frame, so the model sees the motion, not one still.
CONDITION_FRAMES = (0, 4, 8)
# The clip's frames go to the encoder in chunks of this many (the whole clip is never held).
SOURCE_CHUNK = 16

AudioTrack = tuple[np.ndarray, int]


@dataclass(frozen=True)
class SourceClip:
    path: Path
    frames: int
    tail: list[np.ndarray]  # the last EXTEND_OVERLAP_FRAMES frames, RGB uint8


def read_source(spec: JobSpec) -> SourceClip:
    """Decode the delivered clip once: check it is the clip the request describes, keep its last frames."""
    req, path = spec.request, spec.source_video_path
    if path is None or not path.is_file():
        raise SourceClipError("the delivered clip is no longer stored")
    tail: deque[np.ndarray] = deque(maxlen=EXTEND_OVERLAP_FRAMES)
    count = 0
    try:
        with av.open(str(path)) as container:
            stream = decoding(container)
            size, rate = (stream.codec_context.width, stream.codec_context.height), stream.average_rate
            for frame in container.decode(stream):
                tail.append(frame.to_ndarray(format="rgb24"))
                count += 1
    except (av.error.FFmpegError, IndexError) as exc:
        raise SourceClipError(f"the delivered clip could not be read ({exc})") from None
    if size != (req.width, req.height) or rate is None or float(rate) != req.fps:
        raise SourceClipError(f"the clip is {size[0]}x{size[1]} at {float(rate or 0):g} fps, the request says "
                              f"{req.width}x{req.height} at {req.fps} fps")
    if count != req.source_frames:
        raise SourceClipError(f"the clip has {count} frames, the request says {req.source_frames}")
    return SourceClip(path=path, frames=count, tail=list(tail))


def conditioning_inputs(spec: JobSpec, source: SourceClip) -> list[ImageConditioningInput]:
    """The overlap's conditioning frames as lossless PNGs in the job folder, at their frame in the segment."""
    folder = spec.output_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in CONDITION_FRAMES:
        path = folder / f"extend-context-{index}.png"
        Image.fromarray(source.tail[index]).save(path)
        images.append(ImageConditioningInput(str(path), index, 1.0))
    return images


def render(run: _Run) -> DoneEvent:
    """The segment through the request's own stages, then the join into one clip of ``total_frames``."""
    from generator.ltx2.pipeline import encode_inputs, finish, refine, stage_1  # the pipeline imports this module

    spec = run.spec
    source = read_source(spec)
    cond_1, cond_2 = encode_inputs(run, chosen=(conditioning_inputs(spec, source), combined_image_conditionings))
    if run.kind == "two_stage_hq":
        video_state, audio_state = hq_stages(run, cond_1, cond_2, *run.stage_1_size())
    else:
        video_state, audio_state = stage_1(run, cond_1, keep_transformer=run.reuse)
        if run.two_stages:
            video_state, audio_state = refine(run, video_state, audio_state, cond_2)
    joined = spec.model_copy(update={"request": spec.request.model_copy(
        update={"frames": spec.request.total_frames})})

    def join(frames: Iterator[np.ndarray], audio: AudioTrack | None) -> tuple[Iterator[np.ndarray], AudioTrack | None]:
        return join_segment(source, spec.request.fps, frames, audio)

    return finish(run, video_state, audio_state, joined, join=join)


def join_segment(
    source: SourceClip, fps: int, segment: Iterator[np.ndarray], audio: AudioTrack | None
) -> tuple[Iterator[np.ndarray], AudioTrack | None]:
    """The clip's frames then the segment's after the overlap (lazily), and the two sound tracks crossfaded."""

    def frames() -> Iterator[np.ndarray]:
        yield from source_frames(source.path)
        skip = EXTEND_OVERLAP_FRAMES
        for chunk in segment:
            dropped = min(skip, len(chunk))
            skip -= dropped
            if len(chunk) > dropped:
                yield chunk[dropped:]

    if audio is None:
        return frames(), None
    waveform, rate = audio
    return frames(), (crossfade(source_audio(source.path, rate), stereo(waveform), source.frames, fps, rate), rate)


def source_frames(path: Path) -> Iterator[np.ndarray]:
    with av.open(str(path)) as container:
        chunk: list[np.ndarray] = []
        for frame in container.decode(decoding(container)):
            chunk.append(frame.to_ndarray(format="rgb24"))
            if len(chunk) == SOURCE_CHUNK:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)


def stereo(waveform: np.ndarray) -> np.ndarray:
    """(2, samples) float32, whatever the vocoder's layout: the clip is written in stereo."""
    samples = np.asarray(waveform, dtype=np.float32)
    while samples.ndim > 2:
        samples = samples[0]
    if samples.ndim == 1:
        samples = samples[None]
    return np.concatenate([samples, samples])[:2] if samples.shape[0] == 1 else samples[:2]


def source_audio(path: Path, rate: int) -> np.ndarray | None:
    """The clip's sound as (2, samples) float32 at ``rate``; None when it has none."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
        parts: list[Any] = []
        for frame in container.decode(audio=0):
            parts += [f.to_ndarray() for f in resampler.resample(frame)]
        parts += [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(parts, axis=1).astype(np.float32) if parts else None


def crossfade(original: np.ndarray | None, segment: np.ndarray, source_frames: int, fps: int, rate: int) -> np.ndarray:
    """The clip's sound to its end, the segment's from its first new frame, equal-power crossfaded over the overlap.

    The segment starts ``EXTEND_OVERLAP_FRAMES`` frames before the clip ends; a clip with no sound
    (none was asked for then) is silence there.
    """
    end = round(source_frames * rate / fps)
    start = round((source_frames - EXTEND_OVERLAP_FRAMES) * rate / fps)
    head = np.zeros((2, end), dtype=np.float32)
    if original is not None:
        head[:, : min(end, original.shape[1])] = original[:, :end]
    overlap = min(end - start, segment.shape[1])
    t = np.linspace(0.0, np.pi / 2, overlap, dtype=np.float32)
    mixed = head[:, start:start + overlap] * np.cos(t) + segment[:, :overlap] * np.sin(t)
    return np.concatenate([head[:, :start], mixed, segment[:, overlap:]], axis=1)
