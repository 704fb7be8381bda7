"""Sniff, check, decode and rebuild an uploaded audio track for /lipsync (docs/DESIGN.md, 'Lip-sync').

The same guards as images: the byte limits are the download's (``bot/intake/download.py``); the
format is read from the bytes (MP3, WAV, M4A, OGG), never from names or declared types; the
samples are decoded by PyAV in a fresh child process (this module run as ``python -m
bot.intake.audio``) under address-space and CPU-time limits it cannot lift, with a wall-clock
timeout on top, and refused as soon as they run past the duration limit, whatever the header
said. What is stored is rebuilt from the samples alone: a 48 kHz stereo 16-bit WAV (tags, cover
art and comments are gone), cut to the clip's length, named by its sha256.

The clip follows the audio: its frame count is the largest 8k+1 whose duration fits inside the
track, capped by ``limits.max_frames``, and the stored track is cut to exactly that duration,
so the posted clip's sound is the track the user sent, as long as the clip.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import bot
from bot.intake.errors import IntakeError
from bot.intake.image import _write_confined

if TYPE_CHECKING:
    from bot.config import Limits

log = logging.getLogger(__name__)

AudioFormat = Literal["mp3", "wav", "m4a", "ogg"]
ALLOWED_AUDIO_TEXT = "Audio must be an MP3, WAV, M4A or OGG file."
# PyAV's demuxer for each format: forced, so libav never probes its way into another format.
DEMUXERS: dict[AudioFormat, str] = {"mp3": "mp3", "wav": "wav", "m4a": "mp4", "ogg": "ogg"}
STORED_RATE = 48000
STORED_CHANNELS = 2
BYTES_PER_SAMPLE = 2 * STORED_CHANNELS
# A header may round; decoded audio this much past the limit is refused.
DURATION_SLACK_SECONDS = 0.25
# Decoded audio this much (and this share) shorter than its header says is a truncated file.
TRUNCATED_SECONDS, TRUNCATED_SHARE = 0.25, 0.05
# ISO base media brands of audio files (an .m4a from phones, iTunes, ffmpeg).
M4A_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"mp42", b"mp41", b"isom", b"iso2", b"iso5", b"dash"}


@dataclass(frozen=True)
class AudioLimits:
    """Per audio file, for the decoder process: address space, CPU time, wall time until it is killed."""

    memory_mib: int = 512
    cpu_seconds: int = 10
    timeout_seconds: float = 20.0

    @classmethod
    def of(cls, limits: Limits) -> AudioLimits:
        return cls(limits.audio_decode_memory_mib, limits.decode_cpu_seconds, limits.decode_timeout_seconds)


@dataclass(frozen=True)
class NormalisedAudio:
    path: Path
    sha256: str
    seconds: float  # the stored track's length: the clip's duration
    source_seconds: float  # what the upload held
    frames: int  # the clip's frame count at the server's fps
    notes: list[str] = field(default_factory=list)
    fresh: bool = True  # this call stored it (no earlier upload had the same samples)


def sniff_audio(data: bytes) -> AudioFormat:
    """The audio type from its first bytes."""
    if not data:
        raise IntakeError("empty", f"That file is empty. {ALLOWED_AUDIO_TEXT}")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data.startswith(b"OggS"):
        return "ogg"
    if data[4:8] == b"ftyp" and data[8:12] in M4A_BRANDS:
        return "m4a"
    if data.startswith(b"ID3") or _mpeg_audio_sync(data):
        return "mp3"
    raise IntakeError("unsupported_type", f"That file is {_describe_other(data)}. {ALLOWED_AUDIO_TEXT}")


def _mpeg_audio_sync(data: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, a version that is not reserved, layer III."""
    return len(data) >= 4 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and (data[1] >> 3) & 3 != 1 \
        and (data[1] >> 1) & 3 == 1 and (data[2] >> 4) not in (0, 15)


def _describe_other(data: bytes) -> str:
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG") or head[8:12] == b"WEBP":
        return "a picture, not audio"
    if head.startswith(b"fLaC"):
        return "FLAC audio (please convert it to MP3, WAV or M4A)"
    if head[4:8] == b"ftyp":
        return "a video or another MP4 file, not an audio file"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a WebM or Matroska file, not an audio file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an audio file we can read"
    return "text, not audio"


def clip_frames(seconds: float, fps: int, max_frames: int) -> int:
    """The largest frame count (8k+1, at most ``max_frames``) whose duration fits inside ``seconds``."""
    fitting = int(seconds * fps + 1e-6)
    frames = (fitting - 1) // 8 * 8 + 1 if fitting >= 1 else 0
    return min(frames, (max_frames - 1) // 8 * 8 + 1)


def normalise_audio(
    data: bytes,
    uploads_dir: Path,
    *,
    max_seconds: float,
    fps: int,
    max_frames: int,
    limits: AudioLimits | None = None,
) -> NormalisedAudio:
    """Check and decode ``data`` in a limited process; store the clip-long WAV under ``uploads_dir``."""
    limits = limits or AudioLimits()
    fmt = sniff_audio(data)
    if fmt == "wav":
        _check_wav_header(data)
    pcm, declared = _decode_in_child(data, fmt, max_seconds, limits)
    source_seconds = len(pcm) / BYTES_PER_SAMPLE / STORED_RATE
    if declared is not None and declared - source_seconds > max(TRUNCATED_SECONDS, TRUNCATED_SHARE * declared):
        raise IntakeError("truncated", f"That {fmt.upper()} file is cut short (its header says {declared:.1f} s, "
                                       f"it holds {source_seconds:.1f} s); try uploading it again.")
    if source_seconds > max_seconds + DURATION_SLACK_SECONDS:
        raise _too_long(max_seconds)
    frames = clip_frames(source_seconds, fps, max_frames)
    if frames < 9:
        raise IntakeError("too_small", f"That audio is {source_seconds:.2f} s long; a clip needs at least "
                                       f"{9 / fps:.2f} s (9 frames at {fps} fps).")
    seconds = frames / fps
    samples = round(seconds * STORED_RATE)
    kept = pcm[: samples * BYTES_PER_SAMPLE]
    buffer = io.BytesIO()
    # The stdlib writer emits a RIFF header, a fmt chunk and the data: no tag can survive.
    with wave.open(buffer, "wb") as out:
        out.setnchannels(STORED_CHANNELS)
        out.setsampwidth(2)
        out.setframerate(STORED_RATE)
        out.writeframes(kept)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    fresh = not (uploads_dir / f"{digest}.wav").exists()
    path = _write_confined(uploads_dir, f"{digest}.wav", payload)
    notes = []
    if source_seconds - seconds > 0.5:
        notes.append(f"the clip covers the first {seconds:.1f} s of your {source_seconds:.1f} s of audio")
    return NormalisedAudio(path, digest, seconds, source_seconds, frames, notes, fresh)


def _too_long(max_seconds: float) -> IntakeError:
    return IntakeError("too_large", f"That audio is longer than this server's {max_seconds:g} s; "
                                    "please trim it and send it again.")


def _check_wav_header(data: bytes) -> None:
    """A WAV's data chunk must fit in the file: a cut-off upload says so before any decoding."""
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            if pos + 8 + size > len(data) and size != 0xFFFFFFFF:  # 0xFFFFFFFF: a stream writer's "unknown"
                raise IntakeError("truncated", f"That WAV file is cut short (its header promises {size} bytes "
                                               f"of audio, it holds {len(data) - pos - 8}); try uploading it again.")
            return
        pos += 8 + size + (size & 1)
    raise IntakeError("corrupt", f"That WAV file has no audio data. {ALLOWED_AUDIO_TEXT}")


def _decode_in_child(
    data: bytes, fmt: AudioFormat, max_seconds: float, limits: AudioLimits
) -> tuple[bytes, float | None]:
    """Run this module's ``main`` on ``data``: the samples as 48 kHz stereo s16, and the header's duration."""
    command = [sys.executable, "-m", "bot.intake.audio", str(limits.memory_mib), str(limits.cpu_seconds)]
    # Only what Python needs: no token reaches the decoder.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(Path(bot.__file__).resolve().parents[1])}
    request = {"fmt": fmt, "max_seconds": max_seconds + DURATION_SLACK_SECONDS}
    timed_out = False
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env)
        except OSError as exc:
            raise RuntimeError(f"the audio decoder could not be started ({exc.strerror})") from None
        try:
            out, _ = proc.communicate(json.dumps(request).encode() + b"\n" + data, limits.timeout_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate()
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - 300))
        stderr_tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
    name = fmt.upper()
    if timed_out or proc.returncode in {-signal.SIGXCPU, -signal.SIGKILL}:
        raise IntakeError("too_large", f"That {name} file takes too long or too much memory to decode; "
                                       "please send a shorter or simpler one.")
    line, _, rest = out.partition(b"\n")
    try:
        reply = json.loads(line)
        ok, code, why = bool(reply["ok"]), str(reply.get("code", "")), str(reply.get("why", ""))
        pcm = rest[: int(reply["pcm_bytes"])]
        declared = float(reply["declared"]) if reply.get("declared") is not None else None
    except (ValueError, KeyError, TypeError):
        log.warning("audio decoder ended with status %s and no answer: %s", proc.returncode, stderr_tail)
        raise IntakeError("corrupt", f"That {name} file crashed the audio decoder, so it can't be used. "
                                     f"{ALLOWED_AUDIO_TEXT}") from None
    if ok and len(pcm) == int(reply["pcm_bytes"]):
        return pcm, declared
    if code == "too_long":
        raise _too_long(max_seconds)
    if why == "video":
        raise IntakeError("unsupported_type", f"That file is a video, not an audio track. {ALLOWED_AUDIO_TEXT}")
    if why == "no_audio":
        raise IntakeError("corrupt", f"That {name} file holds no audio. {ALLOWED_AUDIO_TEXT}")
    if reply.get("detail"):
        log.info("audio decoder refused a %s file: %s", name, reply["detail"])
    raise IntakeError("corrupt", f"That {name} file is incomplete or damaged; try uploading it again.")


class AudioIntake:
    """Runs ``normalise_audio`` off the event loop, at most ``threads`` decoders at once; raises only IntakeError."""

    def __init__(self, uploads_dir: Path, *, threads: int = 2, limits: AudioLimits | None = None) -> None:
        self.uploads_dir = uploads_dir
        self.limits = limits or AudioLimits()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="audio-intake")
        self._slots = asyncio.Semaphore(threads)

    async def normalise(self, data: bytes, *, max_seconds: float, fps: int, max_frames: int) -> NormalisedAudio:
        async with self._slots:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._pool, lambda: normalise_audio(
                    data, self.uploads_dir, max_seconds=max_seconds, fps=fps, max_frames=max_frames,
                    limits=self.limits))
            except IntakeError:
                raise
            except Exception:
                error_id = secrets.token_hex(4)
                log.exception("audio intake failed unexpectedly (error id %s)", error_id)
                raise IntakeError("corrupt", f"Something went wrong while reading that audio (error id {error_id}); "
                                             "please try again, or send it as a WAV or MP3.") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- the decoder process -------------------------------------------------------------


class _Refusal(Exception):
    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code, self.why = code, why


def _decode(data: bytes, fmt: AudioFormat, max_seconds: float) -> tuple[bytes, float | None]:
    import av  # only in the child: the bot's own process never runs a demuxer on a stranger's bytes

    budget = int(max_seconds * STORED_RATE) * BYTES_PER_SAMPLE
    with av.open(io.BytesIO(data), format=DEMUXERS[fmt], metadata_errors="ignore") as container:
        for stream in container.streams.video:
            if not stream.disposition & av.stream.Disposition.attached_pic:  # cover art is not a video
                raise _Refusal("corrupt", "video")
        if not container.streams.audio:
            raise _Refusal("corrupt", "no_audio")
        stream = container.streams.audio[0]
        declared: float | None = None
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            declared = container.duration / 1_000_000
        if declared is not None and declared > max_seconds:
            raise _Refusal("too_long", "header")
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=STORED_RATE)
        pcm = bytearray()
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                pcm += bytes(out.planes[0])[: out.samples * BYTES_PER_SAMPLE]
            if len(pcm) > budget:  # past the limit, whatever the header said
                raise _Refusal("too_long", "samples")
        for out in resampler.resample(None):
            pcm += bytes(out.planes[0])[: out.samples * BYTES_PER_SAMPLE]
    if len(pcm) > budget:
        raise _Refusal("too_long", "samples")
    return bytes(pcm), declared


def main(argv: list[str]) -> int:
    memory = int(argv[0]) * 2**20
    cpu = int(argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it writes no file, only its stdout pipe
    started = time.process_time()
    reply: dict[str, Any]
    pcm = b""
    try:
        stdin = sys.stdin.buffer
        request = json.loads(stdin.readline())
        pcm, declared = _decode(stdin.read(), request["fmt"], float(request["max_seconds"]))
        reply = {"ok": True, "declared": declared}
    except _Refusal as refusal:
        reply = {"ok": False, "code": refusal.code, "why": refusal.why}
    except Exception as exc:  # a stranger's bytes: any failure is an answer, never a traceback
        reply = {"ok": False, "code": "corrupt", "why": "corrupt", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    reply.update(pcm_bytes=len(pcm), cpu_s=round(time.process_time() - started, 3))
    out = sys.stdout.buffer
    out.write(json.dumps(reply).encode() + b"\n" + pcm)
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
