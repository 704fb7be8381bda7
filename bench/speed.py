"""Speed levers side by side with today's path, full-size random weights, one process per job.

    python -m bench.speed --out DIR                       # on a CUDA machine (one device call)
    python -m bench.speed --out DIR --tiny --device cpu   # the plumbing on tiny configs

Every job is ``generator.ltx2.pipeline.generate`` through ``bench.vram.run_config`` with
``RandomLedger``, in a freshly spawned process (the compile cache is then on disk only,
as for a real job), one after the other: today's path (serial encode, no embedding cache,
guidance batch 1, eager, fp8_cast); the default-numerics levers at batch 1 (compile with an
empty cache, embedding cache, overlapped encode: the final latents against today's give
compiled-vs-eager numerics); all levers with default numerics (batch 4, warm caches); all
with ``fp8_scaled_mm``; the same at two-stage 1536x1024x121 next to its today's path.
In the ``fp8_scaled_mm`` job the first block's first call is also run with fp8_cast
Linears and bf16 weights (relative error of its output) and timed each way. Whole-clip
compute at 30 steps is the phases' sum with stage 1 extended by its median step.
``--budget-s`` skips jobs that would not finish in time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

FULL_STEPS = 30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3, help="stage-1 steps per job (default 3)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--cache-dir", type=Path, help="compile and embedding caches (default OUT/work/cache)")
    parser.add_argument("--only", nargs="*", help="job labels to run (default: all)")
    return parser


def jobs(tiny: bool) -> list[dict[str, Any]]:
    small = (256, 128, 17) if tiny else (1024, 768, 97)
    large = (384, 256, 25) if tiny else (1536, 1024, 121)
    fp8 = not tiny
    levers = {"compile_blocks": True, "cache": True, "overlap": True}
    eager4 = "batch 4 + cache + overlap (eager)"
    return [
        {"label": "today", "size": small, "fp8": fp8, "batch": 1, "estimate_s": 60},
        {"label": eager4, "size": small, "fp8": fp8, "batch": 4, "cache": True, "overlap": True, "estimate_s": 35},
        # The compile cache starts empty: the first compiled job is the cold one, the next the warm one.
        {"label": "decode alone (no mp4), batch 4 + cache (eager)", "size": small, "fp8": fp8, "batch": 4,
         "cache": True, "decode_only": True, "estimate_s": 35},
        {"label": "all, default numerics (fp8_cast, batch 4), cold compile", "size": small, "fp8": fp8, "batch": 4,
         "numerics_vs": eager4, **levers, "estimate_s": 90},
        {"label": "all, default numerics (fp8_cast, batch 4), warm compile", "size": small, "fp8": fp8, "batch": 4,
         "numerics_vs": eager4, **levers, "estimate_s": 40},
        # The first job's stage 2 shows the compiler the token count and batch changing; from the
        # next job on (its profile is in the cache) stage 1 is traced dynamic in them too.
        {"label": "all, default numerics (fp8_cast, batch 4), warm compile, third job", "size": small, "fp8": fp8,
         "batch": 4, "numerics_vs": eager4, **levers, "estimate_s": 40},
        # CUDA graphs compile the same graphs with other inductor options: the first such job misses
        # the compile cache's graphs but finds the kernels. Replays start at the third step of a
        # stage (warm-up, record, replay): run them with --steps 5 or more.
        {"label": "all + cuda graphs", "size": small, "fp8": fp8, "batch": 4, "cuda_graphs": True,
         "numerics_vs": "all, default numerics (fp8_cast, batch 4), warm compile", **levers, "estimate_s": 60},
        {"label": "all + cuda graphs, warm compile", "size": small, "fp8": fp8, "batch": 4, "cuda_graphs": True,
         "numerics_vs": "all, default numerics (fp8_cast, batch 4), warm compile", **levers, "estimate_s": 40},
        {"label": "all + fp8_scaled_mm", "size": small, "fp8": fp8, "batch": 4, "quantization": "fp8_scaled_mm",
         "probe": True, **levers, "estimate_s": 90},
        {"label": "all + fp8_scaled_mm, warm compile", "size": small, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", **levers, "estimate_s": 40},
        {"label": "all + fp8_scaled_mm + cuda graphs", "size": small, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", "cuda_graphs": True, **levers, "estimate_s": 60},
        {"label": "compile+cache+overlap, batch 1", "size": small, "fp8": fp8, "batch": 1,
         "numerics_vs": "today", **levers, "estimate_s": 90},
        {"label": "large today", "size": large, "fp8": fp8, "batch": 1, "estimate_s": 90},
        {"label": "large all, default numerics", "size": large, "fp8": fp8, "batch": 4, **levers, "estimate_s": 70},
        {"label": "large all + fp8_scaled_mm", "size": large, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", **levers, "estimate_s": 70},
        {"label": "large all + fp8_scaled_mm + cuda graphs", "size": large, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", "cuda_graphs": True, **levers, "estimate_s": 70},
        # Card classes: the same levers under the budget a 48 GB and a 24 GB card would set (README).
        {"label": "all, default numerics, budget 47.5 GiB", "size": small, "fp8": fp8, "batch": 4, "budget": 47.5,
         **levers, "estimate_s": 40},
        {"label": "all, default numerics, budget 23.5 GiB", "size": small, "fp8": fp8, "batch": 4, "budget": 23.5,
         **levers, "estimate_s": 40},
        # The defaults (eager) under the same budgets: what an owner who changes nothing gets.
        {"label": "today, budget 47.5 GiB", "size": small, "fp8": fp8, "batch": 1, "budget": 47.5, "estimate_s": 60},
        {"label": "today, budget 23.5 GiB", "size": small, "fp8": fp8, "batch": 1, "budget": 23.5, "estimate_s": 60},
        {"label": "batch 4 + cache + overlap (eager), budget 23.5 GiB", "size": small, "fp8": fp8, "batch": 4,
         "budget": 23.5, "cache": True, "overlap": True, "estimate_s": 35},
        {"label": "batch 4 + cache + overlap (eager), budget 47.5 GiB", "size": small, "fp8": fp8, "batch": 4,
         "budget": 47.5, "cache": True, "overlap": True, "estimate_s": 35},
        # The large clip as a 24 GB card would run it (the plan: every transformer block resident, a
        # few of Gemma's layers streamed); at 47.5 GiB nothing streams, the plan is the unbudgeted one.
        {"label": "large today, budget 23.5 GiB", "size": large, "fp8": fp8, "batch": 1, "budget": 23.5,
         "estimate_s": 90},
        {"label": "large batch 4 + cache + overlap (eager)", "size": large, "fp8": fp8, "batch": 4, "cache": True,
         "overlap": True, "estimate_s": 50},
        {"label": "large batch 4 + cache + overlap (eager), budget 23.5 GiB", "size": large, "fp8": fp8, "batch": 4,
         "budget": 23.5, "cache": True, "overlap": True, "estimate_s": 50},
        {"label": "large all, default numerics, budget 23.5 GiB", "size": large, "fp8": fp8, "batch": 4,
         "budget": 23.5, **levers, "estimate_s": 60},
        {"label": "eager + fp8_scaled_mm, batch 4, cache, overlap", "size": small, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", "probe": True, "cache": True, "overlap": True, "estimate_s": 35},
        {"label": "large eager + fp8_scaled_mm, batch 4, cache, overlap", "size": large, "fp8": fp8, "batch": 4,
         "quantization": "fp8_scaled_mm", "cache": True, "overlap": True, "estimate_s": 50},
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or out / "work" / "cache"
    results: dict[str, Any] = {"stage_1_steps": args.steps, "jobs": [], "skipped": []}
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # never fork after CUDA
    finals: dict[str, str] = {}
    for job in jobs(args.tiny):
        if args.only and job["label"] not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < job["estimate_s"]:
            results["skipped"].append(job["label"])
            continue
        print(f"running {job['label']}", file=sys.stderr, flush=True)
        latents = out / "work" / f"latents-{len(results['jobs'])}.pt"
        with ctx.Pool(1) as pool:
            try:
                entry = pool.apply_async(run_job, (job, args.tiny, args.device, args.steps, str(out / "work"),
                                                   str(cache), str(latents))).get(timeout=max(left, 1))
            except Exception as exc:  # one job's failure is a row, not the end of the benchmark
                entry = {"name": job["label"], "error": repr(exc)[:500]}
        finals[job["label"]] = str(latents)
        against = job.get("numerics_vs")
        if against and against in finals and not entry.get("error"):
            entry["latents_vs"] = {"against": against, **_latent_diff(finals[against], str(latents))}
        results["jobs"].append(entry)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results))
    print(table(results))
    return 0


def _latent_diff(a: str, b: str) -> dict[str, Any]:
    import torch

    x, y = torch.load(a), torch.load(b)
    return {
        "video_max_abs_diff": float((x[0] - y[0]).abs().max()), "video_abs_max": float(x[0].abs().max()),
        "audio_max_abs_diff": float((x[1] - y[1]).abs().max()), "audio_abs_max": float(x[1].abs().max()),
    }


def run_job(job: dict[str, Any], tiny: bool, device: str, steps: int, work_dir: str, cache_dir: str,
            latents_path: str) -> dict[str, Any]:
    import torch

    import generator.encode as encode
    from bench.random_weights import write_header_models
    from bench.vram import DEFAULT_TILING, TINY_TILING, Config, run_config
    from generator.checks import safetensors_metadata
    from generator.ltx2 import pipeline
    from generator.ltx2.tiny import write_tiny_models

    work, cache = Path(work_dir), Path(cache_dir)
    tiny_files = write_tiny_models(work / "tiny")
    configs = None
    if tiny:
        configs = {
            "checkpoint": json.loads(safetensors_metadata(tiny_files.checkpoint)["config"]),
            "upsampler": json.loads(safetensors_metadata(tiny_files.spatial_upsampler)["config"]),
            "gemma": json.loads((tiny_files.gemma_root / "config.json").read_text()),
        }
    models = write_header_models(work / "models", tiny_files.gemma_root, tiny=configs)
    width, height, frames = job["size"]
    config = Config(job["label"], width, height, frames, job["fp8"])
    extra: dict[str, Any] = {}
    if job.get("compile_blocks"):
        extra |= {"compile_blocks": True, "compile_cache_dir": str(cache / "compile")}
        # As a worker's standby does before its job arrives (not timed; before 2026-12-03's
        # second half these imports fell inside the first step).
        from generator.ltx2.compiled import warm_imports

        warm_imports()
        if job.get("cuda_graphs"):
            extra["cuda_graphs"] = True
    if job.get("cache"):
        extra |= {"embedding_cache_dir": str(cache / "embeddings"), "embedding_cache_bytes": 2**30}
    if job.get("quantization"):
        extra["quantization"] = job["quantization"]
    encode.OVERLAP = bool(job.get("overlap"))
    if job.get("decode_only"):
        _decode_only(encode, width, height, frames)
    kept: list[torch.Tensor] = []
    pipeline.DENOISE_OBSERVERS.append(
        lambda stage, video, audio: kept.extend([video.latent.float().cpu(), audio.latent.float().cpu()])
        if stage == "generating" else None
    )
    probe: dict[str, Any] = {}
    if job.get("probe"):
        _install_probe(probe, device)
    entry = run_config(config, models, work, TINY_TILING if tiny else DEFAULT_TILING, steps, device,
                       guidance_batch=job["batch"], vram_budget_gib=job.get("budget"), extra=extra,
                       label=job["label"])
    if kept:
        torch.save(kept[:2], latents_path)
    entry["job"] = {k: v for k, v in job.items() if k != "estimate_s"}
    entry["clip_compute_seconds_at_30_steps"] = clip_seconds(entry, steps)
    entry["first_steps_excess_seconds"] = first_steps_excess(entry)
    if probe:
        entry["block_probe"] = probe
    if job.get("compile_blocks"):
        from torch._dynamo.utils import counters

        # Graphs traced, and every reason inductor gave for running a graph without CUDA graphs.
        entry["compile_counters"] = {name: dict(counters[name]) for name in ("stats", "inductor")
                                     if name in counters}
    return entry


def clip_seconds(entry: dict[str, Any], steps: int) -> float | None:
    phases = entry.get("phases") or []
    if entry.get("error") or not phases:
        return None
    total = float(sum(p["seconds"] for p in phases))
    median = entry.get("step_seconds", {}).get("generating", {}).get("median")
    if median is not None:
        total += (FULL_STEPS - steps) * median
    return round(total, 2)


def _decode_only(encode: Any, width: int, height: int, frames: int) -> None:
    """The ``video_decode`` phase without libx264: frames are decoded to host arrays and counted
    (the target is decode + encode against decode alone, measured side by side). The sound is
    still encoded, as in every row (an mp4 with no stream is not written at all)."""

    def count(self: Any, chunk: Any) -> None:
        self.check_size(chunk)
        self.frames += len(chunk)

    encode.OVERLAP = False
    encode.ClipWriter.write_frames = count
    encode.fit_to_size = lambda *args, **kwargs: False
    encode.probe = lambda path: {"frames": frames, "width": width, "height": height, "has_audio": True}


def first_steps_excess(entry: dict[str, Any]) -> float | None:
    """How much longer each stage's first step took than its median: compiling (and, eagerly,
    the first kernels' set-up) inside the job's time."""
    stages = entry.get("step_seconds") or {}
    if not stages:
        return None
    return round(sum(float(s["first"]) - float(s["median"]) for s in stages.values() if s.get("median") is not None), 2)


def _install_probe(probe: dict[str, Any], device: str) -> None:
    """On the first block's first call: its output with fp8_scaled_mm, fp8_cast and bf16-widened weights."""
    import torch
    from ltx_core.model.transformer.transformer import BasicAVTransformerBlock

    from generator.ltx2.compiled import Fp8CastLinear
    from generator.ltx2.scaled_mm import ScaledMMLinear

    original = BasicAVTransformerBlock.__call__

    def timed(fn: Any) -> tuple[Any, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, round((time.perf_counter() - t0) / 3, 5)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if probe or not any(isinstance(m, ScaledMMLinear) for m in self.modules()):
            return original(self, *args, **kwargs)
        linears = [m for m in self.modules() if isinstance(m, ScaledMMLinear)]
        eager = lambda: type(self).forward(self, *args, **kwargs)  # noqa: E731
        scaled, t_scaled = timed(eager)
        for m in linears:
            m.__class__ = Fp8CastLinear  # type: ignore[assignment]
        cast, t_cast = timed(eager)
        for m in linears:
            m.__class__ = ScaledMMLinear
        video = kwargs["video"] if "video" in kwargs else args[0]  # ltx-core calls blocks by keyword
        probe.update({"tokens_video": int(video.x.shape[1]), "batch": int(video.x.shape[0]),
                      "eager_block_seconds": {"fp8_scaled_mm": t_scaled, "fp8_cast": t_cast}})
        for name, a, b in (("video", scaled[0].x, cast[0].x), ("audio", scaled[1].x, cast[1].x)):
            probe[f"{name}_relative_error"] = float((a.float() - b.float()).norm() / b.float().norm())
        return original(self, *args, **kwargs)

    BasicAVTransformerBlock.__call__ = call  # type: ignore[method-assign]


def table(results: dict[str, Any]) -> str:
    names = ["text_encode", "embeddings", "stage_1", "stage_2", "audio_decode", "video_decode"]
    lines = [
        f"Stage 1 ran {results['stage_1_steps']} steps per job; clip = phases' sum with stage 1 at 30 steps; "
        "first steps' excess = each stage's first step less its median, summed (compiling lands there).",
        "",
        "| job | size | clip s (30 steps) | first steps' excess s | stage-1 s/step (first) | "
        + " | ".join(names) + " | peak GiB |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for e in results["jobs"]:
        if e.get("error"):
            lines.append(f"| {e['name']} | error: {e['error'][:200]} |")
            continue
        phases = {p["name"]: p for p in e["phases"]}
        step = e["step_seconds"].get("generating", {})
        peak = max((p["peak_allocated_gib"] or 0) for p in e["phases"])
        cells = [f"{phases[n]['seconds']:.2f}" if n in phases else "-" for n in names]
        lines.append(f"| {e['name']} | {e['width']}x{e['height']}x{e['frames']} | "
                     f"{e['clip_compute_seconds_at_30_steps']} | {e.get('first_steps_excess_seconds')} | "
                     f"{step.get('median')} ({step.get('first')}) | "
                     + " | ".join(cells) + f" | {peak:.2f} |")
    for e in results["jobs"]:
        if "latents_vs" in e:
            d = e["latents_vs"]
            lines.append(f"\n{e['name']} vs {d['against']}: final stage-1 latents max abs diff video "
                         f"{d['video_max_abs_diff']:.4g} (of {d['video_abs_max']:.4g}), audio "
                         f"{d['audio_max_abs_diff']:.4g} (of {d['audio_abs_max']:.4g})")
        if "block_probe" in e:
            probe = json.dumps(e["block_probe"])
            lines.append(f"\n{e['name']}: one block's output, fp8_scaled_mm vs fp8_cast: {probe}")
    if results["skipped"]:
        lines.append(f"\nskipped by the budget: {', '.join(results['skipped'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
