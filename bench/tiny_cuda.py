"""Run the real generator on the tiny checkpoint on CUDA, once per pipeline kind.

``python -m bench.tiny_cuda OUT_DIR`` writes ``tiny_cuda.json``: per run, the exit
status, the mp4's frames/size/audio as read back, and every phase's peaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from generator.encode import probe
from generator.protocol import JobSpec, parse_event
from generator.tiny import write_tiny_models

RUNS = [
    ("two_stage", True, True),
    ("two_stage", False, True),
    ("distilled", True, False),
    ("one_stage", True, True),
]


def main() -> int:
    out = Path(sys.argv[1])
    work = out.parent / "tiny-work"
    work.mkdir(parents=True, exist_ok=True)
    models = write_tiny_models(work / "models")
    image = work / "in.png"
    Image.new("RGB", (256, 192), (90, 140, 200)).save(image)
    results = []
    for kind, fp8, audio in RUNS:
        spec = JobSpec.model_validate({
            "request": {"prompt": "a cat walks on the beach", "width": 256, "height": 192, "frames": 25,
                        "steps": 4, "seed": 7, "pipeline": kind, "audio": audio},
            "image_path": str(image), "output_path": str(work / f"{kind}-{fp8}.mp4"),
            "models": {"checkpoint": str(models.checkpoint), "distilled_checkpoint": str(models.checkpoint),
                       "distilled_lora": str(models.distilled_lora),
                       "spatial_upsampler": str(models.spatial_upsampler), "gemma_root": str(models.gemma_root)},
            "tiling": {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16,
                       "temporal_overlap_frames": 8},
            "fp8_cast": fp8, "device": "cuda",
        })
        spec_path = work / f"{kind}-{fp8}.json"
        spec_path.write_text(spec.model_dump_json())
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "generator", str(spec_path)], capture_output=True, text=True)
        wall = time.perf_counter() - started
        events = [parse_event(line).model_dump(mode="json") for line in proc.stdout.splitlines() if line.strip()]
        entry = {"pipeline": kind, "fp8_cast": fp8, "audio": audio, "exit": proc.returncode, "wall_seconds": wall,
                 "events": [e for e in events if e["event"] in {"started", "phase", "error"}]}
        if proc.returncode == 0:
            entry["probe"] = probe(spec.output_path)
        else:
            entry["stderr_tail"] = proc.stderr[-3000:]
        results.append(entry)
        print(kind, fp8, proc.returncode, f"{wall:.1f}s", entry.get("probe"), flush=True)
    (out / "tiny_cuda.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
