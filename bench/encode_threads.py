"""How long libx264 takes to write a clip's frames with each threading PyAV offers.

``python -m bench.encode_threads --out OUT``: frames like a decoded clip's (a smooth moving
picture with grain) through ``generator.encode.ClipWriter`` at the two benchmark sizes,
with ``X264_THREAD_TYPE`` SLICE (PyAV's default) and FRAME; the seconds, the file sizes and
whether the decoded frames match.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import av
import numpy as np

import generator.encode as encode

SIZES = [(1024, 768, 97), (1536, 1024, 121)]


def frames(width: int, height: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        phase = i / 8.0
        picture = np.stack([np.sin(x / 40 + phase), np.cos(y / 55 - phase), np.sin((x + y) / 70 + phase / 2)], -1)
        grain = rng.normal(0, 6, (height, width, 3))
        out[i] = np.clip(127 + 100 * picture + grain, 0, 255).astype(np.uint8)
    return out


def encode_once(path: Path, clip: np.ndarray, thread_type: str) -> float:
    encode.X264_THREAD_TYPE = thread_type
    writer = encode.ClipWriter(path, width=clip.shape[2], height=clip.shape[1], fps=24, crf=18)
    started = time.perf_counter()
    for start in range(0, len(clip), 8):
        writer.write_frames(clip[start:start + 8])
    writer.close()
    return time.perf_counter() - started


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="a 256x192x17 clip (the CPU test)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for width, height, count in [(256, 192, 17)] if args.small else SIZES:
        clip = frames(width, height, count)
        row: dict[str, object] = {"size": f"{width}x{height}x{count}"}
        for kind in ("SLICE", "FRAME"):
            path = args.out / f"{width}x{height}-{kind}.mp4"
            row[f"{kind}_seconds"] = round(encode_once(path, clip, kind), 3)
            row[f"{kind}_bytes"] = path.stat().st_size
        a, b = (decoded(args.out / f"{width}x{height}-{k}.mp4") for k in ("SLICE", "FRAME"))
        row["frames"] = [len(a), len(b)]
        diffs = [np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b, strict=True)]
        row["max_abs_diff_between_them"] = int(max(diffs))
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "encode_threads.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
