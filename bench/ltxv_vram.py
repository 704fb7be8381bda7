"""Full-size LTX-Video 0.9.8 (2B and 13B) memory and time per phase, through the generator's own code.

    .venv-ltxv/bin/python -m bench.ltxv_vram --out bench/results/h100-ltxv         # on a CUDA machine
    .venv-ltxv/bin/python -m bench.ltxv_vram --out /tmp/b --tiny --device cpu      # the plumbing, tiny models

Runs in the LTX-Video interpreter. Each configuration runs ``generator.ltxv.pipeline.generate``
(the production phase sequence, phase tracker, windowed and tiled decode, encoder)
with ``Loaders`` that build full-size models with random weights directly on the
device instead of reading checkpoints: the T5-v1.1-XXL encoder, the transformer,
the VAE and the latent upsampler, from the configs in ``bench/configs/``. Compute
and memory do not depend on the weights' values. Writes ``results.json`` and
``table.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from generator.ltxv import pipeline as ltxv
from generator.protocol import JobSpec, PhaseEvent, ProgressEvent

CONFIGS = Path(__file__).resolve().parent / "configs"
PHASES = ["text_encode", "stage_1", "upsample", "stage_2", "video_decode", "finalize"]
DEFAULT_TILING = {"spatial_px": 512, "spatial_overlap_px": 64, "temporal_frames": 64, "temporal_overlap_frames": 24}
TINY_TILING = {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16, "temporal_overlap_frames": 8}
# Expected parameter counts (billions) of the full-size builds: a missing config key would build another model.
EXPECTED_BILLIONS = {"2b": (1.8, 2.2), "13b": (12.5, 14.0), "t5": (4.6, 4.9)}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "2b", "13b" or "tiny"
    pipeline: str
    width: int
    height: int
    frames: int
    steps: int | None = None


FULL = [
    Case("2B distilled 768x512x97", "2b", "distilled", 768, 512, 97),
    Case("2B distilled 1216x704x121", "2b", "distilled", 1216, 704, 121),
    Case("2B distilled 768x512x257", "2b", "distilled", 768, 512, 257),
    Case("2B distilled 768x512x481", "2b", "distilled", 768, 512, 481),
    Case("13B distilled 768x512x97", "13b", "distilled", 768, 512, 97),
    Case("13B distilled 1216x704x121", "13b", "distilled", 1216, 704, 121),
    Case("13B dev two_stage 768x512x97", "13b", "two_stage", 768, 512, 97, steps=4),
]
TINY = [
    Case("tiny distilled 160x96x25", "tiny", "distilled", 160, 96, 25),
    Case("tiny two_stage 128x64x17", "tiny", "two_stage", 128, 64, 17, steps=3),
]


def _materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Random values in place of a checkpoint: normal(0, 0.02) matrices, unit norms, zero biases.

    Cast on the meta device first: the checkpoints are bf16, and an fp32 build would double the peak.
    """
    module.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        if tensor.dim() >= 2:
            tensor.data.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            tensor.data.zero_()
        else:
            tensor.data.fill_(1.0)
    return module.eval()


class RandomModels:
    """``ltxv.Loaders`` that build full-size models with random weights on the device."""

    def __init__(self, t5_config: dict[str, Any], upsampler_config: dict[str, Any]) -> None:
        self.t5_config = t5_config
        self.upsampler_config = upsampler_config
        self.params: dict[str, float] = {}

    def _count(self, name: str, module: torch.nn.Module) -> None:
        self.params[name] = sum(p.numel() for p in module.parameters()) / 1e9

    def text_encoder(self, root: Path, device: torch.device, dtype: torch.dtype) -> Any:
        from transformers import T5Config, T5EncoderModel

        with torch.device("meta"):
            model = T5EncoderModel(T5Config(**self.t5_config))
        self._count("t5", model)
        return _materialize(model, device, dtype, 1)

    def transformer(self, path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        from ltx_video.models.transformers.transformer3d import Transformer3DModel

        with torch.device("meta"):
            model = Transformer3DModel.from_config(config["transformer"])
        self._count("transformer", model)
        return _materialize(model, device, dtype, 2)

    def vae(self, path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
        with torch.device("meta"):
            model = ltxv.build_vae(config["vae"])
        self._count("vae", model)
        model = _materialize(model, device, dtype, 3)
        channels = config["vae"]["latent_channels"]
        model.register_buffer("std_of_means", torch.ones(channels, device=device, dtype=dtype))
        model.register_buffer("mean_of_means", torch.zeros(channels, device=device, dtype=dtype))
        return model

    def upsampler(self, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
        from ltx_video.models.autoencoders.latent_upsampler import LatentUpsampler

        with torch.device("meta"):
            model = LatentUpsampler.from_config(self.upsampler_config)
        self._count("upsampler", model)
        return _materialize(model, device, dtype, 4)

    def loaders(self) -> ltxv.Loaders:
        return ltxv.Loaders(text_encoder=self.text_encoder, transformer=self.transformer, vae=self.vae,
                            upsampler=self.upsampler)


def _files(work: Path, tiny: bool) -> dict[str, Any]:
    """Header-only checkpoints carrying the real metadata configs, and a tokenizer folder."""
    from generator.ltxv import tiny as tiny_ltxv

    work.mkdir(parents=True, exist_ok=True)
    text_root = work / "t5"
    tiny_ltxv.write_text_encoder(text_root)  # its tokenizer serves; the encoder is built at full size
    checkpoints: dict[tuple[str, str], Path] = {}
    if tiny:
        config = {"transformer": tiny_ltxv.TINY_TRANSFORMER, "vae": tiny_ltxv.TINY_VAE,
                  "scheduler": tiny_ltxv.SCHEDULER, "allowed_inference_steps": tiny_ltxv.ALLOWED_DISTILLED_STEPS}
        models = {"tiny": config}
    else:
        models = {m: json.loads((CONFIGS / f"ltxv-{m}-0.9.8.json").read_text()) for m in ("2b", "13b")}
    for model, config in models.items():
        dev = {k: v for k, v in config.items() if k != "allowed_inference_steps"}
        for kind, metadata in (("distilled", config), ("dev", dev)):
            path = work / f"ltxv-{model}-{kind}-header.safetensors"
            save_file({"header_only": torch.zeros(1)}, str(path), metadata={"config": json.dumps(metadata)})
            checkpoints[model, kind] = path
    image = work / "in.png"
    Image.new("RGB", (1216, 704), (90, 140, 200)).save(image)
    return {"text_root": text_root, "checkpoints": checkpoints, "image": image}


def run_case(case: Case, files: dict[str, Any], models: RandomModels, out: Path, device: str) -> dict[str, Any]:
    checkpoints = files["checkpoints"]
    dev, distilled = str(checkpoints[case.model, "dev"]), str(checkpoints[case.model, "distilled"])
    spec = JobSpec.model_validate({
        "request": {"prompt": "waves roll onto a sandy beach at sunset", "family": "ltxv", "width": case.width,
                    "height": case.height, "frames": case.frames, "steps": case.steps, "seed": 7,
                    "pipeline": case.pipeline, "audio": False},
        "image_path": str(files["image"]),
        "output_path": str(out / "clips" / f"{case.name.replace(' ', '_')}.mp4"),
        "ltxv_models": {"checkpoint": dev, "distilled_checkpoint": distilled,
                        "spatial_upsampler": dev, "text_encoder_root": str(files["text_root"])},
        "tiling": TINY_TILING if case.model == "tiny" else DEFAULT_TILING,
        "device": device,
    })
    events: list[tuple[float, Any]] = []
    models.params.clear()
    started = time.perf_counter()
    done = ltxv.generate(spec, lambda event: events.append((time.perf_counter(), event)),
                         loaders=models.loaders())
    seconds = time.perf_counter() - started
    phases = [e.model_dump(exclude={"event"}) for _, e in events if isinstance(e, PhaseEvent)]
    return {
        "case": case.__dict__,
        "seconds": round(seconds, 2),
        "phases": phases,
        "step_seconds": _step_seconds(events),
        "params_billions": {k: round(v, 3) for k, v in models.params.items()},
        "frames": done.frames,
        "size": [done.width, done.height],
        "leaked_models": done.leaked_models,
    }


def _step_seconds(events: list[tuple[float, Any]]) -> dict[str, float]:
    """Median seconds per denoising step of each pass, from the progress events' arrival times."""
    result = {}
    for stage in ("generating", "refining"):
        times = [t for t, e in events if isinstance(e, ProgressEvent) and e.stage == stage]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        if gaps:
            result[stage] = round(statistics.median(gaps), 3)
    return result


def check_params(results: list[dict[str, Any]]) -> list[str]:
    problems = []
    for result in results:
        model = result["case"]["model"]
        if model == "tiny":
            continue
        for name, key in ((model, "transformer"), ("t5", "t5")):
            low, high = EXPECTED_BILLIONS[name]
            value = result["params_billions"].get(key, 0.0)
            if not low <= value <= high:
                problems.append(f"{result['case']['name']}: {key} has {value:.2f} B parameters, expected {low}-{high}")
    return problems


def markdown_table(report: dict[str, Any]) -> str:
    results = report["results"]
    header = "| phase | " + " | ".join(r["case"]["name"] for r in results) + " |"
    lines = [header, "| --- |" + " --- |" * len(results)]

    def cell(result: dict[str, Any], phase: str) -> str:
        for p in result["phases"]:
            if p["name"] == phase:
                peak = p["peak_allocated_gib"] if p["peak_allocated_gib"] is not None else p["peak_rss_gib"]
                return f"{peak:.2f} ({p['seconds']:.1f} s)"
        return "-"

    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(cell(r, phase) for r in results) + " |")
    peaks = []
    for r in results:
        values = [p["peak_allocated_gib"] or 0.0 for p in r["phases"]]
        reserved = [p["peak_reserved_gib"] or 0.0 for p in r["phases"]]
        peaks.append(f"**{max(values):.2f}** / {max(reserved):.2f}")
    lines.append("| peak allocated / reserved | " + " | ".join(peaks) + " |")
    for stage in ("generating", "refining"):
        lines.append(f"| s/step {stage} | " + " | ".join(
            str(r["step_seconds"].get(stage, "-")) for r in results) + " |")
    lines.append("| whole run, s | " + " | ".join(f"{r['seconds']:.1f}" for r in results) + " |")
    return f"Device: {report['device_name']} · torch {report['torch']}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ltxv_vram", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny configs: test the plumbing on a CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--cases", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = _files(out / "work", args.tiny)
    if args.tiny:
        import generator.ltxv.tiny as tiny

        t5 = tiny.TINY_T5 | {"vocab_size": 64}
        upsampler = tiny.TINY_UPSAMPLER
    else:
        t5 = json.loads((CONFIGS / "t5-v1_1-xxl-encoder.json").read_text())
        upsampler = json.loads((CONFIGS / "ltxv-spatial-upscaler-0.9.8.json").read_text())
    models = RandomModels(t5, upsampler)
    cases = [c for c in (TINY if args.tiny else FULL) if not args.cases or c.name in args.cases]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {"device_name": device_name, "torch": torch.__version__, "results": []}
    for case in cases:
        print(f"running {case.name}", file=sys.stderr, flush=True)
        report["results"].append(run_case(case, files, models, out, args.device))
        (out / "results.json").write_text(json.dumps(report, indent=2))
    report["problems"] = check_params(report["results"])
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(report))
    print(markdown_table(report))
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
