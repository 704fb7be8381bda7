"""The loading benchmark's plumbing on the CPU (``bench/load.py``): files, variants, reports.

Full-size runs need the GPU machine's disk and page-cache drops (bench/README.md); here
tiny files in the same layouts go through the same code, warm only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_python

pytestmark = pytest.mark.slow

LAYOUT = """
import json, sys
from pathlib import Path
from safetensors import safe_open
from bench.load import checkpoint_layout, lora_layout, random_pool, write_safetensors
from bench.random_weights import full_configs
from generator.ltx2.tiny import tiny_checkpoint_config
tiny = Path(sys.argv[1])
with safe_open(str(tiny / "ltx-2.3-tiny-dev.safetensors"), "pt") as f:
    official = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
layout = checkpoint_layout(tiny_checkpoint_config(), tiny / "gemma")
config = full_configs()[0]
full = checkpoint_layout(config, tiny / "gemma")  # the tiny Gemma root: only the processor's input width differs
import math
nbytes = lambda layout: sum(math.prod(s) * 2 for s in layout.values())
written = Path(sys.argv[2]) / "w.safetensors"
shapes = {"a.weight": (3, 5), "b.weight": (7,), "c.bias": (1000, 3)}
size = write_safetensors(written, shapes, {"config": "{}"}, random_pool(1024))
with safe_open(str(written), "pt") as f:
    back = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata()
print(json.dumps({
    "same_keys": sorted(layout) == sorted(official),
    "same_shapes": all(list(layout[k]) == official[k] for k in official),
    "lora_gb": nbytes(lora_layout(config, 384)) / 1e9,
    "connector_gb": sum(math.prod(s) * 2 for k, s in full.items() if "embeddings_connector" in k) / 1e9,
    "transformer_gb": sum(math.prod(s) * 2 for k, s in full.items()
                          if k.startswith("model.diffusion_model.") and "embeddings_connector" not in k) / 1e9,
    "written": {k: [str(v.dtype), list(v.shape), bool(v.float().isfinite().all())] for k, v in back.items()},
    "distinct": not bool((back["a.weight"].flatten()[:7] == back["b.weight"]).all()),
    "meta": meta, "size": size,
}))
"""


def test_files_have_the_official_layouts_and_sizes(tmp_path: Path, tiny_models: Path) -> None:
    result = json.loads(run_python(LAYOUT, str(tiny_models), str(tmp_path)))
    # The tiny checkpoint written by generator/ltx2/tiny.py, key for key and shape for shape.
    assert result["same_keys"] and result["same_shapes"]
    # Full size: the released files' sizes (the transformer's 18.99 B parameters in bf16, the
    # rank-384 LoRA's 7.4 GB, the 4 GB of connectors each transformer load used to read).
    assert 37.9 < result["transformer_gb"] < 38.1
    assert 7.35 < result["lora_gb"] < 7.45
    assert 3.9 < result["connector_gb"] < 4.1
    assert result["written"] == {"a.weight": ["torch.bfloat16", [3, 5], True],
                                 "b.weight": ["torch.bfloat16", [7], True],
                                 "c.bias": ["torch.bfloat16", [1000, 3], True]}
    assert result["distinct"] and result["meta"] == {"config": "{}"}


def test_benchmark_runs_every_variant_on_tiny_files_and_writes_its_reports(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--tiny", "--device", "cpu", "--no-cold", "--out", str(out),
         "--work", str(work), "--budget-s", "3000", "--skip-imports", "--variants", "today", "reuse", "used_keys",
         "both"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"today", "reuse", "used_keys", "both"} and results["skipped"] == []
    assert all(r["mode"] == "warm" and "error" not in r for r in runs.values())
    files = results["files"]
    lora, connectors = files["distilled_lora"]["tensor_bytes"], files["checkpoint"]["connector_bytes"]

    def build(variant: str, model: str) -> dict[str, int]:
        found: dict[str, int] = next(b for b in runs[variant]["builds"] if b["model"] == model)
        return found

    stage_1, stage_2 = "transformer (stage 1)", "transformer + LoRA (stage 2)"
    # Reading only used keys drops the connectors from every transformer load.
    assert build("today", stage_1)["bytes"] - build("used_keys", stage_1)["bytes"] == connectors
    # Reusing stage 1's transformer makes stage 2 read the LoRA's tensors and nothing else.
    assert build("both", stage_2)["bytes_by_file"] == {"ltx-2.3-22b-distilled-lora-384.safetensors": lora}
    assert build("today", stage_2)["bytes"] > build("today", stage_1)["bytes"]
    assert runs["both"]["bytes"] < runs["used_keys"]["bytes"] < runs["today"]["bytes"]
    assert runs["both"]["bytes"] < runs["reuse"]["bytes"] < runs["today"]["bytes"]
    assert all(r["peak_rss_anon_gib"] > 0 and r["peak_rss_file_gib"] > 0 for r in runs.values())
    table = (out / "table.md").read_text()
    assert "| transformer + LoRA (stage 2) |" in table and "both warm" in table and "peak RssAnon" in table
    assert not (work / "models").exists()  # the files are removed after the run


@pytest.mark.timeout(900)
def test_benchmark_measures_the_prepared_cache_and_staging(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--tiny", "--device", "cpu", "--no-cold", "--out", str(out),
         "--work", str(work), "--budget-s", "3000", "--skip-imports"],
        cwd=ROOT, capture_output=True, text=True, timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"both", "staged", "prepare", "prepared", "all"} and results["skipped"] == []

    def build(variant: str, model: str) -> dict[str, Any]:
        found: dict[str, Any] = next(b for b in runs[variant]["builds"] if b["model"] == model)
        return found

    stage_1 = "transformer (stage 1)"
    # The first job with the cache writes the cast transformer; the next reads it instead of the checkpoint.
    assert runs["prepare"]["written_bytes"] > 0 and runs["prepared"]["written_bytes"] == 0
    [prepared_file] = [f for f in build("prepared", stage_1)["bytes_by_file"] if f != "ltx-2.3-22b-dev.safetensors"]
    assert build("prepared", stage_1)["bytes_by_file"] == {prepared_file: runs["prepare"]["written_bytes"]}
    assert runs["prepared"]["cast_check"]["identical"]
    # Staged: the last job's reads come from host memory, read before any CUDA use.
    for name in ("staged", "all"):
        assert runs[name]["staging"]["bytes"] > 0 and not runs[name]["staging"]["cuda_initialized"]
        assert build(name, stage_1)["bytes"] == 0 and build(name, stage_1)["weights"]["staged_bytes"] > 0
    assert build("all", stage_1)["weights"]["staged_bytes"] == runs["prepare"]["written_bytes"]
    table = (out / "table.md").read_text()
    assert "spec to first denoise step" in table and "all warm" in table


GEMMA_LAYOUT = """
import json, math, sys
from pathlib import Path
from safetensors import safe_open
from ltx_core.text_encoders.gemma.config import GEMMA3_CONFIG_FOR_LTX
from bench.load import GEMMA_SHARD_BYTES, gemma_layout, shard_layout
from generator.ltx2.tiny import TINY_GEMMA
with safe_open(str(Path(sys.argv[1]) / "gemma" / "model-00001-of-00001.safetensors"), "pt") as f:
    official = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
full = gemma_layout(GEMMA3_CONFIG_FOR_LTX.to_dict())
shards = shard_layout(full, GEMMA_SHARD_BYTES)
nbytes = lambda layout: sum(math.prod(s) * 2 for s in layout.values())
print(json.dumps({
    "tiny_as_written": {k: list(s) for k, s in gemma_layout(TINY_GEMMA).items()} == official,
    "full_gb": nbytes(full) / 1e9,
    "text_gb": nbytes({k: s for k, s in full.items() if k.startswith("language_model.model.")}) / 1e9,
    "shard_gb": [nbytes(s) / 1e9 for s in shards],
    "each_key_once": sorted(k for s in shards for k in s) == sorted(full),
    "in_name_order": all(list(s) == sorted(s) for s in shards),
    "lm_head": [k for k in full if "lm_head" in k],
}))
"""


def test_gemma_files_have_the_released_names_shapes_and_shards(tiny_models: Path) -> None:
    result = json.loads(run_python(GEMMA_LAYOUT, str(tiny_models)))
    # The names and shapes write_tiny_gemma writes (the released files' names), no tied lm_head.
    assert result["tiny_as_written"] and result["lm_head"] == []
    # Full size: google/gemma-3-12b-it's 24.4 GB in 5 shards of at most 5 GB, 23.5 GB of it the language model.
    assert 24.3 < result["full_gb"] < 24.45 and 23.45 < result["text_gb"] < 23.6
    assert len(result["shard_gb"]) == 5 and all(4.0 < s <= 5.0 for s in result["shard_gb"][:-1])
    assert result["each_key_once"] and result["in_name_order"]


def test_gemma_only_refuses_a_whole_job_variant(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--gemma-only", "--tiny", "--out", str(tmp_path), "--variants", "both"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "both: not a variant of --gemma-only" in proc.stderr


@pytest.mark.timeout(600)
def test_gemma_only_builds_the_text_encoder_from_its_shards_warm_and_staged(tmp_path: Path) -> None:
    """Only a Gemma root is written; the text encoder is built from its shards, then from the staged copy."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--gemma-only", "--tiny", "--device", "cpu", "--no-cold", "--out",
         str(out), "--work", str(work), "--budget-s", "3000", "--skip-imports"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    files = results["files"]
    assert results["mode"] == "gemma_only" and set(files) == {"gemma_root", "gemma", "write_s"}
    gemma = files["gemma"]
    assert len(gemma["shards"]) > 1 and gemma["text_tensor_bytes"] > 0
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"gemma", "gemma_staged"} and results["skipped"] == []
    assert all(r["mode"] == "warm" and "error" not in r for r in runs.values())
    [build] = runs["gemma"]["builds"]
    # The language model's tensors from each shard that holds some, nothing of the vision tower.
    assert build["model"] == "Gemma text encoder"
    assert build["bytes"] == build["weights"]["checkpoint_bytes"] == gemma["text_tensor_bytes"]
    assert build["bytes_by_file"] == {Path(s["path"]).name: s["text_tensor_bytes"] for s in gemma["shards"]
                                      if s["text_tensor_bytes"]}
    # Staged: the last gemma run's reads, in host memory before any CUDA use; the build reads no file.
    staged = runs["gemma_staged"]
    [staged_build] = staged["builds"]
    assert staged["staging"]["bytes"] == gemma["text_tensor_bytes"] and not staged["staging"]["cuda_initialized"]
    assert staged_build["bytes"] == 0 and staged_build["weights"]["staged_bytes"] == gemma["text_tensor_bytes"]
    table = (out / "table.md").read_text()
    assert "## Gemma 3 12B text encoder" in table and "| **Gemma text encoder build, s** |" in table
    assert "gemma warm" in table and "gemma_staged warm" in table
    assert not (work / "models").exists()  # the files are removed after the run
