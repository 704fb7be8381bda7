"""What a draft saves and what a live preview costs, on full-size LTX-2.3 with random weights.

    python -m bench.draft --out bench/results/h200-draft          # on a CUDA machine (about 2 minutes)
    python -m bench.draft --out /tmp/d --tiny --device cpu          # the same plumbing on tiny configs

Three runs of ``generator.ltx2.pipeline.generate`` (the production phases) through
``bench.random_weights.RandomLedger``, fp8 1024x768x97 two-stage with audio, one seed:
the draft (stage 1 only, no previews), the full clip with a preview after every stage-1
step but the last (the worst case: the bot's interval is seconds), and the finalize of
the draft. The draft's stage 1 is the full run's stage 1 without previews, so their
difference is what previews cost in time and memory. Writes ``results.json`` and
``table.md`` under ``--out``, after each run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.vram import DEFAULT_TILING, TINY_TILING

FULL = ("fp8 1024x768x97", 1024, 768, 97, True)
TINY = ("tiny 128x64x9", 128, 64, 9, False)
RUNS = ("draft", "full + previews", "finalize")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.draft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=4, help="stage-1 steps (default 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: test the plumbing on a CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args, args.out)
    write_reports(args.out, results)
    print(markdown_table(results))
    return 0 if len(results.get("runs", [])) == len(RUNS) and not results.get("size_problems") else 1


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from PIL import Image

    from bench.random_weights import RandomLedger, check_full_size, parameter_counts, write_header_models
    from generator.checks import safetensors_metadata
    from generator.ltx2.pipeline import generate
    from generator.ltx2.tiny import write_tiny_models
    from generator.protocol import JobSpec, PhaseEvent, PreviewEvent, ProgressEvent

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
    name, width, height, frames, fp8 = TINY if args.tiny else FULL
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "config": name, "stage_1_steps": args.steps, "size_problems": problems,
        "runs": [],
    }
    if problems:
        print("refusing to run: the config does not build the full-size model:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return results
    image = work / "in.png"
    Image.new("RGB", (width, height), (90, 140, 200)).save(image)
    base = JobSpec.model_validate({
        "request": {"prompt": "a cat walks on the beach at sunset while waves roll in", "width": width,
                    "height": height, "frames": frames, "steps": args.steps, "seed": 7, "pipeline": "two_stage",
                    "audio": True},
        "image_path": str(image), "output_path": str(work / "clip.mp4"),
        "models": {k: str(v) for k, v in models.items()}, "tiling": TINY_TILING if args.tiny else DEFAULT_TILING,
        "fp8_cast": fp8, "device": args.device,
    })
    state = work / "draft.pt"
    changes: dict[str, dict[str, Any]] = {
        "draft": {"draft": "draft", "draft_state": state, "output_path": work / "draft.mp4"},
        # A preview after every stage-1 step: a tiny interval, measured per preview.
        "full + previews": {"preview_every_seconds": 1e-6, "preview_dir": work / "previews",
                            "output_path": work / "full.mp4"},
        "finalize": {"draft": "finalize", "draft_state": state, "output_path": work / "final.mp4"},
    }
    for run_name in RUNS:
        print(f"running {run_name}", file=sys.stderr, flush=True)
        spec = base.model_copy(update=changes[run_name])
        events: list[tuple[float, Any]] = []
        started = time.perf_counter()
        done = generate(spec, functools.partial(_timed, events), ledger_factory=RandomLedger)
        steps = [(t, e) for t, e in events if isinstance(e, ProgressEvent) and e.stage == "generating"]
        results["runs"].append({
            "name": run_name,
            "wall_seconds": round(time.perf_counter() - started, 2),
            "phases": [e.model_dump(mode="json", exclude={"event"}) for _, e in events if isinstance(e, PhaseEvent)],
            "previews": [e.model_dump(mode="json", exclude={"event", "path"}) for _, e in events
                         if isinstance(e, PreviewEvent)],
            "stage_1_step_seconds": [round(b[0] - a[0], 3) for a, b in itertools.pairwise(steps)],
            "state_bytes": state.stat().st_size if run_name == "draft" else None,
            "clip": {"width": done.width, "height": done.height, "frames": done.frames, "bytes": done.bytes},
            "leaked_models": done.leaked_models,
        })
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _timed(events: list[tuple[float, Any]], event: Any) -> None:
    events.append((time.perf_counter(), event))


def _phase(entry: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in entry["phases"] if p["name"] == name), None)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from the three runs."""
    runs = {r["name"]: r for r in results.get("runs", [])}
    out: dict[str, Any] = {}
    draft, full, final = runs.get("draft"), runs.get("full + previews"), runs.get("finalize")
    if draft and full:
        preview_s = sum(p["seconds"] for p in full["previews"])
        shown, plain = _phase(full, "stage_1"), _phase(draft, "stage_1")
        assert shown is not None and plain is not None
        out["draft_seconds"] = draft["wall_seconds"]
        out["full_seconds_without_previews"] = round(full["wall_seconds"] - preview_s, 2)
        out["previews"] = len(full["previews"])
        out["preview_seconds_each"] = [p["seconds"] for p in full["previews"]]
        out["stage_1_seconds"] = {"without": plain["seconds"], "with_previews": shown["seconds"]}
        out["stage_1_step_seconds_median"] = sorted(draft["stage_1_step_seconds"])[
            len(draft["stage_1_step_seconds"]) // 2] if draft["stage_1_step_seconds"] else None
        if shown["peak_allocated_gib"] is not None:
            out["stage_1_peak_allocated_gib"] = {"without": plain["peak_allocated_gib"],
                                                 "with_previews": shown["peak_allocated_gib"]}
            out["stage_1_peak_reserved_gib"] = {"without": plain["peak_reserved_gib"],
                                                "with_previews": shown["peak_reserved_gib"]}
    if final:
        out["finalize_seconds"] = final["wall_seconds"]
    return out


def write_reports(out: Path, results: dict[str, Any]) -> None:
    results["summary"] = summary(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(markdown_table(results) + "\n")


def markdown_table(results: dict[str, Any]) -> str:
    runs = results.get("runs", [])
    lines = [f"GPU: {results.get('device')}; torch {results.get('torch')}; {results.get('config')} two-stage with "
             f"audio; stage 1 ran {results.get('stage_1_steps')} steps. Each cell: peak allocated / reserved GiB "
             "/ seconds (model builds included).", "",
             "| phase | " + " | ".join(r["name"] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    names: list[str] = []
    for entry in runs:
        names += [p["name"] for p in entry["phases"] if p["name"] not in names]

    def cell(entry: dict[str, Any], name: str) -> str:
        p = _phase(entry, name)
        if p is None:
            return "—"
        alloc, reserved = p["peak_allocated_gib"], p["peak_reserved_gib"]
        mem = f"{alloc:.2f} / {reserved:.2f}" if alloc is not None else f"RSS {p['peak_rss_gib']:.2f}"
        return f"{mem} / {p['seconds']:.1f}"

    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(r, name) for r in runs) + " |")
    lines.append("| **wall s** | " + " | ".join(f"**{r['wall_seconds']:.1f}**" for r in runs) + " |")
    s = results.get("summary") or summary(results)
    if "draft_seconds" in s:
        lines += ["", f"Draft to its clip: {s['draft_seconds']:.1f} s; the full clip: "
                      f"{s['full_seconds_without_previews']:.1f} s (its previews' own time taken out); "
                      f"finalize: {s.get('finalize_seconds', float('nan')):.1f} s."]
        each = s["preview_seconds_each"]
        lines.append(f"Previews: {s['previews']} in stage 1, {min(each, default=0):.3f}–{max(each, default=0):.3f} s "
                     f"each (the first builds the decoder); stage 1 {s['stage_1_seconds']['without']:.1f} s without, "
                     f"{s['stage_1_seconds']['with_previews']:.1f} s with a preview after every step.")
        if "stage_1_peak_allocated_gib" in s:
            a, r = s["stage_1_peak_allocated_gib"], s["stage_1_peak_reserved_gib"]
            lines.append(f"Stage-1 peak: {a['without']:.2f} / {r['without']:.2f} GiB without previews, "
                         f"{a['with_previews']:.2f} / {r['with_previews']:.2f} GiB with them "
                         f"(+{a['with_previews'] - a['without']:.2f} allocated).")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
