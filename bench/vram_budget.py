"""The VRAM budget side by side: one job at several budgets, same GPU, same process, same seed.

    python -m bench.vram_budget --out bench/results/h200-vram-budget       # CUDA, full-size random weights
    python -m bench.vram_budget --out /tmp/vb --tiny --device cpu         # the plumbing on tiny models

Each row runs ``generator.ltx2.pipeline.generate`` with ``JobSpec.vram_budget_gib`` set (the
planner caps the allocator with ``torch.cuda.set_per_process_memory_fraction`` and streams
what does not fit). Per row: the phases' PyTorch peaks and times, the whole-process GPU
memory from nvidia-smi (per-process used memory, CUDA context included) sampled through
each phase, the plan, host-to-device bytes and bandwidth, peak RSS, a hash of the final
latents and of the decoded frames (each must equal the unconstrained row's), and the
predictor's figure next to the measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.vram import DEFAULT_TILING, TINY_TILING, Config, _fmt

ROWS: list[tuple[Config, float | None]] = [
    # Most telling first, so a run cut short by its time limit still has them.
    *((Config("fp8 1024x768x97", 1024, 768, 97, True), b) for b in (None, 8.0, 12.0, 16.0, 24.0)),
    *((Config("fp8 2048x1536x97", 2048, 1536, 97, True), b) for b in (24.0, 12.0, 16.0, None)),
]
GIB_BYTES = 2**30
TINY_ROWS: list[tuple[Config, float | None]] = [
    (Config("tiny 128x64x9", 128, 64, 9, False), b) for b in (None, 0.0002, 0.0001)
]


class GpuSampler:
    """Polls nvidia-smi for this GPU's compute processes' used memory (MiB), keeping the maximum."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        values = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]
        return sum(values) if values else None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_gib(self, start: float, end: float) -> float | None:
        inside = [v for t, v in self.samples if start <= t <= end + self.interval]
        return round(max(inside) / 1024, 4) if inside else None


def h2d_bandwidth(device: Any) -> dict[str, Any]:
    import torch

    result: dict[str, Any] = {}
    nbytes = 1 << 30
    for label, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            target.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        result[f"{label}_gb_per_s"] = round(nbytes / best / 1e9, 2)
        del host, target
    torch.cuda.empty_cache()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        result["pcie"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=5).stdout.strip()
    return result


@contextlib.contextmanager
def hashed_outputs(found: dict[str, str]) -> Iterator[None]:
    """Hash each stage's final latents, the upsampled latent, and every decoded frame and audio sample of a run."""
    from generator.ltx2 import pipeline

    def latents(stage: str, video: Any, audio: Any) -> None:
        digest = hashlib.sha256(video.latent.float().cpu().numpy().tobytes())
        digest.update(audio.latent.float().cpu().numpy().tobytes())
        found[f"latents_{stage}"] = digest.hexdigest()[:16]

    original = getattr(pipeline, "stream_clip")  # noqa: B009  (patched below: the module's own name)
    upsample = getattr(pipeline, "upsample_video")  # noqa: B009

    def hashed_upsample(**kwargs: Any) -> Any:
        # Stage 1's latents and stage 2's can differ for two reasons: the upsampler's convolutions or stage 2 itself.
        upscaled = upsample(**kwargs)
        found["upsampled"] = hashlib.sha256(upscaled.float().cpu().numpy().tobytes()).hexdigest()[:16]
        return upscaled

    def teeing(spec: Any, tracker: Any, frames: Any, progress: Any, audio: Any) -> Any:
        digest = hashlib.sha256()

        def tee() -> Iterator[Any]:
            for chunk in frames:
                digest.update(chunk.tobytes())
                yield chunk
            found["frames"] = digest.hexdigest()[:16]

        if audio is not None:
            found["audio"] = hashlib.sha256(audio[0].tobytes()).hexdigest()[:16]
        return original(spec, tracker, tee(), progress, audio)

    pipeline.DENOISE_OBSERVERS.append(latents)
    setattr(pipeline, "stream_clip", teeing)  # noqa: B010
    setattr(pipeline, "upsample_video", hashed_upsample)  # noqa: B010
    try:
        yield
    finally:
        pipeline.DENOISE_OBSERVERS.remove(latents)
        setattr(pipeline, "stream_clip", original)  # noqa: B010
        setattr(pipeline, "upsample_video", upsample)  # noqa: B010


def record_memory_history(recorded: str, out: Path) -> None:
    """Where a phase's memory goes: every allocation of ``phase`` with its Python stack, saved when it ends."""
    import gzip
    import pickle

    import torch

    from generator import phases

    original = phases.PhaseTracker.phase
    count = [0]

    @contextlib.contextmanager
    def phase(self: Any, name: str) -> Iterator[None]:
        if name != recorded:
            with original(self, name):
                yield
            return
        torch.cuda.memory._record_memory_history(max_entries=50_000, stacks="python")
        count[0] += 1
        path = out / f"memory-{name}-{count[0]}.pickle.gz"
        try:
            with original(self, name):
                yield
        finally:
            with gzip.open(path, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            torch.cuda.memory._record_memory_history(enabled=None)

    phases.PhaseTracker.phase = phase  # type: ignore[method-assign,assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vram_budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2, help="stage-1 steps (default 2)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, help="run only the first N rows")
    parser.add_argument("--select", help="run only the rows whose case name contains this, e.g. 2048x1536")
    parser.add_argument("--budgets", nargs="+", type=lambda v: None if v == "none" else float(v),
                        help="run only the rows of these budgets in GiB ('none': unconstrained)")
    parser.add_argument("--report-only", action="store_true", help="redo the comparison and table from --out")
    parser.add_argument("--memory-history", metavar="PHASE",
                        help="record CUDA allocations through PHASE; write OUT/memory-PHASE-N.pickle.gz at its end "
                             "or failure (torch.cuda.memory._snapshot, for torch.cuda._memory_viz)")
    args = parser.parse_args(argv)
    if args.report_only:
        report(args.out, json.loads((args.out / "results.json").read_text()))
        return 0
    import torch

    from bench.random_weights import write_header_models
    from bench.vram import run_config
    from generator import predict
    from generator.checks import safetensors_metadata
    from generator.ltx2.tiny import write_tiny_models

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
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
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "stage_1_steps": args.steps, "configs": [],
    }
    if cuda:
        torch.cuda.init()  # type: ignore[no-untyped-call]
        results["h2d"] = h2d_bandwidth(device)
        results["total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)
    if cuda and args.memory_history:
        record_memory_history(args.memory_history, out)
    rows = TINY_ROWS if args.tiny else ROWS
    tiling = TINY_TILING if args.tiny else DEFAULT_TILING
    with GpuSampler() if cuda else contextlib.nullcontext() as sampler:
        chosen = [r for r in rows if (args.select is None or args.select in r[0].name)
                  and (args.budgets is None or r[1] in args.budgets)]
        for config, budget in chosen[: args.rows]:
            print(f"running {config.name} budget {budget}", file=sys.stderr, flush=True)
            if cuda:  # the planner sets the cap per budget; an unconstrained row starts uncapped
                torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
            hashes: dict[str, str] = {}
            held = torch.cuda.memory_allocated(device) / GIB_BYTES if cuda else 0.0  # what an earlier row left
            with hashed_outputs(hashes):
                entry = run_config(config, models, work, tiling, args.steps, args.device, vram_budget_gib=budget)
            entry["hashes"] = hashes
            entry["allocated_at_start_gib"] = round(held, 4)
            predicted = predict.predict("ltx2", "two_stage", config.width, config.height, config.frames, True,
                                        budget)
            entry["predicted"] = None if predicted is None else {
                "phases": predicted.phases, "peak_gib": round(predicted.peak_gib, 4),
                "process_peak_gib": round(predicted.process_peak_gib, 4),
                "resident": {k: v.resident for k, v in predicted.plans.items() if v.resident or v.streamed}}
            clocks = entry.pop("_clocks", [])
            if sampler is not None:
                for phase, (_, start, end) in zip(entry["phases"], clocks, strict=False):
                    phase["process_peak_gib"] = sampler.peak_gib(start, end)
                found = [p["process_peak_gib"] for p in entry["phases"] if p.get("process_peak_gib") is not None]
                entry["process_peak_gib"] = max(found, default=None)
            results["configs"].append(entry)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            gc.collect()  # a failed row's traceback may hold GPU tensors in a cycle; the next row starts clean
            release = getattr(torch.cuda, "empty_cache", None)
            if cuda and release:
                release()
    report(out, results)
    return 0


def report(out: Path, results: dict[str, Any]) -> None:
    # The reference is the unconstrained row, or else the largest budget's row of the same size.
    reference: dict[str, Any] = {}
    for c in sorted(results["configs"], key=lambda c: -(c.get("vram_budget_gib") or float("inf"))):
        if not c.get("error"):
            reference.setdefault(c["name"].split(" budget")[0], c.get("hashes"))
    for entry in results["configs"]:
        base = reference.get(entry["name"].split(" budget")[0])
        entry["hashes_equal_reference"] = None if not base else entry.get("hashes") == base
        mine = entry.get("hashes") or {}
        entry["hashes_differing"] = None if not base else sorted(k for k in base.keys() | mine.keys()
                                                               if base.get(k) != mine.get(k))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results))
    print((out / "table.md").read_text(), file=sys.stderr)


def _equal(entry: dict[str, Any]) -> str:
    differing = entry.get("hashes_differing")
    return str(entry.get("hashes_equal_reference")) + (f" ({', '.join(differing)} differ)" if differing else "")


def table(results: dict[str, Any]) -> str:
    lines = [f"GPU: {results['device']}; torch {results['torch']}; stage 1 ran {results['stage_1_steps']} steps; "
             f"host-to-device {results.get('h2d', {})}.", "",
             "| row | whole-process peak GiB (nvidia-smi) | peak allocated / reserved GiB (phase) | predicted "
             "allocated GiB | wall s | stage_1 s | stage_2 s | text_encode s | H2D GB copied | peak RSS GiB "
             "| hashes = reference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["configs"]:
        if c.get("error"):
            lines.append(f"| {c['name']} | error: {c['error']} | | | {c['wall_seconds']} | | | | | | |")
            continue
        phases = {p["name"]: p for p in c["phases"]}
        top = max(c["phases"], key=lambda p: p["peak_allocated_gib"] or 0)
        # The transformer's count runs on through stage 2 (one streamer for both stages).
        copied = sum((p.get("plan") or {}).get("bytes_copied", 0) for p in c["phases"] if p["name"] != "stage_1")
        predicted = (c.get("predicted") or {}).get("peak_gib")
        rss = max(p["peak_rss_gib"] for p in c["phases"])

        def sec(name: str, phases: dict[str, Any] = phases) -> str:
            return f"{phases[name]['seconds']:.1f}" if name in phases else "-"

        lines.append(
            f"| {c['name']} | {c.get('process_peak_gib') or '-'} | {_fmt(top['peak_allocated_gib'])} / "
            f"{_fmt(top['peak_reserved_gib'])} ({top['name']}) | {predicted if predicted is not None else '-'} | "
            f"{c['wall_seconds']} | {sec('stage_1')} | {sec('stage_2')} | {sec('text_encode')} | "
            f"{copied / 1e9:.1f} | {rss:.2f} | {_equal(c)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
