"""Audio files for the lip-sync tests, written with PyAV's own encoders (and the stdlib for WAV)."""

from __future__ import annotations

import io
import math
import struct
from typing import Any

# Encoder, container format and sample rate for each upload type /lipsync takes.
CODECS: dict[str, tuple[str, str, int]] = {
    "mp3": ("libmp3lame", "mp3", 44100),
    "m4a": ("aac", "ipod", 44100),
    "ogg": ("libopus", "ogg", 48000),
    "wav": ("pcm_s16le", "wav", 22050),
}
SECRET = "SECRET-TAG-4711"


def tone(seconds: float, rate: int, channels: int) -> Any:
    import numpy as np

    t = np.arange(round(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * (220 + 300 * t) * t)).astype(np.float32)
    return np.stack([wave] * channels)


def encoded(kind: str, seconds: float, *, channels: int = 2, metadata: dict[str, str] | None = None) -> bytes:
    """``seconds`` of a gliding tone as ``kind`` (mp3, m4a, ogg, wav), with ``metadata`` as the container's tags."""
    import av

    codec, fmt, rate = CODECS[kind]
    layout = "stereo" if channels == 2 else "mono"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(tone(seconds, rate, channels), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def wav_with_chunks(seconds: float, rate: int = 48000, *, extra: bytes = b"", data_size: int | None = None) -> bytes:
    """A stereo 16-bit WAV built by hand: ``extra`` chunks before the data, and a ``data_size`` that may lie."""
    count = round(seconds * rate)
    samples = b"".join(struct.pack("<hh", int(8000 * math.sin(i / 7)), int(6000 * math.sin(i / 11)))
                       for i in range(count))
    fmt = struct.pack("<HHIIHH", 1, 2, rate, rate * 4, 4, 16)
    size = len(samples) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", size) + samples
    return b"RIFF" + struct.pack("<I", len(body)) + body


def info_chunk(text: str, padding: int = 0) -> bytes:
    """A RIFF LIST/INFO chunk with a title and a comment (and ``padding`` bytes more of comment)."""
    def sub(tag: bytes, value: bytes) -> bytes:
        value += b"\x00"
        return tag + struct.pack("<I", len(value)) + value + (b"\x00" if len(value) % 2 else b"")

    payload = b"INFO" + sub(b"INAM", text.encode()) + sub(b"ICMT", (text + " " + "x" * padding).encode())
    return b"LIST" + struct.pack("<I", len(payload)) + payload
