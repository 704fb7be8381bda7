"""H.264 + AAC mp4 writing with PyAV: frames are encoded as the decoder yields them.

``+faststart`` puts the index first so Discord plays the clip inline; when the file
is over the delivery limit it is re-encoded at a bitrate computed to fit.

Encoding overlaps decoding (docs/DESIGN.md, 'Decode and encode overlapped'): the caller's
thread pulls the next chunk from the decoder (all torch work stays there, inside the
scope) while one encoder thread converts the previous chunk's frames to YUV on a few
threads and feeds them to libx264 in order. Only numpy arrays cross threads, and at most
one chunk waits while another encodes, so the whole clip is never held.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from generator import faults
from generator.protocol import DoneEvent, JobSpec, PhaseEvent

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from generator.phases import PhaseTracker

log = logging.getLogger(__name__)

MP4_OPTIONS = {"movflags": "+faststart"}
# Below about 0.05 bits per pixel H.264 turns into mush: refuse rather than deliver that.
MIN_BITS_PER_PIXEL = 0.04
AUDIO_BITRATE = 128_000
# False: each chunk is encoded before the next is decoded (the reference the benchmark compares).
OVERLAP = True
# RGB -> YUV conversions of one chunk run on this many threads (swscale releases the GIL).
CONVERT_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
# libx264 threads by frame: 1.51 vs 2.01 s (SLICE, PyAV's default) for 97 frames at 1024x768 and
# 3.91 vs 5.14 s for 121 at 1536x1024 on the H200 machine's 16 cores, files 1.3-1.6% smaller
# (bench/encode_threads.py; bench/results/h200-speed-3/).
X264_THREAD_TYPE = "FRAME"
# Reading a clip back decodes with frame threads as well: a frame-threaded file has one slice per
# frame, so the decoder's default (slice threads) ran on one core, and the probe of every finished
# clip took 4.0 s at 1024x768x97 and 10.2 s at 1536x1024x121 in the H200 jobs (0.6-0.9 s before
# the encoder threaded by frame; bench/results/h200-speed-4/).
DECODE_THREAD_TYPE = "AUTO"


def decoding(container: Any) -> Any:
    """The container's first video stream, set to decode on every core."""
    stream = container.streams.video[0]
    stream.thread_type = DECODE_THREAD_TYPE
    return stream


class ClipTooLargeError(Exception):
    """The clip cannot fit the delivery limit at a watchable quality."""


def partial_path(output: Path) -> Path:
    """Written while encoding, renamed to ``output`` only on success: a crash leaves no clip."""
    return output.with_name(f".{output.stem}.partial{output.suffix}")


def finish_clip(spec: JobSpec, partial: Path, frames_written: int) -> tuple[dict[str, Any], bool]:
    """Check the frame count, fit the delivery limit, move the clip into place; (probe, re-encoded)."""
    if frames_written != spec.request.frames:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"the decoder produced {frames_written} frames, expected {spec.request.frames}")
    reencoded = False
    if spec.max_bytes is not None:
        fitted = partial.with_name(partial.stem + ".fit.mp4")
        try:
            reencoded = fit_to_size(partial, fitted, spec.max_bytes, fps=spec.request.fps)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if reencoded:
            fitted.replace(partial)
    partial.replace(spec.output_path)
    return probe(spec.output_path), reencoded


def stream_clip(
    spec: JobSpec,
    tracker: PhaseTracker,
    chunks: Iterable[np.ndarray],
    progress: Callable[[str, int, int], None],
    audio: tuple[np.ndarray, int] | None = None,
    *,
    overlap: bool | None = None,
) -> DoneEvent:
    """Encode the decoded frames in the ``video_decode`` phase, then fit and place the clip.

    ``chunks`` is lazy: the decoder runs here, as the encoder pulls each chunk, so this
    must be called inside the backend's no-grad scope. It should hold the only references
    to the decoder and the latents, so they are freed when it is exhausted. ``overlap``
    (default ``OVERLAP``) False encodes each chunk before the next is decoded (the same file, bit for bit).
    """
    req = spec.request
    partial = partial_path(spec.output_path)
    spec.output_path.parent.mkdir(parents=True, exist_ok=True)
    writer = ClipWriter(partial, width=req.width, height=req.height, fps=req.fps, crf=spec.crf)
    feed = OverlappedWriter(writer) if (OVERLAP if overlap is None else overlap) else None
    try:
        with tracker.phase("video_decode"):
            if audio is not None:
                writer.write_audio(*audio)
            progress("decoding video", 0, req.frames)
            decoded = 0
            for chunk in chunks:
                if feed is not None:
                    feed.write(chunk)
                else:
                    writer.write_frames(chunk)
                decoded += len(chunk)
                del chunk
                progress("decoding video", decoded, req.frames)
                faults.mid_decode()
            if feed is not None:
                feed.finish()
            writer.close()
            del chunks
    except BaseException:
        if feed is not None:
            feed.stop()
        writer.abort()
        raise

    with tracker.phase("finalize"):
        progress("encoding", 0, 1)
        info, reencoded = finish_clip(spec, partial, writer.frames)
    if tracker.leaks:
        log.warning("models outlived their phase: %s", ", ".join(tracker.leaks))
    return done_event(spec, info, reencoded, tracker.phases, tracker.leaks)


def done_event(
    spec: JobSpec, info: dict[str, Any], reencoded: bool, phases: list[PhaseEvent], leaks: list[str]
) -> DoneEvent:
    req = spec.request
    return DoneEvent(
        output_path=spec.output_path,
        bytes=spec.output_path.stat().st_size,
        frames=info["frames"],
        width=info["width"],
        height=info["height"],
        fps=req.fps,
        duration_seconds=round(req.frames / req.fps, 3),
        has_audio=info["has_audio"],
        reencoded=reencoded,
        phases=list(phases),
        leaked_models=list(leaks),
    )


class ClipWriter:
    def __init__(self, path: Path, *, width: int, height: int, fps: int, crf: int) -> None:
        self.path = path
        self.frames = 0
        self.container: Any = av.open(str(path), mode="w", format="mp4", options=MP4_OPTIONS)
        self.video: Any = self.container.add_stream("libx264", rate=fps)
        self.video.width = width
        self.video.height = height
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(crf), "preset": "medium"}
        self.video.codec_context.thread_type = X264_THREAD_TYPE
        self.audio: Any = None

    def write_audio(self, waveform: np.ndarray, sampling_rate: int) -> None:
        """``waveform``: float (channels, samples) in [-1, 1]; encoded once, before the video."""
        self.audio = self.container.add_stream("aac", rate=sampling_rate)
        self.audio.codec_context.layout = "stereo"
        self.audio.bit_rate = AUDIO_BITRATE
        samples = np.clip(waveform, -1.0, 1.0)
        if samples.ndim == 1:
            samples = np.stack([samples, samples])
        if samples.shape[0] == 1:
            samples = np.concatenate([samples, samples])
        packed = (samples[:2].T * 32767.0).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
        frame.sample_rate = sampling_rate
        frame.pts = 0
        frame.time_base = Fraction(1, sampling_rate)
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sampling_rate)
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            self.container.mux(self.audio.encode(resampled))
        self.container.mux(self.audio.encode(None))

    def check_size(self, chunk: np.ndarray) -> None:
        if tuple(chunk.shape[1:3]) != (self.video.height, self.video.width):
            # PyAV would rescale such frames silently, stretching the picture.
            raise ValueError(f"frames of {chunk.shape[2]}x{chunk.shape[1]} for a "
                             f"{self.video.width}x{self.video.height} clip")

    def write_frames(self, chunk: np.ndarray) -> None:
        """``chunk``: uint8 (frames, height, width, 3)."""
        self.check_size(chunk)
        for rgb in chunk:
            self.write_frame(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"))

    def write_frame(self, frame: Any) -> None:
        """One ``av.VideoFrame``, RGB or already in the stream's YUV format."""
        self.container.mux(self.video.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            log.debug("closing an aborted clip failed", exc_info=True)
        self.path.unlink(missing_ok=True)


def to_yuv(rgb: np.ndarray) -> Any:
    """The conversion ``VideoStream.encode`` makes of an RGB frame, done ahead on another thread."""
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")


class OverlappedWriter:
    """Feeds a ``ClipWriter`` from one encoder thread: at most one chunk encodes while the caller decodes."""

    def __init__(self, writer: ClipWriter, convert_threads: int = CONVERT_THREADS) -> None:
        self.writer = writer
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.converters = ThreadPoolExecutor(convert_threads, thread_name_prefix="yuv")
        self.pending: Future[None] | None = None

    def _encode(self, chunk: np.ndarray) -> None:
        # map keeps the order; the encoder sees exactly the frames, in the order, of the serial path.
        for frame in self.converters.map(to_yuv, chunk):
            self.writer.write_frame(frame)

    def _wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # the encoder's error, if any, surfaces in the caller's thread

    def write(self, chunk: np.ndarray) -> None:
        self.writer.check_size(chunk)
        self._wait()
        self.pending = self.encoder.submit(self._encode, chunk)

    def finish(self) -> None:
        try:
            self._wait()
        finally:
            self.stop()

    def stop(self) -> None:
        """Let the chunk in hand finish (an encode cannot be interrupted) and end the threads."""
        self.encoder.shutdown(wait=True, cancel_futures=True)
        self.converters.shutdown(wait=True, cancel_futures=True)
        self.pending = None


def probe(path: Path) -> dict[str, Any]:
    """Frames, size, fps, duration and audio presence, read back from the file."""
    with av.open(str(path)) as container:
        video = decoding(container)
        frames = sum(1 for _ in container.decode(video))
        has_audio = bool(container.streams.audio)
        return {
            "frames": frames,
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "fps": float(video.average_rate or video.base_rate or 0),
            "duration_seconds": float(container.duration or 0) / av.time_base,
            "has_audio": has_audio,
        }


def fit_to_size(source: Path, target: Path, max_bytes: int, *, fps: int) -> bool:
    """Re-encode ``source`` into ``target`` under ``max_bytes``; False when it already fits."""
    size = source.stat().st_size
    if size <= max_bytes:
        return False
    info = probe(source)
    duration = max(info["frames"] / fps, 1e-3)
    audio_bits = AUDIO_BITRATE * duration if info["has_audio"] else 0
    budget_bits = max_bytes * 8 * 0.92 - audio_bits  # mp4 overhead and rate-control slack
    for attempt in range(3):
        bitrate = int(budget_bits / duration * (0.85**attempt))
        if bitrate / (info["width"] * info["height"] * fps) < MIN_BITS_PER_PIXEL:
            break
        _reencode(source, target, bitrate, fps)
        if target.stat().st_size <= max_bytes:
            log.info("clip re-encoded from %d to %d bytes to fit %d", size, target.stat().st_size, max_bytes)
            return True
        log.info("re-encode at %d bit/s gave %d bytes; trying lower", bitrate, target.stat().st_size)
    target.unlink(missing_ok=True)
    raise ClipTooLargeError(
        f"The clip is {size / 2**20:.1f} MiB and cannot fit {max_bytes / 2**20:.1f} MiB at a watchable quality; "
        "try fewer frames or a smaller size."
    )


def _reencode(source: Path, target: Path, bitrate: int, fps: int) -> None:
    with av.open(str(source)) as inp, av.open(str(target), mode="w", format="mp4", options=MP4_OPTIONS) as out:
        in_video = decoding(inp)
        video = out.add_stream("libx264", rate=fps)
        video.width = in_video.codec_context.width
        video.height = in_video.codec_context.height
        video.pix_fmt = "yuv420p"
        video.bit_rate = bitrate
        video.options = {"maxrate": str(bitrate), "bufsize": str(bitrate * 2), "preset": "medium"}
        video.codec_context.thread_type = X264_THREAD_TYPE
        audio = out.add_stream_from_template(inp.streams.audio[0]) if inp.streams.audio else None
        if audio is not None:
            for packet in inp.demux(inp.streams.audio[0]):
                if packet.dts is not None:
                    packet.stream = audio
                    out.mux(packet)
        for frame in _frames(inp):
            frame.pts = None
            out.mux(video.encode(frame))
        out.mux(video.encode(None))


def _frames(container: Any) -> Iterable[Any]:
    container.seek(0)
    yield from container.decode(video=0)
