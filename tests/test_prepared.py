"""The prepared-weights cache and the standby's staging (``generator/ltx2/prepared.py``, ``staging.py``).

The cache's rules (hits, misses on a changed file or policy, its bound, crash safety) are
checked on small files in this process; the clip's identity with and without cache and
staging by the real ``generate`` on the tiny checkpoints in a fresh interpreter; the
standby's staging by the real ``python -m generator --standby`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ltx_core.loader.sd_ops import SDOps
from safetensors.torch import save_file

from generator.ltx2.prepared import PreparedCache
from generator.ltx2.staging import read_plan, stage, write_plan
from generator.ltx2.weights import StoreLoader, WeightStore
from tests.conftest import ROOT, clean_env, run_python
from tests.test_weights import CHECKPOINT, JOBS, LORA

MIB = 2**20


def _fp8(key: str, value: torch.Tensor) -> list[Any]:
    from ltx_core.loader import KeyValueOperationResult

    return [KeyValueOperationResult(key, value.to(torch.float8_e4m3fn))]


def _cast(name: str) -> SDOps:
    return SDOps(name).with_matching(prefix="block.").with_kv_operation(key_suffix=".weight", operation=_fp8)


CAST, CAST_OTHER = _cast("CAST_TEST"), _cast("CAST_TEST_OTHER")


def _source(path: Path, seed: int = 0, n: int = 64) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_file({f"block.{i}.weight": torch.randn(n, n, generator=generator).to(torch.bfloat16) for i in range(4)}
              | {"block.bias": torch.randn(n, generator=generator).to(torch.bfloat16)}, str(path))
    return path


def _load(cache: PreparedCache, path: Path, sd_ops: SDOps = CAST) -> tuple[dict[str, torch.Tensor], WeightStore]:
    store = WeightStore(prepared=cache)
    state = StoreLoader(store, prepare=True, model="M").load(str(path), sd_ops=sd_ops, device=torch.device("cpu"))
    store.finish(None)  # waits for the entry to reach the disk
    return state.sd, store


def _plain(path: Path, sd_ops: SDOps = CAST) -> dict[str, torch.Tensor]:
    return StoreLoader(WeightStore()).load(str(path), sd_ops=sd_ops, device=torch.device("cpu")).sd


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(
        a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_prepared_entry_holds_the_cast_tensors_and_is_read_next_time(tmp_path: Path) -> None:
    source = _source(tmp_path / "model.safetensors")
    cache = PreparedCache(tmp_path / "prepared", 10 * MIB)
    first, store_1 = _load(cache, source)
    assert store_1.counter.checkpoint_bytes > 0 and store_1.counter.prepared_bytes == 0
    assert store_1.counter.written_bytes > 0
    [entry] = cache.entries()
    # The entry is the cast state dict: fp8 weights, half the bytes of the bf16 source's weights.
    assert entry.stat().st_size < source.stat().st_size
    second, store_2 = _load(cache, source)
    assert store_2.counter.checkpoint_bytes == 0 and store_2.counter.prepared_bytes > 0
    assert {r.path for r in store_2.reads} == {str(entry)}
    assert _same(first, _plain(source)) and _same(second, _plain(source))
    assert second["block.0.weight"].dtype == torch.float8_e4m3fn


def test_a_changed_source_file_or_policy_misses_and_replaces_the_stale_entry(tmp_path: Path) -> None:
    source = _source(tmp_path / "model.safetensors")
    cache = PreparedCache(tmp_path / "prepared", 10 * MIB)
    _load(cache, source)
    [old] = cache.entries()
    _source(source, seed=1)  # same path and size, new weights
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh, store = _load(cache, source)
    assert store.counter.checkpoint_bytes > 0 and store.counter.prepared_bytes == 0
    assert _same(fresh, _plain(source))
    [new] = cache.entries()
    assert new != old and not old.exists()
    _, store = _load(cache, source, CAST_OTHER)  # another quantization policy
    assert store.counter.checkpoint_bytes > 0 and store.counter.prepared_bytes == 0


def test_the_cache_keeps_to_its_bound_least_recently_used_out(tmp_path: Path) -> None:
    sources = [_source(tmp_path / f"m{i}.safetensors", seed=i) for i in range(3)]
    one = PreparedCache(tmp_path / "probe", 10 * MIB)
    _load(one, sources[0])
    size = one.size()
    cache = PreparedCache(tmp_path / "prepared", 2 * size + size // 2)  # room for two entries
    _load(cache, sources[0])
    _load(cache, sources[1])
    _load(cache, sources[0])  # used again: m1 is now the least recently used
    time.sleep(0.01)
    _load(cache, sources[2])
    assert cache.size() <= cache.bound_bytes
    _, store = _load(cache, sources[0])
    assert store.counter.prepared_bytes > 0  # kept
    _, store = _load(cache, sources[1])
    assert store.counter.prepared_bytes == 0  # evicted
    # An entry larger than the whole cache is not written; the load is still right.
    small = PreparedCache(tmp_path / "small", size // 2)
    sd, store = _load(small, sources[0])
    assert small.entries() == [] and store.counter.written_bytes == 0 and _same(sd, _plain(sources[0]))


def test_a_half_written_entry_is_never_read(tmp_path: Path) -> None:
    source = _source(tmp_path / "model.safetensors")
    cache = PreparedCache(tmp_path / "prepared", 10 * MIB)
    _load(cache, source)
    [entry] = cache.entries()
    # A writer that died mid-way leaves only its temporary name (the rename comes last).
    dead = entry.with_name(f".{entry.name}.999999999.tmp")
    entry.rename(dead)
    dead.write_bytes(dead.read_bytes()[: dead.stat().st_size // 2])
    sd, store = _load(cache, source)
    assert store.counter.prepared_bytes == 0 and _same(sd, _plain(source))
    assert not dead.exists()  # swept: its writer is gone


def test_staging_takes_the_plan_in_order_within_the_budget(tmp_path: Path) -> None:
    sources = [_source(tmp_path / f"m{i}.safetensors", seed=i) for i in range(2)]
    plan = [(str(s), f"block.{i}.weight", 64 * 64 * 2) for s in sources for i in range(4)]
    write_plan(tmp_path, plan)
    assert read_plan(tmp_path) == plan
    budget = 5 * 64 * 64 * 2 + 100
    staged = stage(read_plan(tmp_path), budget)
    assert staged.capacity <= budget and staged.staged_bytes == 5 * 64 * 64 * 2
    assert list(staged.tensors) == [(p, k) for p, k, _ in plan[:5]]
    with __import__("safetensors").safe_open(str(sources[0]), "pt") as handle:
        assert torch.equal(staged.take(str(sources[0]), "block.1.weight"), handle.get_tensor("block.1.weight"))
    # A file rewritten after staging is read again, never served stale.
    _source(sources[1], seed=7)
    os.utime(sources[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert staged.take(str(sources[1]), "block.0.weight") is None
    assert read_plan(tmp_path) == plan[:4]  # the plan drops the changed file too


# --- whole jobs on the tiny checkpoints ------------------------------------------------------------

STAGED_JOBS = JOBS.replace(
    "    used = change.pop(\"used_keys_only\", True)\n",
    "    used = change.pop(\"used_keys_only\", True)\n"
    "    budget = change.pop(\"stage_gib\", 0)\n"
    "    if budget:\n"
    "        from generator.ltx2 import staging\n"
    "        staging.hand_over(staging.stage(staging.read_plan(Path(change['prepared_dir'])), int(budget * 2**30)))\n",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prepared_cache_and_staging_give_the_same_clip(tmp_path: Path, tiny_models: Path) -> None:
    from tests.test_generator import make_spec

    assert STAGED_JOBS != JOBS
    prepared = str(tmp_path / "prepared")
    cached = {"prepared_dir": prepared, "prepared_cache_gib": 1.0, "host_ram_budget_gib": 1.0}
    runs = {"plain": {}, "first": dict(cached), "second": dict(cached), "staged": cached | {"stage_gib": 1.0}}
    spec = make_spec(tmp_path, tiny_models, pipeline="two_stage", audio=True, width=128, height=64, frames=9,
                     steps=2, fp8_cast=True)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result = json.loads(run_python(STAGED_JOBS, str(tmp_path / "spec.json"), json.dumps(runs), str(tiny_models)))
    out = result["runs"]
    for name in runs:
        assert out[name]["same_as_first"] == {"latent": True, "frames": True, "audio": True}, name
    [entry] = [p.name for p in Path(prepared).glob("*.safetensors")]

    def files(run: str, phase: str) -> set[str]:
        return {name for p, name, _, _ in out[run]["reads"] if p == phase}

    assert files("first", "stage_1") == {CHECKPOINT}
    assert files("second", "stage_1") == {entry}  # the cast copy, not the checkpoint
    assert files("second", "stage_2") == {LORA}
    # Staged: every tensor came from host memory except second reads of one key (the video
    # encoder is built twice, the VAE statistics three times): the plan stages each key once.
    again = [tuple(r[1:3]) for r in out["second"]["reads"]]
    for key in {tuple(r[1:3]) for r in out["second"]["reads"]}:
        again.remove(key)
    assert sorted(tuple(r[1:3]) for r in out["staged"]["reads"]) == sorted(again)
    assert again


STANDBY = """
import json, sys, torch
calls = []
real_init = torch.cuda._lazy_init
def lazy_init():
    calls.append(1)
    real_init()
torch.cuda._lazy_init = lazy_init
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
from generator.ltx2 import staging
real_start, real_hand = staging.Stager.__init__, staging.Stager.hand_over
seen = {}
def start(self, directory, budget):
    seen["rss_before"], seen["budget"] = rss_anon(), budget
    real_start(self, directory, budget)
def hand(self):
    self.thread.join()
    staged = self.result
    seen.update(rss_after=rss_anon(), cuda_calls=len(calls), cuda_initialized=torch.cuda.is_initialized(),
                capacity=staged.capacity, staged_bytes=staged.staged_bytes)
    print("STAGING " + json.dumps(seen), file=sys.stderr, flush=True)
    real_hand(self)
staging.Stager.__init__, staging.Stager.hand_over = start, hand
from generator.run import main
sys.exit(main(["--standby", "ltx2"]))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_standby_stages_within_the_budget_without_touching_cuda(tmp_path: Path, tiny_models: Path) -> None:
    from generator.protocol import PhaseEvent, parse_event
    from tests.test_generator import make_spec, run_generator

    prepared = tmp_path / "prepared"
    spec = make_spec(tmp_path, tiny_models, pipeline="two_stage", audio=True, width=128, height=64, frames=9,
                     steps=2, fp8_cast=True)
    spec = spec.model_copy(update={"prepared_dir": prepared, "prepared_cache_gib": 1.0, "host_ram_budget_gib": 1.0})
    code, _ = run_generator(tmp_path, spec)  # the first job: writes the cast copy and the plan
    assert code == 0
    plan = read_plan(prepared)
    assert plan
    total = sum(n for *_, n in plan)
    budget_gib = total / 2 / 2**30  # half of what the next job reads
    env = clean_env() | {"LTXBOT_STAGING": json.dumps({"dir": str(prepared), "budget_gib": budget_gib})}
    proc = subprocess.Popen([sys.executable, "-c", STANDBY], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert json.loads(proc.stdout.readline())["event"] == "ready"
    time.sleep(3)  # staging a few MB takes milliseconds; the job still waits for its spec
    spec_path = tmp_path / "next.json"
    spec_path.write_text(spec.model_copy(update={"output_path": tmp_path / "next.mp4"}).model_dump_json())
    stdout, stderr = proc.communicate(f"{spec_path}\n", timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    seen = json.loads(next(line for line in stderr.splitlines() if line.startswith("STAGING "))[8:])
    assert seen["cuda_calls"] == 0 and not seen["cuda_initialized"]
    assert 0 < seen["staged_bytes"] <= seen["capacity"] <= seen["budget"]
    assert seen["rss_after"] - seen["rss_before"] <= seen["budget"] + 64 * 2**20
    phases = [e for e in map(parse_event, stdout.splitlines()) if isinstance(e, PhaseEvent)]
    staged = sum(p.weights.staged_bytes for p in phases if p.weights)
    files = sum(p.weights.checkpoint_bytes + p.weights.prepared_bytes for p in phases if p.weights)
    assert staged == seen["staged_bytes"]  # every staged byte was used, and the rest read from files
    assert files > 0
