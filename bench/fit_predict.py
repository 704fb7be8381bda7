"""Fit the memory predictor (``generator/predict.py``) to the benchmark's own measurements.

    python -m bench.fit_predict   # bench/results/*/results.json -> generator/predict_coefficients.json

Per phase, the peak allocated GiB of the unconstrained fp8 two-stage rows (guidance batch 1)
is fitted by least squares as ``intercept + per_token x tokens`` over the phase's token
basis; the phase's streamable blocks (``BLOCKS``: count and bytes, as the streamer packs
them) are taken out of the intercept, so under a budget the predictor can put back only
the blocks the plan keeps. Budgeted rows (``vram_budget_gib`` set), where present, give
the process overhead: the largest whole-process (NVML) figure above the peak reserved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "generator" / "predict_coefficients.json"
GIB = 2**30
BASIS = {"text_encode": "none", "embeddings": "none", "image_encode": "pixels", "stage_1": "stage_1",
         "upsample": "stage_1", "stage_2": "stage_2", "audio_decode": "frames", "video_decode": "pixels",
         "finalize": "none"}
# Streamable blocks at full size: (count, bytes per packed block, bytes of the weights that never stream).
# Gemma's from the streamer on the H200 (the plan's block_bytes); the others from the full-size configs on
# the meta device (fp8-cast transformer blocks stream as fp8: one byte per Linear weight).
SLOTS = {"embeddings": 4}
BLOCKS = {
    "text_encode": (48, 448_297_984, 2_014_000_000),
    # 8 video blocks of 403.0 MB and 8 audio blocks of 100.8 MB: their mean, with two slots per connector.
    "embeddings": (16, 251_922_496, 2_313_695_232),
    "stage_1": (48, 386_990_080, 855_000_000),
    "stage_2": (48, 386_990_080, 855_000_000),
}
# The upsample holds the stage-1 transformer until stage 2 takes it: its own part is fitted on rows
# measured before the transformer was kept (upsample peak under this), the transformer's put on top.
KEPT = {"upsample": "stage_1"}
OWN_UPSAMPLE_MAX_GIB = 5.0
DEFAULT_OVERHEAD_GIB = 0.85  # CUDA context (about 0.6 GiB on an H200) and the allocator's reserve


def _rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for config in data.get("configs", []):
            if config.get("error") or not config.get("fp8_cast", True):
                continue
            rows.append(config)
    return rows


def _tokens(basis: str, row: dict[str, Any]) -> float:
    sys.path.insert(0, str(ROOT))
    from generator.predict import tokens

    return tokens(basis, "two_stage", row["width"], row["height"], row["frames"])


def _lstsq(points: list[tuple[float, float]]) -> tuple[float, float]:
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    n = len(points)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return max(ys), 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - slope * mean_x, max(0.0, slope)


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = [r for r in rows if r.get("vram_budget_gib") is None and r.get("guidance_batch", 1) in (None, 1)]
    phases: dict[str, Any] = {}
    for phase, basis in BASIS.items():
        points = [(_tokens(basis, r), p["peak_allocated_gib"]) for r in base for p in r["phases"]
                  if p["name"] == phase and p.get("peak_allocated_gib") is not None
                  and (phase not in KEPT or p["peak_allocated_gib"] < OWN_UPSAMPLE_MAX_GIB)]
        if not points:
            continue
        intercept, slope = _lstsq(points)
        # The peak must cover every measured row: lift the line to the highest residual.
        intercept += max(y - (intercept + slope * x) for x, y in points)
        count, nbytes, other = BLOCKS.get(phase, (0, 0, 0))
        if phase in KEPT:
            count, nbytes, other = BLOCKS[KEPT[phase]]
            intercept += (count * nbytes + other) / GIB
        model: dict[str, Any] = {"fixed_gib": round(intercept - count * nbytes / GIB, 4),
                                 "per_token_gib": round(slope, 9), "basis": basis,
                                 "block_gib": round(nbytes / GIB, 6), "blocks": count,
                                 "other_gib": round(other / GIB, 4), "slots": SLOTS.get(phase, 2)}
        phases[phase] = model
    batched = [r for r in rows if r.get("vram_budget_gib") is None and (r.get("guidance_batch") or 1) > 1]
    stage_1 = phases.get("stage_1")
    if stage_1 and batched:
        shares = []
        for row in batched:
            found = next(p for p in row["phases"] if p["name"] == "stage_1")
            tokens = _tokens("stage_1", row)
            one = stage_1["fixed_gib"] + stage_1["blocks"] * stage_1["block_gib"] + stage_1["per_token_gib"] * tokens
            shares.append((found["peak_allocated_gib"] - one) / (stage_1["per_token_gib"] * tokens)
                          / (row["guidance_batch"] - 1))
        stage_1["batch_share"] = round(max(shares), 4)
    # NVML is sampled every 50 ms: the whole-process peak of a phase can fall between samples, so the
    # overhead is taken where memory is flat (the finalize phase and the text encode).
    overheads = [p["process_peak_gib"] - p["peak_allocated_gib"] for r in rows for p in r["phases"]
                 if p.get("process_peak_gib") is not None and p.get("peak_allocated_gib") is not None
                 and p["name"] in ("text_encode", "finalize")]
    overhead = max(overheads) if overheads else DEFAULT_OVERHEAD_GIB
    return {"source": "bench/fit_predict.py over bench/results/*/results.json (fp8, two-stage)",
            "process_overhead_gib": round(overhead, 4), "families": {"ltx2": {"phases": phases}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fit_predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results.json files (default: bench/results/*/)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    paths = args.results or sorted(RESULTS.glob("*/results.json"))
    coefficients = fit(_rows(paths))
    args.out.write_text(json.dumps(coefficients, indent=2) + "\n")
    print(f"wrote {args.out} from {len(paths)} result files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
