"""Full-size LTX-2.3 memory and time per phase, through the generator's own pipeline code.

    python -m bench.vram --out bench/results/h100        # on a CUDA machine (a few minutes)
    python -m bench.vram --out /tmp/b --tiny --device cpu  # the same plumbing on tiny configs
    python -m bench.vram --plot-only bench/results/h100    # redraw the table and plot from results.json
    python -m bench.vram --out DIR --configs "fp8 1024x768x97" --guidance-batches 1 4 --steps 6 \
        --skip-unscoped --skip-overhead                    # batched guidance next to sequential

Each configuration runs ``generator.ltx2.pipeline.generate`` (the production phase
sequence, phase tracker and memory release) with ``bench.random_weights.RandomLedger``
in place of the checkpoint loader. Stage 1 runs ``--steps`` steps instead of the
checkpoint's default; the time per step is reported so full-step times can be
computed. Writes ``results.json``, ``table.md`` and ``peaks.png`` under ``--out``.

``--guidance-batches 1 4`` runs each chosen configuration once per guidance batch size
(``JobSpec.guidance_batch``: stage-1 guidance passes per transformer forward), one
after the other in one process with the same seed, and reports the largest difference
of the final stage-1 latents from the first size's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PHASES = ["text_encode", "embeddings", "image_encode", "stage_1", "upsample", "stage_2", "audio_decode",
          "video_decode", "finalize"]
DEFAULT_TILING = {"spatial_px": 512, "spatial_overlap_px": 64, "temporal_frames": 64, "temporal_overlap_frames": 24}
TINY_TILING = {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16, "temporal_overlap_frames": 8}


@dataclass(frozen=True)
class Config:
    name: str
    width: int
    height: int
    frames: int
    fp8: bool


FULL = [
    Config("fp8 768x512x121", 768, 512, 121, True),
    Config("fp8 1024x768x97", 1024, 768, 97, True),
    Config("fp8 1280x768x97", 1280, 768, 97, True),
    Config("fp8 1536x1152x97", 1536, 1152, 97, True),
    Config("fp8 2048x1536x97", 2048, 1536, 97, True),
    Config("bf16 1024x768x97", 1024, 768, 97, False),
]
TINY = [Config("tiny 128x64x9", 128, 64, 9, False), Config("tiny 256x128x17", 256, 128, 17, False)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.vram", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--configs", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="stage-1 steps (default 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: test the plumbing on a CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip-unscoped", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--guidance-batches", type=int, nargs="+", metavar="N",
                        help="run each config once per stage-1 guidance batch size (e.g. 1 4) and compare latents")
    parser.add_argument("--plot-only", type=Path, metavar="DIR", help="redraw table.md and peaks.png from DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.plot_only is not None:
        write_reports(args.plot_only, json.loads((args.plot_only / "results.json").read_text()))
        return 0
    if args.out is None:
        print("--out is required", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = run(args, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_reports(out, results)
    failed = [c["name"] for c in results["configs"] if c.get("error")]
    print(f"wrote {out}/results.json; failed: {failed or 'none'}", file=sys.stderr)
    return 1 if results.get("size_problems") else 0


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from bench.random_weights import check_full_size, parameter_counts, write_header_models
    from generator.checks import safetensors_metadata
    from generator.ltx2.tiny import write_tiny_models

    work = out / "work"
    tiny = write_tiny_models(work / "tiny")
    tiny_configs = None
    if args.tiny:
        tiny_configs = {
            "checkpoint": json.loads(safetensors_metadata(tiny.checkpoint)["config"]),
            "upsampler": json.loads(safetensors_metadata(tiny.spatial_upsampler)["config"]),
            "gemma": json.loads((tiny.gemma_root / "config.json").read_text()),
        }
    models = write_header_models(work / "models", tiny.gemma_root, tiny=tiny_configs)
    counts = parameter_counts(models)
    problems = [] if args.tiny else check_full_size(counts)
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "stage_1_steps": args.steps,
        "parameters_billions": counts,
        "size_problems": problems,
        "configs": [],
    }
    if problems:
        print("refusing to run: the config does not build the full-size model:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return results
    configs = TINY if args.tiny else FULL
    if args.configs:
        configs = [c for c in configs if c.name in args.configs]
    tiling = TINY_TILING if args.tiny else DEFAULT_TILING
    for config in configs:
        if args.guidance_batches:
            results.setdefault("guidance", []).append(
                compare_guidance(config, models, work, tiling, args.steps, args.device, args.guidance_batches,
                                 results["configs"])
            )
        else:
            print(f"running {config.name}", file=sys.stderr, flush=True)
            results["configs"].append(run_config(config, models, work, tiling, args.steps, args.device))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_unscoped and device.type == "cuda":
        results["unscoped_decode"] = unscoped_decode(models, device, 1024, 768, 97, tiling)
    if not args.skip_overhead:
        results["overhead"] = per_job_overhead(tiny, work, args.device)
    return results


def compare_guidance(
    config: Config, models: dict[str, Path], work: Path, tiling: dict[str, int], steps: int, device: str,
    batches: list[int], entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The same job once per guidance batch size; stage-1 figures and final-latent differences."""
    import torch

    from generator.ltx2 import guidance, pipeline

    finals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    runs = []
    plan_forwards = guidance.plan_forwards
    forwards = [0]

    def counted(passes: Any, max_batch: int) -> Any:
        planned = plan_forwards(passes, max_batch)
        forwards[0] += len(planned)
        return planned

    for batch in batches:
        def keep(stage: str, video: Any, audio: Any, batch: int = batch) -> None:
            if stage == "generating":
                finals[batch] = (video.latent.float().cpu(), audio.latent.float().cpu())

        print(f"running {config.name}, guidance batch {batch}", file=sys.stderr, flush=True)
        forwards[0] = 0
        pipeline.DENOISE_OBSERVERS.append(keep)
        guidance.plan_forwards = counted  # type: ignore[assignment]
        try:
            entry = run_config(config, models, work, tiling, steps, device, guidance_batch=batch)
        finally:
            pipeline.DENOISE_OBSERVERS.remove(keep)
            guidance.plan_forwards = plan_forwards  # type: ignore[assignment]
        entries.append(entry)
        stage_1 = next((p for p in entry["phases"] if p["name"] == "stage_1"), None)
        generating = entry["step_seconds"].get("generating", {})
        runs.append({
            "guidance_batch": batch, "error": entry.get("error"), "stage_1_forwards": forwards[0],
            "stage_1_step_median_seconds": generating.get("median"),
            "stage_1_first_step_seconds": generating.get("first"),
            "stage_1_seconds": stage_1 and stage_1["seconds"],
            "stage_1_peak_allocated_gib": stage_1 and stage_1["peak_allocated_gib"],
            "stage_1_peak_reserved_gib": stage_1 and stage_1["peak_reserved_gib"],
        })
    result: dict[str, Any] = {"name": config.name, "steps": steps, "runs": runs}
    base = batches[0]
    if base in finals:
        video, audio = finals[base]
        result["latent_abs_max"] = {"video": float(video.abs().max()), "audio": float(audio.abs().max())}
        result["max_abs_diff_vs_first"] = {
            str(batch): {"video": float((v - video).abs().max()), "audio": float((a - audio).abs().max())}
            for batch, (v, a) in finals.items() if batch != base
        }
    return result


def run_config(
    config: Config, models: dict[str, Path], work: Path, tiling: dict[str, int], steps: int, device: str,
    *, guidance_batch: int = 1, vram_budget_gib: float | None = None, steps_seed: int = 7,
    extra: dict[str, Any] | None = None, label: str | None = None,
) -> dict[str, Any]:
    """One job; ``extra`` adds JobSpec fields (bench/speed.py's levers), ``label`` names the entry."""
    import torch
    from PIL import Image

    from bench.random_weights import RandomLedger
    from generator.ltx2.pipeline import generate
    from generator.protocol import JobSpec, PhaseEvent, ProgressEvent

    image = work / f"in-{config.width}x{config.height}.png"
    Image.new("RGB", (config.width, config.height), (90, 140, 200)).save(image)
    spec = JobSpec.model_validate({
        "request": {"prompt": "a cat walks on the beach at sunset while waves roll in", "width": config.width,
                    "height": config.height, "frames": config.frames, "steps": steps, "seed": 7,
                    "pipeline": "two_stage", "audio": True},
        "image_path": str(image), "output_path": str(work / f"{config.name.replace(' ', '-')}.mp4"),
        "models": {k: str(v) for k, v in models.items()}, "tiling": tiling, "fp8_cast": config.fp8,
        "device": device, "guidance_batch": guidance_batch, "vram_budget_gib": vram_budget_gib, **(extra or {}),
    })
    events: list[tuple[float, Any]] = []
    builds: list[dict[str, Any]] = []
    name = label or (config.name if guidance_batch == 1 else f"{config.name} guidance x{guidance_batch}")
    if vram_budget_gib is not None and label is None:
        name = f"{name} budget {vram_budget_gib:g} GiB"
    entry: dict[str, Any] = {"name": name, "width": config.width, "height": config.height,
                             "frames": config.frames, "fp8_cast": config.fp8, "guidance_batch": guidance_batch,
                             "vram_budget_gib": vram_budget_gib}
    started = time.perf_counter()
    try:
        with _timed_builds(builds, device):
            done = generate(spec, lambda event: events.append((time.perf_counter(), event)),
                            ledger_factory=RandomLedger)
        entry["leaked_models"] = done.leaked_models
    except torch.OutOfMemoryError as exc:
        entry["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    entry["wall_seconds"] = round(time.perf_counter() - started, 2)
    entry["phases"] = [e.model_dump(exclude={"event"}) for _, e in events if isinstance(e, PhaseEvent)]
    if vram_budget_gib is not None or "plan" in PhaseEvent.model_fields:
        # Clocks of each phase (end less its length) for samplers outside the process's allocator.
        entry["_clocks"] = [(e.name, t - e.seconds, t) for t, e in events if isinstance(e, PhaseEvent)]
    entry["builds"] = builds
    entry["step_seconds"] = _step_times([(t, e) for t, e in events if isinstance(e, ProgressEvent)])
    return entry


@contextlib.contextmanager
def _timed_builds(builds: list[dict[str, Any]], device: str) -> Iterator[None]:
    """Time every model build (random weights made on the device: no disk read is measured)."""
    import torch

    from bench.random_weights import RandomLedger

    names = ["text_encoder", "gemma_embeddings_processor", "video_encoder", "transformer", "spatial_upsampler",
             "audio_decoder", "vocoder", "video_decoder"]
    originals = {name: getattr(RandomLedger, name) for name in names}

    def wrap(name: str, original: Any) -> Any:
        def timed(self: Any) -> Any:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model = original(self)
            if device == "cuda":
                torch.cuda.synchronize()
            builds.append({"model": name, "seconds": round(time.perf_counter() - t0, 3)})
            return model

        return timed

    for name, original in originals.items():
        setattr(RandomLedger, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(RandomLedger, name, original)


def _step_times(progress: list[tuple[float, Any]]) -> dict[str, Any]:
    """Seconds per denoising step by stage."""
    by_stage: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    for t, event in progress:
        if event.stage not in ("generating", "refining"):
            continue
        if event.step > 0 and event.stage in last:
            by_stage.setdefault(event.stage, []).append(t - last[event.stage])
        last[event.stage] = t
    # The first step of a stage pays for kernel selection and caches: kept apart from the median.
    return {
        stage: {"first": round(times[0], 3), "steps": [round(s, 3) for s in times[1:]],
                "median": round(statistics.median(times[1:] or times), 3)}
        for stage, times in by_stage.items()
    }


def unscoped_decode(
    models: dict[str, Path], device: Any, width: int, height: int, frames: int, tiling: dict[str, int]
) -> dict[str, Any]:
    """The failure mode: the same decode consumed with autograd on, next to the production scope."""
    import torch
    from ltx_core.model.video_vae import SpatialTilingConfig, TemporalTilingConfig, TilingConfig
    from ltx_core.model.video_vae import decode_video as vae_decode_video

    from bench.random_weights import RandomLedger
    from generator.phases import release_memory

    ledger = RandomLedger(dtype=torch.bfloat16, device=device, checkpoint_path=str(models["checkpoint"]))
    tiling_config = TilingConfig(
        spatial_config=SpatialTilingConfig(tiling["spatial_px"], tiling["spatial_overlap_px"]),
        temporal_config=TemporalTilingConfig(tiling["temporal_frames"], tiling["temporal_overlap_frames"]),
    )
    latent_shape = (1, 128, 1 + (frames - 1) // 8, height // 32, width // 32)
    result: dict[str, Any] = {"size": f"{width}x{height}x{frames}", "tiling": tiling}

    def consume(chunks: Any) -> int:
        count = 0
        for chunk in chunks:
            count += int(chunk.shape[0])
            chunk.cpu()
        return count

    for label in ("scoped", "unscoped"):
        release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        generator = torch.Generator(device=device).manual_seed(1)
        latent = torch.randn(latent_shape, dtype=torch.bfloat16, device=device, generator=generator)
        started = time.perf_counter()
        try:
            if label == "scoped":
                with torch.inference_mode():  # production: build, decode and consume in one scope
                    decoder = ledger.video_decoder()
                    frames_out = consume(vae_decode_video(latent, decoder, tiling_config, generator))
            else:
                with torch.no_grad():  # the bug: the lazy iterator is made in scope ...
                    decoder = ledger.video_decoder()
                    chunks = vae_decode_video(latent, decoder, tiling_config, generator)
                frames_out = consume(chunks)  # ... and consumed outside it
            result[label] = {"frames": frames_out}
        except torch.OutOfMemoryError:
            result[label] = {"out_of_memory": True}
        torch.cuda.synchronize(device)
        result[label]["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result[label]["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result[label]["seconds"] = round(time.perf_counter() - started, 2)
        with contextlib.suppress(NameError):
            del decoder
        with contextlib.suppress(NameError):
            del chunks
        del latent
    release_memory(device)
    return result


def per_job_overhead(tiny: Any, work: Path, device: str, runs: int = 3) -> dict[str, Any]:
    """Seconds a job waits before its first phase starts, cold and with a standby generator.

    cold: from spawning ``python -m generator SPEC`` to its ``started`` event (imports, CUDA
    init, spec load and file checks; the first phase starts right after). standby: the
    worker's default, a ``--standby`` process that finished its imports before the job; from
    writing the spec path to its stdin to ``started``.
    """
    from PIL import Image

    from generator.protocol import JobSpec, parse_event

    image = work / "overhead.png"
    Image.new("RGB", (128, 64), (90, 140, 200)).save(image)
    spec = JobSpec.model_validate({
        "request": {"prompt": "waves", "width": 128, "height": 64, "frames": 9, "steps": 1, "seed": 1,
                    "pipeline": "two_stage", "audio": False},
        "image_path": str(image), "output_path": str(work / "overhead.mp4"),
        "models": {"checkpoint": str(tiny.checkpoint), "distilled_checkpoint": str(tiny.checkpoint),
                   "distilled_lora": str(tiny.distilled_lora), "spatial_upsampler": str(tiny.spatial_upsampler),
                   "gemma_root": str(tiny.gemma_root)},
        "tiling": TINY_TILING, "fp8_cast": False, "device": device,
    })
    spec_path = work / "overhead.json"
    spec_path.write_text(spec.model_dump_json())

    def measure(standby: bool) -> dict[str, Any]:
        command = [sys.executable, "-m", "generator", "--standby" if standby else str(spec_path)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        sample: dict[str, Any] = {}
        for line in proc.stdout:
            event = parse_event(line)
            if event.event == "ready":
                sample["import_seconds"] = event.import_seconds
                t0 = time.perf_counter()  # the job arrives now
                proc.stdin.write(f"{spec_path}\n")
                proc.stdin.close()
            elif event.event == "started":
                sample["to_first_phase_start"] = round(time.perf_counter() - t0, 3)
                sample.setdefault("import_seconds", event.import_seconds)
        sample["exit"] = proc.wait()
        return sample

    cold = [measure(False) for _ in range(runs)]
    standby = [measure(True) for _ in range(runs)]
    return {
        "cold": cold, "standby": standby,
        "median_cold": statistics.median(s["to_first_phase_start"] for s in cold),
        "median_standby": statistics.median(s["to_first_phase_start"] for s in standby),
    }


# --- reports ----------------------------------------------------------------------------------


def write_reports(out: Path, results: dict[str, Any]) -> None:
    (out / "table.md").write_text(markdown_table(results))
    try:
        plot(out / "peaks.png", results)
    except ImportError:
        print("matplotlib is not installed: peaks.png skipped (run --plot-only where it is)", file=sys.stderr)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    configs = results["configs"]
    lines = [f"GPU: {results['device']}; torch {results['torch']}; stage 1 ran {results['stage_1_steps']} steps. "
             "Each cell: peak allocated / peak reserved GiB / seconds (model build included).", ""]
    lines.append("| phase | " + " | ".join(c["name"] for c in configs) + " |")
    lines.append("|---|" + "---|" * len(configs))
    for phase in PHASES:
        cells = []
        for config in configs:
            found = next((p for p in config["phases"] if p["name"] == phase), None)
            cells.append("" if found is None else
                         f"{_fmt(found['peak_allocated_gib'])} / {_fmt(found['peak_reserved_gib'])} / "
                         f"{found['seconds']:.1f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    peaks = []
    for config in configs:
        measured = [p for p in config["phases"] if p["peak_allocated_gib"] is not None]
        top = max(measured, key=lambda p: p["peak_allocated_gib"], default=None)
        peaks.append("error: " + config["error"] if config.get("error") else
                     "-" if top is None else f"**{top['peak_allocated_gib']:.2f}** ({top['name']})")
    lines.append("| **peak** | " + " | ".join(peaks) + " |")
    steps = [
        " / ".join(f"{stage} {v['median']:.2f}" for stage, v in config["step_seconds"].items()) or "-"
        for config in configs
    ]
    lines.append("| s per step | " + " | ".join(steps) + " |")
    unscoped = results.get("unscoped_decode")
    if unscoped:
        lines += ["", f"Decode {unscoped['size']} consumed inside the scope vs outside it (autograd on):", "",
                  "| variant | peak allocated GiB | peak reserved GiB | result |", "|---|---|---|---|"]
        for label in ("scoped", "unscoped"):
            r = unscoped[label]
            outcome = "out of memory" if r.get("out_of_memory") else f"{r.get('frames')} frames"
            lines.append(f"| {label} | {r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {outcome} |")
    for comparison in results.get("guidance", []):
        lines += guidance_lines(comparison)
    lines += target_lines(results)
    overhead = results.get("overhead")
    if overhead and "median_standby" in overhead:
        lines += ["", f"Per-job overhead before the first phase (median of {len(overhead['cold'])}): "
                  f"cold process {overhead['median_cold']:.2f} s; standby process (the default) "
                  f"{overhead['median_standby']:.2f} s"]
    elif overhead:  # results from before the standby generator existed
        lines += ["", "Per-job overhead, process spawn to first phase start: "
                  f"{overhead['median_to_first_phase_start']:.2f} s"]
    return "\n".join(lines) + "\n"


def guidance_lines(comparison: dict[str, Any]) -> list[str]:
    """Stage 1 with its guidance passes batched, next to the first batch size of the same run."""
    runs = comparison["runs"]
    base = runs[0]["guidance_batch"]
    scale = comparison.get("latent_abs_max", {})
    diffs = comparison.get("max_abs_diff_vs_first", {})
    lines = ["", f"{comparison['name']}, stage 1 ({comparison['steps']} steps) by guidance passes per forward; "
             f"final stage-1 latents compared with batch {base}'s (same seed; largest |latent|: video "
             f"{_fmt(scale.get('video'))}, audio {_fmt(scale.get('audio'))}):", "",
             "| guidance batch | transformer forwards | s per step (median) | first step s "
             "| stage_1 peak allocated / reserved GiB | max abs diff video / audio |", "|---|---|---|---|---|---|"]
    for run in runs:
        if run.get("error"):
            lines.append(f"| {run['guidance_batch']} | error: {run['error']} | | | | |")
            continue
        diff = diffs.get(str(run["guidance_batch"]))
        shown = "(reference)" if run["guidance_batch"] == base else (
            "-" if diff is None else f"{diff['video']:.3g} / {diff['audio']:.3g}")
        lines.append(f"| {run['guidance_batch']} | {run['stage_1_forwards']} | "
                     f"{_fmt(run['stage_1_step_median_seconds'])} | {_fmt(run['stage_1_first_step_seconds'])} | "
                     f"{_fmt(run['stage_1_peak_allocated_gib'])} / {_fmt(run['stage_1_peak_reserved_gib'])} | "
                     f"{shown} |")
    return lines


def _peak(config: dict[str, Any]) -> float | None:
    measured = [p["peak_allocated_gib"] for p in config["phases"] if p["peak_allocated_gib"] is not None]
    return None if config.get("error") or not measured else max(measured)


def target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's targets, judged from the figures themselves (never typed in by hand)."""
    # The ratio compares two runs of one process when the results have them (``side_by_side``).
    pool = {c["name"]: c for c in results["configs"]} | {c["name"]: c for c in results.get("side_by_side", [])}
    small, large = pool.get("fp8 1024x768x97"), pool.get("fp8 2048x1536x97")
    rows: list[tuple[str, str, str]] = []
    small_peak = _peak(small) if small else None
    if small_peak is not None:
        rows.append(("fp8 1024x768x97 peak <= 24 GiB", f"{small_peak:.3f} GiB",
                     "met" if small_peak <= 24 else f"missed by {small_peak - 24:.3f} GiB"))
    large_peak = _peak(large) if large else None
    if small_peak is not None and large_peak is not None:
        ratio, limit = large_peak / small_peak, 1.05 * small_peak
        rows.append(("2048x1536x97 peak <= 1.05 x 1024x768x97 peak",
                     f"{large_peak:.3f} / {small_peak:.3f} = {ratio:.4f}",
                     f"met ({(limit - large_peak) * 1024:.1f} MiB under)" if large_peak <= limit
                     else f"missed by {(large_peak - limit) * 1024:.1f} MiB"))
    unscoped = results.get("unscoped_decode")
    if unscoped:
        scoped_peak = unscoped["scoped"]["peak_allocated_gib"]
        unscoped_peak = unscoped["unscoped"]["peak_allocated_gib"]
        fatal = " (ran out of memory)" if unscoped["unscoped"].get("out_of_memory") else ""
        rows.append(("unscoped decode blows up (several x scoped)",
                     f"{unscoped_peak:.2f} vs {scoped_peak:.2f} GiB{fatal}",
                     f"met, {unscoped_peak / scoped_peak:.1f}x" if unscoped_peak >= 3 * scoped_peak else "missed"))
    overhead = results.get("overhead")
    if overhead and "median_standby" in overhead:
        cold, standby = overhead["median_cold"], overhead["median_standby"]
        rows.append(("per-job overhead before the first phase <= 5 s", f"cold {cold:.2f} s, standby {standby:.2f} s",
                     ("met" if standby <= 5 else "missed") + (" with standby; cold " + ("met" if cold <= 5 else
                                                                                       f"missed by {cold - 5:.1f} s"))))
    if not rows:
        return []
    return ["", "Targets, judged from the figures above:", "", "| target | measured | result |", "|---|---|---|",
            *(f"| {name} | {measured} | {result} |" for name, measured, result in rows)]


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for config in results["configs"]:
        values = []
        for phase in PHASES:
            found = next((p for p in config["phases"] if p["name"] == phase), None)
            values.append(found["peak_allocated_gib"] if found and found["peak_allocated_gib"] is not None else 0.0)
        ax.plot(PHASES, values, marker="o", label=config["name"])
    ax.set_ylabel("peak allocated GiB")
    ax.set_title(f"Peak GPU memory per phase, LTX-2.3 two-stage ({results['device']})")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
