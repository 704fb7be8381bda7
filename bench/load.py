"""Per-job weight loading on real files: today's path, each loading lever alone, and both.

    python -m bench.load --out DIR                          # on the GPU machine (about 8 minutes)
    python -m bench.load --out DIR --tiny --device cpu --no-cold   # the plumbing, on tiny configs
    python -m bench.load --out DIR --gemma-only --budget-s 300 --skip-imports   # Gemma alone (2-3 minutes, estimated)
    python -m bench.load --out DIR --gemma-only --tiny --device cpu --no-cold   # its plumbing

Writes full-size random bf16 files in the official layouts (keys as ``generator/ltx2/tiny.py``
writes them) to ``--work``, then loads every model a two-stage fp8 job builds, in the
job's order, through the generator's own ledger (``generator/ltx2/models.py``), each
measurement in a fresh process (spawned, so no CUDA state is inherited; its imports are
timed apart, as the standby generator has them done before a job arrives). Variants:

- ``today``: ltx-core's reads, stage 2 builds the transformer again with the LoRA;
- ``reuse``: stage 2 fuses the LoRA into stage 1's transformer (reads only the LoRA);
- ``used_keys``: each build reads only the keys its model holds (no connectors twice);
- ``both``: the two together (the generator's path without the levers below);
- ``prepare``: ``both`` with an empty prepared cache (the first job: it writes the entry);
- ``prepared``: ``both`` reading the fp8-cast transformer from the prepared cache;
- ``staged``: ``both`` after staging the last job's reads into host memory, as the standby does;
- ``all``: prepared and staged (the generator with ``host_ram_budget_gib`` set).

The default runs the last five (``--variants``, ``--cold-variants``); ``today``, ``reuse``
and ``used_keys`` were measured in ``bench/results/h200-load/``.

Each runs warm (the files in the page cache, as just written) and cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` first), next to a cold ``dd`` of the checkpoint for the disk's
bandwidth. Per model build: seconds, tensor bytes handed out by safetensors, bytes read
from storage (``/proc/self/io``), peak host RSS split into anonymous and file-backed
(``RssAnon``/``RssFile``, sampled), peak GPU memory. Results: ``results.json`` and
``table.md`` under ``--out``.

A whole job's run does not build the Gemma 3 12B weights (24 GB; with the checkpoint and
LoRA they would not fit a 64 GiB disk). Its root holds the real config (the embeddings
processor reads its dims) and a header-only shard; neither lever changes what the text
encoder reads.

``--gemma-only`` writes a Gemma root alone, full size and nothing else: the real config
(``GEMMA3_CONFIG_FOR_LTX``), ``write_tiny_gemma``'s tokenizer and processor files, and random
bf16 weights under google/gemma-3-12b-it's key names and shapes, split as ``save_pretrained``
splits them (5 GB shards, ``model-0000K-of-0000N.safetensors``, and the
``model.safetensors.index.json`` the released root has, though ltx-core's loader globs the
shards and never reads it). Each measurement builds the text encoder as a job's
``text_encode`` phase does (``LtxLedger.text_encoder`` on the device, bf16 in an fp8 job, through
the job's ``WeightStore``). Variants: ``gemma`` (the generator's path) and ``gemma_staged``
(the last ``gemma`` run's reads staged into host memory first: staging covers Gemma, whose reads
go through the store and lead a job's plan). By default each runs warm and ``gemma`` cold too,
the disk's bandwidth from a cold ``dd`` of the first shard. The tokenizer is the tiny one: the
released tokenizer, which the build also loads, is not timed.
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
GEMMA_ROOT = "gemma-3-12b-it"
GEMMA_INDEX = "model.safetensors.index.json"
# save_pretrained's max_shard_size="5GB", in which google/gemma-3-12b-it ships (5 shards); the
# tiny Gemma gets shards small enough that it has several too.
GEMMA_SHARD_BYTES = 5 * 10**9
TINY_GEMMA_SHARD_BYTES = 2**16


@dataclass(frozen=True)
class Variant:
    name: str
    used_keys_only: bool
    reuse_transformer: bool
    # Read the transformer through the prepared cache; ``fresh_cache``: empty it first (the first job).
    prepared: bool = False
    fresh_cache: bool = False
    # The process stages the last job's reads into host memory first, as the standby does.
    staged: bool = False
    # Only the Gemma text encoder is built (``--gemma-only``); the transformer's levers do not apply.
    gemma: bool = False


VARIANTS = {
    "today": Variant("today", used_keys_only=False, reuse_transformer=False),
    "reuse": Variant("reuse", used_keys_only=False, reuse_transformer=True),
    "used_keys": Variant("used_keys", used_keys_only=True, reuse_transformer=False),
    "both": Variant("both", used_keys_only=True, reuse_transformer=True),
    "prepare": Variant("prepare", True, True, prepared=True, fresh_cache=True),
    "prepared": Variant("prepared", True, True, prepared=True),
    "staged": Variant("staged", True, True, staged=True),
    "all": Variant("all", True, True, prepared=True, staged=True),
}
# What runs first when time is short. ``both`` is the generator's path before the prepared
# cache and staging; ``prepare`` is the first job with the cache on (it writes the entry).
ORDER = ["both", "staged", "prepare", "all", "prepared"]
COLD_ORDER = ["prepared", "all", "both", "staged"]
OLD_ORDER = ["today", "both", "reuse", "used_keys"]
GEMMA_VARIANTS = {
    "gemma": Variant("gemma", used_keys_only=True, reuse_transformer=False, gemma=True),
    "gemma_staged": Variant("gemma_staged", True, False, staged=True, gemma=True),
}
GEMMA_ORDER = ["gemma", "gemma_staged"]
# A cold gemma_staged would time the standby's staging from the disk, hidden from the job: not by default.
GEMMA_COLD_ORDER = ["gemma"]
ALL_VARIANTS = VARIANTS | GEMMA_VARIANTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json and table.md go here")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ltxbot-load"),
                        help="where the model files go, on a real disk (removed after)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: test the plumbing on a CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gemma-only", action="store_true",
                        help="write only a full-size Gemma 3 12B root and measure the text encoder's build")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(ALL_VARIANTS),
                        help=f"warm runs (default {' '.join(ORDER)}; with --gemma-only {' '.join(GEMMA_ORDER)})")
    parser.add_argument("--cold-variants", nargs="*", default=None, choices=list(ALL_VARIANTS),
                        help=f"cold runs (default {' '.join(COLD_ORDER)}; with --gemma-only "
                             f"{' '.join(GEMMA_COLD_ORDER)})")
    parser.add_argument("--host-ram-gib", type=float, default=64.0,
                        help="the staging variants' host RAM budget (generator.host_ram_budget_gib)")
    parser.add_argument("--prepared-gib", type=float, default=40.0, help="the prepared cache's bound")
    parser.add_argument("--skip-imports", action="store_true", help="do not time a cold generator's imports")
    parser.add_argument("--previous", type=Path, default=None,
                        help="an earlier results.json of the same machine kind: its 'both' stage-2 builds stand "
                             "in for a mode this run has none of (after the LoRA was deleted)")
    parser.add_argument("--no-cold", action="store_true", help="skip the page-cache drops (needs root)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting measurements that would end after this many seconds (default 480)")
    parser.add_argument("--keep-files", action="store_true", help="leave the model files in --work")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warm, cold = chosen_variants(parser, args)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(args.work, args.device), "runs": [], "skipped": []}
    if args.gemma_only:
        results["mode"] = "gemma_only"
    if args.previous is not None and args.previous.exists():
        previous = json.loads(args.previous.read_text())
        results["previous_runs"] = [r for r in previous.get("runs", []) if r.get("variant") == "both"]
        results["previous_source"] = str(args.previous)

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "table.md").write_text(markdown_table(results))

    try:
        files = (build_gemma_files if args.gemma_only else build_files)(args.work, tiny=args.tiny)
        results["files"] = files
        save()
        if "error" in files:
            print(files["error"], file=sys.stderr)
            return 1
        results["imports"] = None if args.skip_imports else import_seconds()
        # Spawned, not forked: a fork of a process whose imports touched CUDA cannot use it
        # (measured: "Cannot re-initialize CUDA in forked subprocess" on the H200).
        context = multiprocessing.get_context("spawn")

        def elapsed() -> float:
            return time.perf_counter() - started

        plan = measurement_plan(warm, [] if args.no_cold else cold)
        dd_done = args.no_cold
        last_seconds: dict[tuple[str, str], float] = {}
        settings = {"work": str(args.work), "host_ram_gib": args.host_ram_gib, "prepared_gib": args.prepared_gib}
        for name, mode in plan:
            if mode == "cold" and not dd_done:
                read_by_dd = files["gemma"]["shards"][0]["path"] if args.gemma_only else files["checkpoint"]["path"]
                results["disk"] = disk_bandwidth(Path(read_by_dd))
                dd_done = True
                save()
            if ALL_VARIANTS[name].prepared:
                made_room = room_for_prepared(files, args.work)
                if made_room:
                    results.setdefault("notes", []).append(made_room)
                    save()
            estimate = last_seconds.get((name, mode)) or _estimate(results, files, name, mode)
            if elapsed() + estimate > args.budget_s:
                results["skipped"].append({"variant": name, "mode": mode, "estimate_s": round(estimate, 1),
                                           "reason": f"would end after the {args.budget_s:.0f} s budget"})
                continue
            print(f"[{elapsed():6.1f} s] {name} {mode}", file=sys.stderr, flush=True)
            run = run_measurement(context, ALL_VARIANTS[name], mode, files, args.device, settings)
            last_seconds[(name, mode)] = run.get("wall_s", estimate)
            results["runs"].append(run)
            save()
    finally:
        if not args.keep_files:
            for folder in ("models", "prepared", "plans"):
                shutil.rmtree(args.work / folder, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    failed = [r for r in results["runs"] if r.get("error")]
    print(f"wrote {args.out}/results.json; {len(results['runs'])} runs, {len(failed)} failed, "
          f"{len(results['skipped'])} skipped", file=sys.stderr)
    return 1 if failed else 0


# --- machine ------------------------------------------------------------------------------------


def chosen_variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The warm and cold variants asked for, else the mode's defaults; a variant of the other mode is refused."""
    allowed = GEMMA_VARIANTS if args.gemma_only else VARIANTS
    warm = args.variants if args.variants is not None else GEMMA_ORDER if args.gemma_only else ORDER
    cold = args.cold_variants if args.cold_variants is not None else (
        GEMMA_COLD_ORDER if args.gemma_only else COLD_ORDER)
    wrong = [name for name in (*warm, *cold) if name not in allowed]
    if wrong:
        mode = "--gemma-only" if args.gemma_only else "a whole job (without --gemma-only)"
        parser.error(f"{', '.join(wrong)}: not a variant of {mode}; choose from {', '.join(allowed)}")
    return list(warm), list(cold)


def measurement_plan(warm: list[str], cold: list[str]) -> list[tuple[str, str]]:
    """Warm runs, those without the prepared cache first (the disk may have to give up the LoRA
    to hold the prepared copy: see room_for_prepared), then the cold ones in the order given."""
    return ([(n, "warm") for n in warm if not ALL_VARIANTS[n].prepared]
            + [(n, "warm") for n in warm if ALL_VARIANTS[n].prepared]
            + [(n, "cold") for n in cold])


def room_for_prepared(files: dict[str, Any], work: Path) -> str | None:
    """Delete the LoRA when the disk cannot hold the prepared transformer beside the files; say so."""
    lora = Path(files["distilled_lora"]["path"])
    if not lora.exists() or any((work / "prepared").glob("*.safetensors")):
        return None
    need = files["checkpoint"].get("transformer_fp8_bytes", 0) + 2 * GIB
    if shutil.disk_usage(work).free >= need:
        return None
    lora.unlink()
    files["distilled_lora"]["removed"] = True
    return (f"the LoRA ({files['distilled_lora']['bytes'] / GB:.2f} GB) was deleted before the prepared-cache "
            f"runs to make room for the prepared transformer on the disk: those runs have no stage-2 build; "
            f"their whole-job totals add the stage-2 build of the same mode's 'both' run "
            f"(this run's, else --previous's)")


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


FP8_SUFFIXES = tuple(f"{p}.{w}" for p in (".to_q", ".to_k", ".to_v", ".to_out.0", "ff.net.0.proj", "ff.net.2")
                     for w in ("weight", "bias"))


def fp8_bytes(layout: dict[str, tuple[int, ...]]) -> int:
    """The transformer's bytes once fp8-cast (ltx-core's TRANSFORMER_LINEAR_DOWNCAST_MAP): its prepared copy."""
    total = 0
    for key, shape in layout.items():
        inner = key.removeprefix("model.diffusion_model.")
        if inner == key or "embeddings_connector" in key:
            continue
        cast = inner.startswith("transformer_blocks.") and inner.endswith(FP8_SUFFIXES)
        total += math.prod(shape) * (1 if cast else 2)
    return total


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
        if name == "checkpoint":
            files[name]["transformer_fp8_bytes"] = fp8_bytes(layout)
    files["write_s"] = round(time.perf_counter() - t0, 2)
    return files


def gemma_layout(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of google/gemma-3-12b-it's safetensors (the names ``write_tiny_gemma`` writes), in
    the model's state-dict order: vision tower, projector, language model, the order
    ``save_pretrained`` fills shards in. No ``lm_head``: it is tied to the token embedding."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from generator.ltx2.tiny import official_gemma_key

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config.from_dict(config))
    return {official_gemma_key(key): tuple(value.shape) for key, value in model.state_dict().items()
            if value.is_floating_point() and not key.startswith("lm_head.")}


def shard_layout(layout: dict[str, tuple[int, ...]], max_bytes: int) -> list[dict[str, tuple[int, ...]]]:
    """``layout`` split as ``save_pretrained`` splits a state dict: in order, a new shard whenever the
    next tensor would take this one past ``max_bytes``. Each shard's tensors are in name order, the
    order safetensors writes a file in (and ``keys()`` lists), so a build reads each shard front to back."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, shape in layout.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    return [dict(sorted(shard.items())) for shard in shards]


def build_gemma_files(work: Path, *, tiny: bool) -> dict[str, Any]:
    """Only a Gemma 3 root (``--gemma-only``): config, tokenizer and processor files, and the sharded weights."""
    import torch

    from generator.ltx2.tiny import TINY_GEMMA, write_tiny_gemma

    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    t0 = time.perf_counter()
    root = models / GEMMA_ROOT
    write_tiny_gemma(root, torch.Generator().manual_seed(1))
    (root / "model-00001-of-00001.safetensors").unlink()  # its tiny weights: the shards below stand in
    if tiny:
        config = TINY_GEMMA
    else:
        from ltx_core.text_encoders.gemma.config import GEMMA3_CONFIG_FOR_LTX

        config = GEMMA3_CONFIG_FOR_LTX.to_dict()
        (root / "config.json").write_text(json.dumps(config))
    files: dict[str, Any] = {"gemma_root": {"path": str(root)}}
    if _filesystem(models) in ("tmpfs", "ramfs"):
        files["error"] = f"{work} is on {_filesystem(models)}: the files would sit in RAM; pass --work on a disk"
        return files
    layout = gemma_layout(config)
    needed, free = _nbytes(layout), shutil.disk_usage(models).free
    if needed + 2 * GIB > free:
        files["error"] = (f"the Gemma shards need {needed / GB:.1f} GB and {work} has {free / GB:.1f} GB free "
                          f"(2 GiB kept spare)")
        return files
    shards = shard_layout(layout, TINY_GEMMA_SHARD_BYTES if tiny else GEMMA_SHARD_BYTES)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    pool = random_pool(256 * 2**20 if not tiny else 2**20)
    written = []
    for name, shard in zip(names, shards, strict=True):
        t1 = time.perf_counter()
        size = write_safetensors(root / name, shard, {"format": "pt"}, pool)
        text = {k: v for k, v in shard.items() if k.startswith("language_model.model.")}
        written.append({"path": str(root / name), "bytes": size, "tensor_bytes": _nbytes(shard),
                        "text_tensor_bytes": _nbytes(text), "tensors": len(shard),
                        "write_s": round(time.perf_counter() - t1, 2)})
    weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
    index = {"metadata": {"total_size": needed}, "weight_map": dict(sorted(weight_map.items()))}
    (root / GEMMA_INDEX).write_text(json.dumps(index, indent=2))
    files["gemma"] = {
        "root": str(root), "config": "TINY_GEMMA" if tiny else "GEMMA3_CONFIG_FOR_LTX", "shards": written,
        "index": str(root / GEMMA_INDEX), "bytes": sum(s["bytes"] for s in written), "tensor_bytes": needed,
        "tensors": len(layout), "text_tensor_bytes": sum(s["text_tensor_bytes"] for s in written),
    }
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


def job_loads(variant: Variant, files: dict[str, Any], device: Any, store: Any = None) -> Iterator[
        tuple[str, Callable[[], Any]]]:
    """The models a two-stage job builds, in its order, each freed when the pipeline frees it.

    Yields (name, build); the caller times each build and drops what it returns. Gemma is
    left out (no weights on disk; ``gemma_loads`` builds it alone, see the module docstring).
    """
    import torch
    from ltx_core.loader import LoraPathStrengthAndSDOps
    from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
    from ltx_core.quantization import QuantizationPolicy

    from generator.ltx2.models import LtxLedger

    ledger = LtxLedger(
        dtype=torch.bfloat16, device=device, checkpoint_path=files["checkpoint"]["path"],
        gemma_root_path=files["gemma_root"]["path"], spatial_upsampler_path=files["spatial_upsampler"]["path"],
        quantization=QuantizationPolicy.fp8_cast(), used_keys_only=variant.used_keys_only, store=store,
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

    if Path(files["distilled_lora"]["path"]).exists():  # see room_for_prepared
        yield "transformer + LoRA (stage 2)", stage_2
    else:
        kept.clear()
    yield "audio decoder", ledger.audio_decoder
    yield "vocoder", ledger.vocoder
    yield "video decoder", ledger.video_decoder


def gemma_loads(files: dict[str, Any], device: Any, store: Any = None) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Gemma's build in a two-stage fp8 job's ``text_encode`` phase (``generator/ltx2/embed_cache.py``):
    ``LtxLedger.text_encoder`` on the job's device, in bf16 (the fp8 cast is the transformer's alone),
    reading through the job's store."""
    import torch
    from ltx_core.quantization import QuantizationPolicy

    from generator.ltx2.models import LtxLedger

    root = files["gemma_root"]["path"]
    ledger = LtxLedger(
        # ltx-pipelines makes the text encoder's builder only beside the checkpoint's ones, which are
        # never built here: the path names a file this mode does not write, so a read of it would fail.
        dtype=torch.bfloat16, device=device, checkpoint_path=str(Path(root).parent / CHECKPOINT),
        gemma_root_path=root, quantization=QuantizationPolicy.fp8_cast(), store=store,
    )
    yield "Gemma text encoder", ledger.text_encoder


def _plan_dir(work: Path, variant: Variant) -> Path:
    # Staging follows the last job of the same kind: with the cache, that job read the prepared copy.
    return work / "plans" / ("gemma" if variant.gemma else "prepared" if variant.prepared else "plain")


def measure(variant: Variant, mode: str, files: dict[str, Any], device_name: str,
            settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    from generator.ltx2.prepared import PreparedCache
    from generator.ltx2.staging import read_plan, stage
    from generator.ltx2.weights import WeightStore
    from generator.phases import release_memory, synchronize

    work = Path(settings["work"])
    device = torch.device(device_name)
    result: dict[str, Any] = {"variant": variant.name, "mode": mode, **asdict(variant), "builds": []}
    store = WeightStore()
    if variant.prepared:
        if variant.fresh_cache:
            shutil.rmtree(work / "prepared", ignore_errors=True)
        store.prepared = PreparedCache(work / "prepared", int(settings["prepared_gib"] * GIB))
    if variant.staged:
        # As the standby does, before this process has a CUDA context.
        t0 = time.perf_counter()
        staged = stage(read_plan(_plan_dir(work, variant)), int(settings["host_ram_gib"] * GIB))
        store.staged = staged
        status = _status_kib()
        result["staging"] = {
            "seconds": round(time.perf_counter() - t0, 2), "bytes": staged.staged_bytes,
            "tensors": len(staged.tensors), "budget_gib": settings["host_ram_gib"],
            "cuda_initialized": torch.cuda.is_initialized(),  # type: ignore[no-untyped-call]
            "rss_anon_gib": round(status.get("RssAnon", 0) * 1024 / GIB, 3),
        }
        if device.type == "cuda":
            result["pin_probe"] = pin_probe()
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
    baseline = _status_kib()  # libraries and imports (and what was staged), before any weight
    result["baseline_rss_anon_gib"] = round(baseline.get("RssAnon", 0) * 1024 / GIB, 3)
    result["baseline_rss_file_gib"] = round(baseline.get("RssFile", 0) * 1024 / GIB, 3)
    loads_started = time.perf_counter()
    with torch.inference_mode(), RssSampler() as sampler:
        loads = gemma_loads(files, device, store) if variant.gemma else job_loads(variant, files, device, store)
        for name, build in loads:
            release_memory(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sampler.reset()
            storage_before = _storage_read_bytes()
            counted = store.counter.snapshot()
            t1 = time.perf_counter()
            model = build()
            synchronize(device)
            seconds = time.perf_counter() - t1
            sampler.sample()
            storage_after = _storage_read_bytes()
            tensors, nbytes, by_file = CountingOpen.take()
            reads = store.counter.since(counted)
            entry: dict[str, Any] = {
                "model": name, "seconds": round(seconds, 3), "tensors": tensors, "bytes": nbytes,
                "bytes_by_file": by_file,
                "storage_read_bytes": None if storage_before is None or storage_after is None
                else storage_after - storage_before,
                "peak_rss_anon_gib": round(sampler.peaks.get("RssAnon", 0) * 1024 / GIB, 3),
                "peak_rss_file_gib": round(sampler.peaks.get("RssFile", 0) * 1024 / GIB, 3),
                "weights": None if reads is None else reads.model_dump(),
            }
            if device.type == "cuda":
                entry["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
            result["builds"].append(entry)
            if name == "transformer (stage 1)" and variant.prepared and not variant.fresh_cache:
                result["cast_check"] = cast_check(model, files["checkpoint"]["path"], device)
            del model
        release_memory(device)
    t2 = time.perf_counter()
    store.finish(_plan_dir(work, variant))  # waits for a prepared copy to reach the disk
    result["finish_s"] = round(time.perf_counter() - t2, 2)
    if variant.fresh_cache and device.type == "cuda":
        result["cast_check_random"] = random_cast_check(device)
    builds = result["builds"]
    result["pinned_bytes"] = store.counter.pinned_bytes
    result["pin_s"] = round(store.counter.pin_seconds, 3)
    result["written_bytes"] = store.counter.written_bytes
    result["load_s"] = round(time.perf_counter() - loads_started, 2)
    result["build_s"] = round(sum(b["seconds"] for b in builds), 2)
    if not variant.gemma:
        # Spec to the first denoise step, less Gemma: the builds of the phases before stage 1 and its transformer.
        result["before_stage_1_s"] = round(sum(b["seconds"] for b in builds[:3]), 2)
    result["bytes"] = sum(b["bytes"] for b in builds)
    result["staged_bytes_used"] = store.counter.staged_bytes
    storage = [b["storage_read_bytes"] for b in builds]
    result["storage_read_bytes"] = None if None in storage else sum(storage)
    result["peak_rss_anon_gib"] = max(b["peak_rss_anon_gib"] for b in builds)
    result["peak_rss_file_gib"] = max(b["peak_rss_file_gib"] for b in builds)
    result["vm_hwm_gib"] = round(_status_kib().get("VmHWM", 0) * 1024 / GIB, 3)
    return result


def pin_probe() -> dict[str, Any]:
    """Does page-locked memory need a CUDA context? Asked after staging, just before this process makes one."""
    import torch

    out: dict[str, Any] = {"initialized_before": torch.cuda.is_initialized()}  # type: ignore[no-untyped-call]
    try:
        torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
        out["pinned"] = True
    except Exception as exc:  # reported, not fatal
        out["pinned"], out["error"] = False, repr(exc)
    out["initialized_after"] = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                           capture_output=True, text=True, check=False).stdout
    out["gpu_memory_of_this_process"] = [line for line in query.splitlines()
                                         if line.split(",")[0].strip() == str(os.getpid())]
    return out


def cast_check(model: Any, checkpoint: str, device: Any) -> dict[str, Any]:
    """The prepared (host-cast) fp8 weights against the GPU's own cast of the source's bf16, bit for bit."""
    import safetensors
    import torch

    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dtype == torch.float8_e4m3fn][:: max(1, len(params) // 8)][:6]
    same = []
    opener = CountingOpen.real or safetensors.safe_open  # not counted as a build's reads
    with opener(checkpoint, framework="pt") as handle:
        for name in names:
            key = "model.diffusion_model." + name.removeprefix("velocity_model.")
            ours = params[name].detach().view(torch.uint8)
            theirs = handle.get_tensor(key).to(device).to(torch.float8_e4m3fn).view(torch.uint8)
            same.append(bool(torch.equal(ours, theirs)))
    return {"tensors": len(names), "identical": all(same) and bool(names)}


def random_cast_check(device: Any) -> dict[str, Any]:
    """bf16 -> e4m3 on the host and on the GPU, over every bf16 bit pattern and 64 M random values."""
    import torch

    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    spread = (torch.randn(2**26, generator=generator) * 300).to(torch.bfloat16)
    same = []
    for values in (every, spread):
        host = values.to(torch.float8_e4m3fn).view(torch.uint8)
        gpu = values.to(device).to(torch.float8_e4m3fn).cpu().view(torch.uint8)
        same.append(bool(torch.equal(host, gpu)))
    return {"every_bf16_pattern": same[0], "random_64M": same[1]}


def _child(queue: Any, variant: Variant, mode: str, files: dict[str, Any], device: str,
           settings: dict[str, Any]) -> None:
    try:
        queue.put(measure(variant, mode, files, device, settings))
    except Exception as exc:  # the parent reports it and goes on
        queue.put({"variant": variant.name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"})


def run_measurement(context: Any, variant: Variant, mode: str, files: dict[str, Any], device: str,
                    settings: dict[str, Any]) -> dict[str, Any]:
    dropped = _drop_caches() if mode == "cold" else None
    if dropped:
        return {"variant": variant.name, "mode": mode, "error": dropped}
    queue = context.Queue()
    t0 = time.perf_counter()
    process = context.Process(target=_child, args=(queue, variant, mode, files, device, settings))
    process.start()
    result: dict[str, Any] = queue.get()
    process.join()
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    if process.exitcode:
        result.setdefault("error", f"exit code {process.exitcode}")
    return result


def _estimate(results: dict[str, Any], files: dict[str, Any], name: str, mode: str) -> float:
    """Seconds a measurement may take, to decide whether it still fits the budget."""
    variant = ALL_VARIANTS[name]
    if variant.gemma:
        reads, transformer = files["gemma"]["text_tensor_bytes"], 0
    else:
        checkpoint, lora = files["checkpoint"]["bytes"], files["distilled_lora"]["bytes"]
        transformer = files["checkpoint"].get("transformer_fp8_bytes", checkpoint // 2)
        reads = checkpoint + lora + (0 if variant.reuse_transformer else checkpoint)
        if variant.prepared and not variant.fresh_cache:
            reads -= transformer  # the fp8 copy (T bytes) instead of its bf16 source (about 2 T)
    speed = 4.0 * GB  # warm: about the pageable host-to-GPU copy
    if mode == "cold":
        speed = float((results.get("disk") or {}).get("gb_per_s", 1.5)) * GB
    seconds = 20.0 + reads / speed
    if variant.fresh_cache:
        seconds += transformer / (1.0 * GB)  # cast on the host and written
    if variant.staged:
        seconds += reads / (4.0 * GB)  # staged before the job, then copied
    return float(seconds)


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
    if "gemma" in files:
        gemma = files["gemma"]
        lines.append(
            f"Files (random bf16, google/gemma-3-12b-it's key names and shapes, config {gemma['config']}): "
            f"{len(gemma['shards'])} shards ({', '.join(_size(s['bytes']) for s in gemma['shards'])}), "
            f"{_size(gemma['bytes'])} in all, {_size(gemma['text_tensor_bytes'])} of it the language model the "
            f"text encoder reads (the vision tower and projector are not built), and {Path(gemma['index']).name} "
            f"(ltx-core's loader globs the shards and does not read it); written in {files.get('write_s')} s. "
            f"No LTX checkpoint, LoRA or upsampler.")
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
    if results.get("mode") == "gemma_only":
        lines += gemma_lines(results, runs)
    elif runs:
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
            ("**spec to first denoise step (no Gemma), s**", lambda r: f"**{r.get('before_stage_1_s', 0):.2f}**"),
            ("whole job with stage 2 carried over, s", lambda r: _with_stage_2(results, r)),
            ("from model files / prepared / staged, GB", lambda r: " / ".join(
                _gb(sum((b.get("weights") or {}).get(k, 0) for b in r["builds"]))
                for k in ("checkpoint_bytes", "prepared_bytes", "staged_bytes"))),
            ("pinned GB (registering it, s)", lambda r: f"{_gb(r.get('pinned_bytes', 0))} ({r.get('pin_s', 0):.2f})"),
            ("staged by the standby first: GB in s (hidden)", lambda r: "-" if "staging" not in r else
             f"{_gb(r['staging']['bytes'])} in {r['staging']['seconds']:.2f}"
             f"{' CUDA touched!' if r['staging']['cuda_initialized'] else ''}"),
            ("prepared copy written, GB (flush after the job, s)", lambda r: "-" if not r.get("written_bytes")
             else f"{_gb(r['written_bytes'])} ({r.get('finish_s', 0):.2f})"),
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


def _size(value: int) -> str:
    text = _gb(value)
    return text if text.endswith("MB") else f"{text} GB"


def gemma_lines(results: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """The Gemma section (``--gemma-only``): its one build in each run, then its targets."""
    shards = len((results.get("files") or {}).get("gemma", {}).get("shards", []))
    lines = [
        "", "## Gemma 3 12B text encoder (`--gemma-only`)", "",
        "Built as a two-stage fp8 job's `text_encode` phase builds it: `LtxLedger.text_encoder` on the device, "
        "bf16, through the job's `WeightStore`. Staging applies to it: Gemma's reads go through the store and lead "
        "a job's plan, so a standby with `host_ram_budget_gib` stages them; `gemma_staged` stages the last `gemma` "
        "run's reads before it has a CUDA context, as the standby does. The tokenizer is the tiny one: the released "
        "tokenizer's load, part of a real build, is not timed.",
    ]
    if not runs:
        return lines

    def build(run: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = run["builds"][0]
        return found

    def weights(run: dict[str, Any], key: str) -> int:
        return int((build(run).get("weights") or {}).get(key, 0))

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("**Gemma text encoder build, s**", lambda r: f"**{build(r)['seconds']:.2f}**"),
        ("tensor bytes read, GB", lambda r: _gb(build(r)["bytes"])),
        ("from model files / staged, GB",
         lambda r: f"{_gb(weights(r, 'checkpoint_bytes'))} / {_gb(weights(r, 'staged_bytes'))}"),
        ("shards read", lambda r: f"{len(build(r)['bytes_by_file'])} of {shards}"),
        ("read from storage, GB", lambda r: _gb(build(r)["storage_read_bytes"])),
        ("peak RssAnon, GiB", lambda r: f"{build(r)['peak_rss_anon_gib']:.2f}"),
        ("peak RssFile, GiB", lambda r: f"{build(r)['peak_rss_file_gib']:.2f}"),
        ("RssAnon / RssFile before the build, GiB",
         lambda r: f"{r['baseline_rss_anon_gib']:.2f} / {r['baseline_rss_file_gib']:.2f}"),
        ("peak GPU memory, GiB",
         lambda r: "-" if "peak_gpu_gib" not in build(r) else f"{build(r)['peak_gpu_gib']:.2f}"),
        ("CUDA init, s", lambda r: f"{r['cuda_init_s']:.2f}"),
        ("pinned GB (registering it, s)", lambda r: f"{_gb(r.get('pinned_bytes', 0))} ({r.get('pin_s', 0):.2f})"),
        ("staged by the standby first: GB in s (hidden)", lambda r: "-" if "staging" not in r else
         f"{_gb(r['staging']['bytes'])} in {r['staging']['seconds']:.2f}"
         f"{' CUDA touched!' if r['staging']['cuda_initialized'] else ''}"),
        ("the whole process (spawn, imports, build), s", lambda r: f"{r['wall_s']:.2f}"),
    ]
    lines += ["", "| | " + " | ".join(f"{r['variant']} {r['mode']}" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in runs) + " |" for label, cell in rows]
    return lines + gemma_target_lines(results, runs)


def gemma_target_lines(results: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """Gemma's build against the issue's targets: warm, beside the whole 5 s to the first denoise step
    (the job-mode figures leave Gemma out); cold, against 1.3 x its file bytes at the disk's bandwidth."""
    found = {(r["variant"], r["mode"]): r for r in runs}
    rows = []
    for variant in GEMMA_VARIANTS:
        warm = found.get((variant, "warm"))
        if warm:
            seconds = warm["builds"][0]["seconds"]
            rows.append((f"{variant} warm: Gemma's build alone against spec to first denoise step <= 5 s",
                         f"{seconds:.2f} s", "fits alone" if seconds <= 5 else "exceeds it alone"))
    disk = results.get("disk") or {}
    cold = found.get(("gemma", "cold"))
    if cold and disk.get("gb_per_s"):
        build = cold["builds"][0]
        files_read = int((build.get("weights") or {}).get("checkpoint_bytes", 0))
        floor = files_read / GB / disk["gb_per_s"]
        rows.append(("gemma cold: Gemma's build <= 1.3 x its file bytes / disk bandwidth",
                     f"{build['seconds']:.2f} s vs 1.3 x {floor:.2f} s = {1.3 * floor:.2f} s "
                     f"({files_read / GB:.1f} GB)", "met" if build["seconds"] <= 1.3 * floor else "missed"))
    if not rows:
        return []
    return ["", "Targets:", "", "| target | measured | result |", "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def _stage_2(results: dict[str, Any], mode: str) -> float | None:
    for run in [*results.get("runs", []), *results.get("previous_runs", [])]:
        if run.get("variant") == "both" and run.get("mode") == mode and not run.get("error"):
            for build in run["builds"]:
                if build["model"].startswith("transformer + LoRA"):
                    return float(build["seconds"])
    return None


def whole_job_s(results: dict[str, Any], run: dict[str, Any]) -> float | None:
    """All builds; a run without the LoRA on disk gets the same mode's stage-2 build of ``both``."""
    if any(b["model"].startswith("transformer + LoRA") for b in run["builds"]):
        return float(run["build_s"])
    carried = _stage_2(results, run["mode"])
    return None if carried is None else float(run["build_s"]) + carried


def _with_stage_2(results: dict[str, Any], run: dict[str, Any]) -> str:
    total = whole_job_s(results, run)
    if total is None:
        return "-"
    own = any(b["model"].startswith("transformer + LoRA") for b in run["builds"])
    return f"{total:.2f}" + ("" if own else " (carried)")


def target_lines(results: dict[str, Any]) -> list[str]:
    """The issue's loading targets, judged from the figures (Gemma's load is not in them)."""
    runs = {(r["variant"], r["mode"]): r for r in results.get("runs", []) if not r.get("error")}
    rows = []
    for variant in ("both", "prepared", "staged", "all"):
        warm = runs.get((variant, "warm"))
        if warm:
            rows.append((f"{variant} warm: spec to first denoise step <= 5 s (Gemma not included)",
                         f"{warm['before_stage_1_s']:.2f} s", "met" if warm["before_stage_1_s"] <= 5 else "missed"))
            total = whole_job_s(results, warm)
            if total is not None:
                rows.append((f"{variant} warm: loading in the whole job <= 10 s (Gemma not included)",
                             f"{total:.2f} s", "met" if total <= 10 else "missed"))
    disk = results.get("disk") or {}
    for variant in ("both", "prepared", "all"):
        cold = runs.get((variant, "cold"))
        total = None if cold is None else whole_job_s(results, cold)
        if cold and total is not None and disk.get("gb_per_s"):
            # What the job itself must fetch: its file reads (staged bytes came before the job), the
            # carried stage 2's LoRA included.
            files_read = sum((b.get("weights") or {}).get(k, 0) for b in cold["builds"]
                             for k in ("checkpoint_bytes", "prepared_bytes"))
            if not any(b["model"].startswith("transformer + LoRA") for b in cold["builds"]):
                files_read += (results.get("files") or {}).get("distilled_lora", {}).get("bytes", 0)
            floor = files_read / GB / disk["gb_per_s"]
            rows.append((f"{variant} cold: loading <= 1.3 x job's file bytes / disk bandwidth",
                         f"{total:.2f} s vs 1.3 x {floor:.2f} s = {1.3 * floor:.2f} s ({files_read / GB:.1f} GB)",
                         "met" if total <= 1.3 * floor else "missed"))
    if not rows:
        return []
    return ["", "Targets:", "", "| target | measured | result |", "|---|---|---|",
            *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


if __name__ == "__main__":
    sys.exit(main())
