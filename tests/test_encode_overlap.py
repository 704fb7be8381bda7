"""Encoding overlapped with decoding (``generator/encode.py``): the same file as the serial path."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from generator.protocol import JobSpec

# 4 chunks of 8 frames, one frame short of 33: added last. 256 wide: libx264 (PyAV 18.1's build, 2 cores)
# encoded these frames at 192x128 differently run to run, serial or not, so no file compare could hold there.
WIDTH, HEIGHT, CHUNK, CHUNKS = 256, 128, 8, 4


def _spec(tmp_path: Path, name: str) -> JobSpec:
    return JobSpec.model_validate({
        "request": {"prompt": "waves", "width": WIDTH, "height": HEIGHT, "frames": CHUNK * CHUNKS + 1, "seed": 1,
                    "pipeline": "one_stage"},
        "image_path": str(tmp_path / "in.png"),
        "output_path": str(tmp_path / name / "clip.mp4"),
        "device": "cpu",
    })


def _chunks(alive: list[int] | None = None) -> Iterator[np.ndarray]:
    """Smooth moving gradients with noise (chroma varies, so a wrong YUV conversion shows)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    refs: list[weakref.ref[np.ndarray]] = []
    sizes = [CHUNK] * CHUNKS + [1]
    start = 0
    for size in sizes:
        gc.collect()
        if alive is not None:
            alive.append(sum(ref() is not None for ref in refs))
        frames = []
        for t in range(start, start + size):
            rgb = np.stack([(x * 255 / WIDTH + 9 * t) % 256, (y * 255 / HEIGHT + 5 * t) % 256,
                            (x + y + 3 * t) % 256], axis=-1)
            frames.append(np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8))
        chunk = np.stack(frames)
        refs.append(weakref.ref(chunk))
        start += size
        yield chunk


def _write(tmp_path: Path, name: str, *, overlap: bool, alive: list[int] | None = None) -> Path:
    import torch

    from generator.encode import stream_clip
    from generator.phases import PhaseTracker

    spec = _spec(tmp_path, name)
    audio = (np.sin(np.linspace(0, 300, 2 * 16000)).reshape(2, -1).astype(np.float32) * 0.5, 16000)
    events: list[Any] = []
    done = stream_clip(spec, PhaseTracker(torch.device("cpu"), events.append), _chunks(alive),
                       lambda *a: None, audio, overlap=overlap)
    assert done.frames == CHUNK * CHUNKS + 1
    return spec.output_path


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_overlapped_clip_is_frame_for_frame_the_serial_clip(tmp_path: Path) -> None:
    alive: list[int] = []
    serial = _write(tmp_path, "serial", overlap=False)
    overlapped = _write(tmp_path, "overlapped", overlap=True, alive=alive)
    a, b = _frames(serial), _frames(overlapped)
    assert len(a) == len(b) == CHUNK * CHUNKS + 1
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert serial.read_bytes() == overlapped.read_bytes()  # the same bitstream and container, byte for byte
    # When the next chunk is decoded, at most the one being encoded is still held.
    assert max(alive) <= 1, alive


def test_an_encoder_error_reaches_the_caller_and_leaves_no_clip(tmp_path: Path) -> None:
    import torch

    from generator.encode import partial_path, stream_clip
    from generator.phases import PhaseTracker

    spec = _spec(tmp_path, "bad")

    def chunks() -> Iterator[np.ndarray]:
        yield np.zeros((CHUNK, HEIGHT, WIDTH, 3), np.uint8)
        yield np.zeros((CHUNK, HEIGHT, WIDTH + 32, 3), np.uint8)  # the wrong size

    with pytest.raises(ValueError, match=f"frames of {WIDTH + 32}x{HEIGHT}"):
        stream_clip(spec, PhaseTracker(torch.device("cpu"), lambda e: None), chunks(), lambda *a: None)
    assert not spec.output_path.exists() and not partial_path(spec.output_path).exists()


def test_clips_are_read_back_on_every_core_with_the_same_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libx264 threads by frame (one slice per frame), so a decoder left at its default (slice
    # threads) read every finished clip on one core: 4.0 s of each 1024x768x97 job on the H200.
    import generator.encode as encode

    path = _write(tmp_path, "clip", overlap=False)
    seen: list[str] = []
    real = encode.decoding

    def spy(container: Any) -> Any:
        stream = real(container)
        seen.append(str(stream.thread_type))
        return stream

    monkeypatch.setattr(encode, "decoding", spy)
    assert encode.probe(path)["frames"] == CHUNK * CHUNKS + 1
    assert encode.fit_to_size(path, tmp_path / "fit.mp4", path.stat().st_size // 2, fps=24)
    assert len(seen) >= 2 and all("FRAME" in kind or "AUTO" in kind for kind in seen), seen
    with av.open(str(path)) as container:
        threaded = [f.to_ndarray(format="rgb24") for f in container.decode(real(container))]
    serial = _frames(path)
    assert len(threaded) == len(serial) == CHUNK * CHUNKS + 1
    assert all(np.array_equal(a, b) for a, b in zip(threaded, serial, strict=True))
