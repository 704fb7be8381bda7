"""Per-job weight loading on real files: today's path, each loading lever alone, and both.

    python -m bench.load --out DIR                          # on the GPU machine (about 8 minutes)
    python -m bench.load --out DIR --tiny --device cpu --no-cold   # the plumbing, on tiny configs

Writes full-size random bf16 files in the official layouts (keys as ``generator/ltx2/tiny.py``
writes them) to ``--work``, then loads every model a two-stage fp8 job builds, in the
job's order, through the generator's own ledger (``generator/ltx2/models.py``), each
measurement in a fresh process (spawned, so no CUDA state is inherited; its imports are
timed apart, as the standby generator has them done before a job arrives). Variants:

- ``today``: ltx-core's reads, stage 2 builds the transformer again with the LoRA;
- ``reuse``: stage 2 fuses the LoRA into stage 1's transformer (reads only the LoRA);
- ``used_keys``: each build reads only the keys its model holds (no connectors twice);
- ``both``: the two together (the generator's default).

Each runs warm (the files in the page cache, as just written) and cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` first), next to a cold ``dd`` of the checkpoint for the disk's
bandwidth. Per model build: seconds, tensor bytes handed out by safetensors, bytes read
from storage (``/proc/self/io``), peak host RSS split into anonymous and file-backed
(``RssAnon``/``RssFile``, sampled), peak GPU memory. Results: ``results.json`` and
``table.md`` under ``--out``.

Not built: the Gemma 3 12B weights (24 GB; with the checkpoint and LoRA they would not fit
a 64 GiB disk). Its root holds the real config (the embeddings processor reads its
dims) and a header-only shard; neither lever changes what the text encoder reads.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

GB = 1e9
GIB = 2**30
LORA_RANK = 384  # ltx-2.3-22b-distilled-lora-384
CHECKPOINT = "ltx-2.3-22b-dev.safetensors"
LORA = "ltx-2.3-22b-distilled-lora-384.safetensors"
UPSAMPLER = "ltx-2.3-spatial-upscaler-x2-1.0.safetensors"


@dataclass(frozen=True)
class Variant:
    name: str
    used_keys_only: bool
    reuse_transformer: bool


VARIANTS = {
    "today": Variant("today", used_keys_only=False, reuse_transformer=False),
    "reuse": Variant("reuse", used_keys_only=False, reuse_transformer=True),
    "used_keys": Variant("used_keys", used_keys_only=True, reuse_transformer=False),
    "both": Variant("both", used_keys_only=True, reuse_transformer=True),
}
# What runs first when time is short: the two ends, then each lever alone.
ORDER = ["today", "both", "reuse", "used_keys"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json and table.md go here")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ltxbot-load"),
                        help="where the model files go, on a real disk (removed after)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: test the plumbing on a CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--variants", nargs="*", default=ORDER, choices=ORDER)
    parser.add_argument("--no-cold", action="store_true", help="skip the page-cache drops (needs root)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting measurements that would end after this many seconds (default 480)")
    parser.add_argument("--keep-files", action="store_true", help="leave the model files in --work")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(args.work, args.device), "runs": [], "skipped": []}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(markdown_table(results))

    try:
        files = build_files(args.work, tiny=args.tiny)
        results["files"] = files
        save()
        if "error" in files:
            print(files["error"], file=sys.stderr)
            return 1
        results["imports"] = import_seconds()
        # Spawned, not forked: a fork of a process whose imports touched CUDA cannot use it
        # (measured: "Cannot re-initialize CUDA in forked subprocess" on the H200).
        context = multiprocessing.get_context("spawn")

        def elapsed() -> float:
            return time.perf_counter() - started

        plan = [(name, "warm") for name in args.variants]
        if not args.no_cold:
            plan += [(name, "cold") for name in args.variants]
        dd_done = args.no_cold
        last_seconds: dict[tuple[str, str], float] = {}
        for name, mode in plan:
            if mode == "cold" and not dd_done:
                results["disk"] = disk_bandwidth(Path(files["checkpoint"]["path"]))
                dd_done = True
                save()
            estimate = last_seconds.get((name, mode)) or _estimate(results, files, name, mode)
            if elapsed() + estimate > args.budget_s:
                results["skipped"].append({"variant": name, "mode": mode, "estimate_s": round(estimate, 1),
                                           "reason": f"would end after the {args.budget_s:.0f} s budget"})
                continue
            print(f"[{elapsed():6.1f} s] {name} {mode}", file=sys.stderr, flush=True)
            run = run_measurement(context, VARIANTS[name], mode, files, args.device)
            last_seconds[(name, mode)] = run.get("wall_s", estimate)
            results["runs"].append(run)
            save()
    finally:
        if not args.keep_files:
            shutil.rmtree(args.work / "models", ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    failed = [r for r in results["runs"] if r.get("error")]
    print(f"wrote {args.out}/results.json; {len(results['runs'])} runs, {len(failed)} failed, "
          f"{len(results['skipped'])} skipped", file=sys.stderr)
    return 1 if failed else 0


# --- machine ------------------------------------------------------------------------------------


def _meminfo_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    return None


def machine_info(work: Path, device: str) -> dict[str, Any]:
    import torch

    work.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(work)
    filesystem = _filesystem(work)
    versions = {}
    for package in ("ltx-core", "ltx-pipelines", "safetensors", "transformers"):
        try:
            import importlib.metadata

            versions[package] = importlib.metadata.version(package)
        except Exception:  # a missing version is reported, not fatal
            versions[package] = "?"
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, **versions,
        "cpus": os.cpu_count(), "ram_gib": _meminfo_gib("MemTotal"),
        "disk_total_gib": round(disk.total / GIB, 1), "disk_free_gib": round(disk.free / GIB, 1),
        "work_filesystem": filesystem,
        "date": time.strftime("%Y-%m-%d"),
    }


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs would keep the files in RAM: no cold run)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def import_seconds() -> float:
    """What a cold generator pays before its first phase for these imports (the standby hides it)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import generator.ltx2.models, generator.ltx2.pipeline"], check=True)
    return round(time.perf_counter() - t0, 2)


def _drop_caches() -> str | None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"cannot drop the page cache: {exc}"
    return None


def disk_bandwidth(path: Path) -> dict[str, Any]:
    error = _drop_caches()
    if error:
        return {"error": error}
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {"what": f"cold dd of {path.name}", "bytes": size, "seconds": round(seconds, 2),
            "gb_per_s": round(size / GB / seconds, 3)}


# --- files --------------------------------------------------------------------------------------


def _state_shapes(configurator: Any, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = configurator.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def checkpoint_layout(config: dict[str, Any], gemma_root: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official single-file checkpoint (the prefixes ``generator/ltx2/tiny.py`` writes)."""
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, AudioEncoderConfigurator, VocoderConfigurator
    from ltx_core.model.transformer import LTXModelConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

    from generator.ltx2.models import EmbeddingsProcessorForGemma

    layout = {f"model.diffusion_model.{k}": s for k, s in _state_shapes(LTXModelConfigurator, config).items()}
    for vae, parts in (("vae", (("encoder", VideoEncoderConfigurator), ("decoder", VideoDecoderConfigurator))),
                       ("audio_vae", (("encoder", AudioEncoderConfigurator), ("decoder", AudioDecoderConfigurator)))):
        for part, configurator in parts:
            for key, shape in _state_shapes(configurator, config).items():
                shared = key.startswith("per_channel_statistics.")
                layout[f"{vae}.{key}" if shared else f"{vae}.{part}.{key}"] = shape
    layout |= {f"vocoder.{k}": s for k, s in _state_shapes(VocoderConfigurator, config).items()}
    processor = EmbeddingsProcessorForGemma.for_root(gemma_root)
    renames = {"feature_extractor.": "text_embedding_projection.",
               "video_connector.": "model.diffusion_model.video_embeddings_connector.",
               "audio_connector.": "model.diffusion_model.audio_embeddings_connector."}
    for key, shape in _state_shapes(processor, config).items():
        for old, new in renames.items():
            if key.startswith(old):
                layout[new + key.removeprefix(old)] = shape
    return layout


def lora_layout(config: dict[str, Any], rank: int) -> dict[str, tuple[int, ...]]:
    """The distilled LoRA's keys: every Linear of the transformer blocks but the attention gates.

    At rank 384 that is 7.40 GB, the size of ``ltx-2.3-22b-distilled-lora-384.safetensors``.
    """
    import torch
    from ltx_core.model.transformer import LTXModelConfigurator

    with torch.device("meta"):
        model = LTXModelConfigurator.from_config(config)
    layout: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and (
                not name.endswith("to_gate_logits")):
            layout[f"diffusion_model.{name}.lora_A.weight"] = (rank, module.in_features)
            layout[f"diffusion_model.{name}.lora_B.weight"] = (module.out_features, rank)
    return layout


def upsampler_layout(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator

    return _state_shapes(LatentUpsamplerConfigurator, config)


def _nbytes(layout: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) * 2 for shape in layout.values())


def random_pool(size: int) -> memoryview:
    """One buffer of random bf16 (normal, std 0.02) that every tensor is cut from."""
    import torch

    generator = torch.Generator().manual_seed(20261201)
    values = torch.empty(size // 2, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
    return values.view(torch.uint8).numpy().data.cast("B")


def write_safetensors(path: Path, layout: dict[str, tuple[int, ...]], metadata: dict[str, str],
                      pool: memoryview) -> int:
    """A bf16 safetensors file written directly: header, then each tensor cut from ``pool``.

    Each tensor starts at its own offset in the pool (from its key), so no two share their
    first bytes; memory and time do not depend on the values.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, shape in layout.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for key, shape in layout.items():
            left = math.prod(shape) * 2
            start = (zlib.crc32(key.encode()) * 2) % len(pool)
            while left:
                piece = pool[start : start + left]
                handle.write(piece)
                left -= len(piece)
                start = 0
    return path.stat().st_size


def _gemma_root(models: Path, tiny: bool) -> Path:
    """A Gemma root the ledger accepts: tokenizer, processor config, config.json, a header-only shard."""
    import torch
    from safetensors.torch import save_file

    from generator.ltx2.tiny import write_tiny_gemma

    root = models / "gemma-3-12b-it"
    write_tiny_gemma(root, torch.Generator().manual_seed(1))
    if not tiny:
        from ltx_core.text_encoders.gemma.config import GEMMA3_CONFIG_FOR_LTX

        (root / "config.json").write_text(json.dumps(GEMMA3_CONFIG_FOR_LTX.to_dict()))
        save_file({"header_only": torch.zeros(1)}, str(root / "model-00001-of-00001.safetensors"))
    return root


def build_files(work: Path, *, tiny: bool) -> dict[str, Any]:
    from generator.ltx2.tiny import MODEL_VERSION, TINY_UPSAMPLER, tiny_checkpoint_config

    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    t0 = time.perf_counter()
    if tiny:
        config, upsampler_config, rank = tiny_checkpoint_config(), TINY_UPSAMPLER, 4
    else:
        from bench.random_weights import full_configs

        config, upsampler_config, _ = full_configs()
        rank = LORA_RANK
    gemma = _gemma_root(models, tiny)
    files: dict[str, Any] = {"gemma_root": {"path": str(gemma), "note": "config and tokenizer only: not loaded"}}
    if _filesystem(models) in ("tmpfs", "ramfs"):
        files["error"] = f"{work} is on {_filesystem(models)}: the files would sit in RAM; pass --work on a disk"
        return files
    free = shutil.disk_usage(models).free
    checkpoint = checkpoint_layout(config, gemma)
    upsampler = upsampler_layout(upsampler_config)
    # A smaller disk gets a lower-rank LoRA rather than no run (the table says which rank).
    for lora_rank in (rank, rank * 2 // 3, rank // 2, rank // 4):
        lora = lora_layout(config, lora_rank)
        needed = _nbytes(checkpoint) + _nbytes(lora) + _nbytes(upsampler)
        if needed + 2 * GIB <= free:
            break
    else:
        files["error"] = (f"the files need {needed / GB:.1f} GB even with a rank-{lora_rank} LoRA and {work} has "
                          f"{free / GB:.1f} GB free (2 GiB kept spare)")
        return files
    files["lora_rank"] = lora_rank
    layouts = {
        "checkpoint": (CHECKPOINT, checkpoint, {"config": json.dumps(config), "model_version": MODEL_VERSION}),
        "distilled_lora": (LORA, lora, {}),
        "spatial_upsampler": (UPSAMPLER, upsampler, {"config": json.dumps(upsampler_config)}),
    }
    pool = random_pool(256 * 2**20 if not tiny else 2**20)
    for name, (filename, layout, metadata) in layouts.items():
        t1 = time.perf_counter()
        size = write_safetensors(models / filename, layout, metadata, pool)
        connectors = sum(math.prod(s) * 2 for k, s in layout.items() if "embeddings_connector" in k)
        files[name] = {"path": str(models / filename), "bytes": size, "tensor_bytes": _nbytes(layout),
                       "tensors": len(layout),
                       "write_s": round(time.perf_counter() - t1, 2)}
        if connectors:
            files[name]["connector_bytes"] = connectors
    files["write_s"] = round(time.perf_counter() - t0, 2)
    return files


# --- one measurement (runs in a forked child) -------------------------------------------------


def _status_kib() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                values[name] = int(rest.split()[0])
    except OSError:
        pass
    return values


def _storage_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler:
    """Peaks of RssAnon and RssFile, sampled every few milliseconds (the kernel keeps only VmHWM)."""

    def __init__(self, every_s: float = 0.005) -> None:
        self.every_s = every_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def sample(self) -> None:
        for name, kib in _status_kib().items():
            self.peaks[name] = max(self.peaks.get(name, 0), kib)

    def reset(self) -> None:
        self.peaks = {}
        self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class CountingOpen:
    """``safetensors.safe_open`` that counts the tensors it hands out (any loader, ours or ltx-core's)."""

    real: Any = None
    tensors = 0
    nbytes = 0
    by_file: ClassVar[dict[str, int]] = {}

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        self.inner = CountingOpen.real(path, *args, **kwargs)
        self.name = Path(path).name

    def __enter__(self) -> CountingOpen:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self.inner.__exit__(*exc)

    def keys(self) -> Any:
        return self.inner.keys()

    def metadata(self) -> Any:
        return self.inner.metadata()

    def get_slice(self, key: str) -> Any:
        """The header's shape only: a slice that could read data is not handed out."""
        shape = self.inner.get_slice(key).get_shape()
        return type("Shape", (), {"get_shape": lambda self: shape})()

    def get_tensor(self, key: str) -> Any:
        tensor = self.inner.get_tensor(key)
        CountingOpen.tensors += 1
        CountingOpen.nbytes += tensor.nbytes
        CountingOpen.by_file[self.name] = CountingOpen.by_file.get(self.name, 0) + tensor.nbytes
        return tensor

    @classmethod
    def install(cls) -> None:
        import safetensors

        if cls.real is None:
            cls.real = safetensors.safe_open
            safetensors.safe_open = cls  # type: ignore[misc,assignment]

    @classmethod
    def take(cls) -> tuple[int, int, dict[str, int]]:
        counts = (cls.tensors, cls.nbytes, dict(cls.by_file))
        cls.tensors, cls.nbytes, cls.by_file = 0, 0, {}
        return counts


def job_loads(variant: Variant, files: dict[str, Any], device: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The models a two-stage job builds, in its order, each freed when the pipeline frees it.

    Yields (name, build); the caller times each build and drops what it returns. Gemma is
    left out (no weights on disk, see the module docstring).
    """
    import torch
    from ltx_core.loader import LoraPathStrengthAndSDOps
    from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
    from ltx_core.quantization import QuantizationPolicy

    from generator.ltx2.models import LtxLedger

    ledger = LtxLedger(
        dtype=torch.bfloat16, device=device, checkpoint_path=files["checkpoint"]["path"],
        gemma_root_path=files["gemma_root"]["path"], spatial_upsampler_path=files["spatial_upsampler"]["path"],
        quantization=QuantizationPolicy.fp8_cast(), used_keys_only=variant.used_keys_only,
    )
    lora = LoraPathStrengthAndSDOps(files["distilled_lora"]["path"], 1.0, LTXV_LORA_COMFY_RENAMING_MAP)
    kept: list[Any] = []
    yield "embeddings processor", ledger.gemma_embeddings_processor
    yield "video encoder", ledger.video_encoder

    def stage_1() -> Any:
        model = ledger.transformer()
        if variant.reuse_transformer:
            kept.append(model)
        return model

    yield "transformer (stage 1)", stage_1
    yield "video encoder (upsample)", ledger.video_encoder
    yield "spatial upsampler", ledger.spatial_upsampler

    def stage_2() -> Any:
        return ledger.transformer_with_loras((lora,), kept=kept.pop() if kept else None)

    yield "transformer + LoRA (stage 2)", stage_2
    yield "audio decoder", ledger.audio_decoder
    yield "vocoder", ledger.vocoder
    yield "video decoder", ledger.video_decoder


def measure(variant: Variant, mode: str, files: dict[str, Any], device_name: str) -> dict[str, Any]:
    import torch

    from generator.phases import release_memory, synchronize

    device = torch.device(device_name)
    result: dict[str, Any] = {"variant": variant.name, "mode": mode, **asdict(variant), "builds": []}
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    result["cuda_init_s"] = round(time.perf_counter() - t0, 2)
    CountingOpen.install()
    CountingOpen.take()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline = _status_kib()  # libraries and imports, before any weight
    result["baseline_rss_anon_gib"] = round(baseline.get("RssAnon", 0) * 1024 / GIB, 3)
    result["baseline_rss_file_gib"] = round(baseline.get("RssFile", 0) * 1024 / GIB, 3)
    loads_started = time.perf_counter()
    with torch.inference_mode(), RssSampler() as sampler:
        for name, build in job_loads(variant, files, device):
            release_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sampler.reset()
            storage_before = _storage_read_bytes()
            t1 = time.perf_counter()
            model = build()
            synchronize(device)
            seconds = time.perf_counter() - t1
            sampler.sample()
            storage_after = _storage_read_bytes()
            tensors, nbytes, by_file = CountingOpen.take()
            entry: dict[str, Any] = {
                "model": name, "seconds": round(seconds, 3), "tensors": tensors, "bytes": nbytes,
                "bytes_by_file": by_file,
                "storage_read_bytes": None if storage_before is None or storage_after is None
                else storage_after - storage_before,
                "peak_rss_anon_gib": round(sampler.peaks.get("RssAnon", 0) * 1024 / GIB, 3),
                "peak_rss_file_gib": round(sampler.peaks.get("RssFile", 0) * 1024 / GIB, 3),
            }
            if device.type == "cuda":
                entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
            result["builds"].append(entry)
            del model
        release_memory(device)
    builds = result["builds"]
    result["load_s"] = round(time.perf_counter() - loads_started, 2)
    result["build_s"] = round(sum(b["seconds"] for b in builds), 2)
    result["bytes"] = sum(b["bytes"] for b in builds)
    storage = [b["storage_read_bytes"] for b in builds]
    result["storage_read_bytes"] = None if None in storage else sum(storage)
    result["peak_rss_anon_gib"] = max(b["peak_rss_anon_gib"] for b in builds)
    result["peak_rss_file_gib"] = max(b["peak_rss_file_gib"] for b in builds)
    result["vm_hwm_gib"] = round(_status_kib().get("VmHWM", 0) * 1024 / GIB, 3)
    return result


def _child(queue: Any, variant: Variant, mode: str, files: dict[str, Any], device: str) -> None:
    try:
        queue.put(measure(variant, mode, files, device))
    except Exception as exc:  # the parent reports it and goes on
        queue.put({"variant": variant.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})


def run_measurement(context: Any, variant: Variant, mode: str, files: dict[str, Any], device: str) -> dict[str, Any]:
    dropped = _drop_caches() if mode == "cold" else None
    if dropped:
        return {"variant": variant.name, "mode": mode, "error": dropped}
    queue = context.Queue()
    t0 = time.perf_counter()
    process = context.Process(target=_child, args=(queue, variant, mode, files, device))
    process.start()
    result: dict[str, Any] = queue.get()
    process.join()
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    if process.exitcode:
        result.setdefault("error", f"exit code {process.exitcode}")
    return result


def _estimate(results: dict[str, Any], files: dict[str, Any], name: str, mode: str) -> float:
    """Seconds a measurement may take, to decide whether it still fits the budget."""
    size = files["checkpoint"]["bytes"] + files["distilled_lora"]["bytes"]
    reads = size * (1 if VARIANTS[name].reuse_transformer else 2)
    speed = 4.0 * GB  # warm: about the pageable host-to-GPU copy
    if mode == "cold":
        speed = float((results.get("disk") or {}).get("gb_per_s", 1.5)) * GB
    return float(10.0 + reads / speed)


# --- report -------------------------------------------------------------------------------------


def _gb(value: int | None) -> str:
    """GB with two decimals; small amounts (the tiny files) in MB so they do not read as zero."""
    if value is None:
        return "-"
    return f"{value / GB:.2f}" if value >= 0.1 * GB or value == 0 else f"{value / GB * 1000:.2f} MB"


def markdown_table(results: dict[str, Any]) -> str:
    machine = results.get("machine", {})
    files = results.get("files", {})
    disk = results.get("disk") or {}
    lines = [
        f"Device: {machine.get('device')}; {machine.get('cpus')} CPUs, {machine.get('ram_gib')} GiB RAM, disk "
        f"{machine.get('disk_total_gib')} GiB ({machine.get('disk_free_gib')} GiB free); torch "
        f"{machine.get('torch')}, ltx-core {machine.get('ltx-core')}, safetensors {machine.get('safetensors')}; "
        f"{machine.get('date')}.",
        "",
    ]
    if "checkpoint" in files:
        lines.append(
            f"Files (random bf16, official layouts): checkpoint {_gb(files['checkpoint']['bytes'])} GB "
            f"(connectors {_gb(files['checkpoint'].get('connector_bytes'))} GB), distilled LoRA "
            f"{_gb(files['distilled_lora']['bytes'])} GB (rank {files.get('lora_rank')}), "
            f"upsampler {_gb(files['spatial_upsampler']['bytes'])} GB; "
            f"written in {files.get('write_s')} s. Gemma not built (not loaded).")
    if files.get("error"):
        lines.append(f"Files not built: {files['error']}")
    if disk.get("gb_per_s"):
        lines.append(f"Disk: {disk['what']}: {disk['gb_per_s']:.2f} GB/s ({disk['seconds']} s).")
    elif disk.get("error"):
        lines.append(f"Disk bandwidth not measured: {disk['error']}")
    if results.get("imports") is not None:
        lines.append(f"Imports of a cold generator (hidden by the standby, not in the figures below): "
                     f"{results['imports']} s.")
    runs = [r for r in results.get("runs", []) if not r.get("error")]
    if runs:
        header = [f"{r['variant']} {r['mode']}" for r in runs]
        lines += ["", "Seconds per model build (GB read):", "",
                  "| build | " + " | ".join(header) + " |", "|---|" + "---|" * len(runs)]
        for model in [b["model"] for b in runs[0]["builds"]]:
            cells = []
            for run in runs:
                found = next((b for b in run["builds"] if b["model"] == model), None)
                cells.append("" if found is None else f"{found['seconds']:.2f} ({_gb(found['bytes'])})")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
            ("**all builds, s**", lambda r: f"**{r['build_s']:.2f}**"),
            ("tensor bytes read, GB", lambda r: _gb(r["bytes"])),
            ("read from storage, GB", lambda r: _gb(r["storage_read_bytes"])),
            ("peak RssAnon, GiB", lambda r: f"{r['peak_rss_anon_gib']:.2f}"),
            ("peak RssFile, GiB", lambda r: f"{r['peak_rss_file_gib']:.2f}"),
            ("RssAnon / RssFile before the first build, GiB",
             lambda r: f"{r['baseline_rss_anon_gib']:.2f} / {r['baseline_rss_file_gib']:.2f}"),
            ("CUDA init, s", lambda r: f"{r['cuda_init_s']:.2f}"),
        ]
        for label, cell in rows:
            lines.append(f"| {label} | " + " | ".join(cell(r) for r in runs) + " |")
        lines += target_lines(results)
    failed = [r for r in results.get("runs", []) if r.get("error")]
    for run in failed:
        lines.append(f"- {run['variant']} {run['mode']} failed: {run['error']}")
    for skip in results.get("skipped", []):
        lines.append(f"- {skip['variant']} {skip['mode']} not run: {skip['reason']} (estimate {skip['estimate_s']} s)")
    return "\n".join(lines) + "\n"


def target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's loading targets, judged from the figures (Gemma's load is not in them)."""
    runs = {(r["variant"], r["mode"]): r for r in results.get("runs", []) if not r.get("error")}
    rows = []
    today, both = runs.get(("today", "warm")), runs.get(("both", "warm"))
    if both:
        before_stage_1 = sum(b["seconds"] for b in both["builds"][:3])
        rows.append(("warm: loads before the first denoise step <= 5 s (Gemma not included)",
                     f"{before_stage_1:.2f} s", "met" if before_stage_1 <= 5 else "missed"))
        rows.append(("warm: loading in the whole job <= 10 s (Gemma not included)", f"{both['build_s']:.2f} s"
                     + (f" (today {today['build_s']:.2f} s)" if today else ""),
                     "met" if both["build_s"] <= 10 else "missed"))
    cold, disk = runs.get(("both", "cold")), results.get("disk") or {}
    if cold and disk.get("gb_per_s"):
        floor = cold["bytes"] / GB / disk["gb_per_s"]
        rows.append(("cold: loading <= 1.3 x bytes / disk bandwidth",
                     f"{cold['build_s']:.2f} s vs 1.3 x {floor:.2f} s = {1.3 * floor:.2f} s",
                     "met" if cold["build_s"] <= 1.3 * floor else "missed"))
    if not rows:
        return []
    return ["", "Targets:", "", "| target | measured | result |", "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


if __name__ == "__main__":
    sys.exit(main())
