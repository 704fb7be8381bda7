"""fp8 scaled-mm Linears and compiled transformer blocks (generator/ltx2/scaled_mm.py, compiled.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from generator.protocol import ErrorEvent, ExitCode
from tests.conftest import ROOT, clean_env
from tests.test_generator import make_spec, run_generator


def _fp8_linear(in_features: int, out_features: int) -> Any:
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16).requires_grad_(False)
    layer.weight.data = (layer.weight.data * 4).to(torch.float8_e4m3fn)
    layer.bias.data = (layer.bias.data * 0.001).to(torch.float8_e4m3fn)  # small: the rows' products show
    return layer


def test_scaled_mm_linear_is_the_fp8_cast_linear_up_to_activation_rounding() -> None:
    import torch

    from generator.ltx2.compiled import Fp8CastLinear
    from generator.ltx2.scaled_mm import ScaledMMLinear, use_scaled_mm

    model = torch.nn.Sequential(_fp8_linear(64, 48), torch.nn.Linear(48, 16, dtype=torch.bfloat16))
    model.requires_grad_(False)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16) * torch.logspace(-5, 1, 5).reshape(1, 5, 1).to(torch.bfloat16)
    assert use_scaled_mm(model) == 1  # the bf16 Linear stays as it is
    assert isinstance(model[0], ScaledMMLinear) and type(model[1]) is torch.nn.Linear
    scaled = model[0](x)
    model[0].__class__ = Fp8CastLinear
    cast = model[0](x)
    assert scaled.shape == cast.shape == (2, 5, 48) and scaled.dtype == torch.bfloat16
    # Per-row scales: a row a million times smaller than another keeps its own precision (one
    # scale for all would push it into fp8's subnormals).
    for row in range(5):
        err = (scaled[:, row].float() - cast[:, row].float()).norm() / cast[:, row].float().norm()
        assert 0 < err < 0.06, (row, float(err))


def test_fp8_scaled_mm_is_refused_on_the_cpu_before_any_model_loads(tmp_path: Path, tiny_models: Path) -> None:
    spec = make_spec(tmp_path, tiny_models, pipeline="one_stage", width=64, height=64, frames=9)
    code, events = run_generator(tmp_path, spec.model_copy(update={"quantization": "fp8_scaled_mm"}))
    assert code == ExitCode.INVALID_SPEC
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "invalid_spec"
    assert "fp8_scaled_mm" in error.message and "8.9" in error.message
    assert not [e for e in events if getattr(e, "event", "") == "phase"]


def test_cuda_graphs_are_refused_on_the_cpu_and_without_compiled_blocks(tmp_path: Path, tiny_models: Path) -> None:
    from pydantic import ValidationError

    from generator.protocol import JobSpec

    spec = make_spec(tmp_path, tiny_models, pipeline="one_stage", width=64, height=64, frames=9)
    with pytest.raises(ValidationError, match="cuda_graphs replays the compiled blocks: it needs compile_blocks"):
        JobSpec.model_validate(spec.model_dump() | {"cuda_graphs": True})
    code, events = run_generator(tmp_path, spec.model_copy(update={"compile_blocks": True, "cuda_graphs": True}))
    assert code == ExitCode.INVALID_SPEC
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "invalid_spec"
    assert "generator.cuda_graphs needs an NVIDIA GPU" in error.message
    assert not [e for e in events if getattr(e, "event", "") == "phase"]


def test_cuda_graphs_compile_the_blocks_with_inductors_graphs_and_start_a_step_per_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from ltx_core.model.transformer import LTXModelConfigurator

    from generator.ltx2 import compiled
    from generator.ltx2.tiny import _meta, tiny_checkpoint_config

    asked: list[dict[str, Any]] = []
    steps: list[int] = []
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.append(kwargs) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = _meta(LTXModelConfigurator, tiny_checkpoint_config())
    compiled.compile_transformer_blocks(model, cuda_graphs=True)
    compiled.compile_transformer_blocks(model, cuda_graphs=True)  # stage 2 prepares the kept transformer again
    assert asked == [{"dynamic": None, "backend": compiled.BACKEND, "options": {"triton.cudagraphs": True}}]
    # Each forward is a new step of the CUDA-graph tree, exactly once however often the model is prepared.
    for hook in model._forward_pre_hooks.values():
        hook(model, ())
    assert steps == [1]
    plain = _meta(LTXModelConfigurator, tiny_checkpoint_config())
    compiled.compile_transformer_blocks(plain)
    assert asked[1]["options"] is None and not plain._forward_pre_hooks


COMPILED = """
import json, sys
import torch
from torch._dynamo.utils import counters
import generator.ltx2.compiled as compiled
import generator.ltx2.pipeline as pipeline
from generator.protocol import JobSpec
compiled.BACKEND = sys.argv[2]
spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
latents = {}
current = []
pipeline.DENOISE_OBSERVERS.append(lambda stage, v, a: current.extend([v.latent.clone(), a.latent.clone()]))
for mode in ("eager", "compiled"):
    current.clear()
    run = spec.model_copy(update={"compile_blocks": mode == "compiled",
                                  "output_path": spec.output_path.with_name(mode + ".mp4")})
    pipeline.generate(run, lambda event: None)
    latents[mode] = list(current)
pairs = list(zip(latents["eager"], latents["compiled"], strict=True))
print(json.dumps({
    "diff": max(float((a - b).abs().max()) for a, b in pairs),
    "scale": max(float(a.abs().max()) for a, _ in pairs),
    "graphs": int(counters["stats"]["unique_graphs"]),
    "calls": int(counters["stats"]["calls_captured"]),
}))
"""

# Float32 on the CPU, one-stage 64x64x9, 2 steps, traced with aot_eager: the final latents were
# bit-identical (0.0). The bound leaves room for inductor's reordered sums on the GPU.
COMPILED_RELATIVE_TOLERANCE = 1e-5


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two tiny renders and a trace: minutes on a busy 2-core machine
# Opt-in (LTXBOT_COMPILE_TEST=1): compiled blocks are off by default and the trace alone takes longer
# than the rest of a CI run can spare on two cores; run it whenever generator/ltx2/compiled.py changes.
@pytest.mark.skipif(not os.environ.get("LTXBOT_COMPILE_TEST"), reason="set LTXBOT_COMPILE_TEST=1 to trace the blocks")
def test_compiled_blocks_give_the_eager_latents(tmp_path: Path, tiny_models: Path) -> None:
    spec = make_spec(tmp_path, tiny_models, pipeline="one_stage", width=64, height=64, frames=9, steps=2)
    spec = spec.model_copy(update={"dtype": "float32", "compile_cache_dir": tmp_path / "compile"})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    proc = subprocess.run([sys.executable, "-c", COMPILED, str(tmp_path / "spec.json"), "aot_eager"], cwd=ROOT,
                          capture_output=True, text=True, env=clean_env(), timeout=1700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diff"] <= COMPILED_RELATIVE_TOLERANCE * result["scale"], result
    # Measured: 4 graphs for the guided passes' variants over 3,042 captured block calls; a graph
    # per call (no reuse across blocks and steps) would be hundreds. The cache sits where it was told.
    assert result["graphs"] <= 4 < result["calls"] // 100, result
    assert (tmp_path / "compile" / "inductor").is_dir(), "the compile cache is not under compile_cache_dir"


def test_each_block_sees_its_own_perturbations_without_its_index() -> None:
    from ltx_core.guidance.perturbations import (
        BatchedPerturbationConfig,
        Perturbation,
        PerturbationConfig,
        PerturbationType,
    )

    from generator.ltx2.compiled import block_perturbations

    stg = PerturbationConfig([Perturbation(PerturbationType.SKIP_VIDEO_SELF_ATTN, [29]),
                              Perturbation(PerturbationType.SKIP_AUDIO_SELF_ATTN, [3, 29])])
    isolated = PerturbationConfig([Perturbation(PerturbationType.SKIP_A2V_CROSS_ATTN, None),
                                   Perturbation(PerturbationType.SKIP_V2A_CROSS_ATTN, None)])
    batch = BatchedPerturbationConfig([PerturbationConfig.empty(), PerturbationConfig(None), stg, isolated])
    assert block_perturbations(None, 7) is None
    seen = set()
    for idx in range(48):
        local = block_perturbations(batch, idx)
        assert local is not None
        for kind in PerturbationType:
            for mine, theirs in zip(local.perturbations, batch.perturbations, strict=True):
                assert mine.is_perturbed(kind, idx) == theirs.is_perturbed(kind, idx), (idx, kind)
                assert mine.is_perturbed(kind, idx) == mine.is_perturbed(kind, idx + 1000)  # no index inside
        seen.add(repr(local))
    assert len(seen) == 3  # blocks 3 and 29 differ from the other 46: three graphs, not 48


GRAPHS = """
import json, sys
from pathlib import Path
import generator.ltx2.tiny as tiny
tiny.TINY_TRANSFORMER["num_layers"] = 6
root = Path(sys.argv[1])
tiny.write_tiny_models(root / "models")
from torch._dynamo.utils import counters
import generator.ltx2.compiled as compiled
import generator.ltx2.pipeline as pipeline
from tests.test_generator import make_spec
compiled.BACKEND = "eager"  # dynamo's graphs only: what is counted here is the tracing, not the kernels
spec = make_spec(root, root / "models", pipeline="one_stage", width=64, height=64, frames=9, steps=1)
spec = spec.model_copy(update={"dtype": "float32", "compile_blocks": True, "guidance_batch": int(sys.argv[2]),
                               "compile_cache_dir": root / "compile"})
pipeline.generate(spec, lambda event: None)
print(json.dumps({"graphs": int(counters["stats"]["unique_graphs"])}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("batch", [1, 4])
def test_blocks_share_their_compiled_graphs(tmp_path: Path, batch: int) -> None:
    # Measured with six blocks before the fix: one graph per block (6 at batch 4, 10 at batch 1 with
    # eight blocks); a 48-block transformer then traced 48+ graphs per job and ran past the compiler's limit.
    proc = subprocess.run([sys.executable, "-c", GRAPHS, str(tmp_path), str(batch)], cwd=ROOT,
                          capture_output=True, text=True, env=clean_env(), timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])["graphs"]
    # Batch 1: the plain, self-attention-skipped and modality-isolated passes; batch 4: one batched pass.
    assert graphs == (3 if batch == 1 else 1), graphs


def test_compiled_blocks_all_read_one_index_and_keep_their_own() -> None:
    # torch 2.11 specialises on the first block's index and traces a graph for block 0 alone
    # (the H200's logs; reproduced on the CPU with torch 2.11): every compiled block reads one value.
    from ltx_core.model.transformer import LTXModelConfigurator

    from generator.ltx2 import compiled
    from generator.ltx2.tiny import _meta, tiny_checkpoint_config

    model = _meta(LTXModelConfigurator, tiny_checkpoint_config())
    blocks = compiled._blocks(model)
    before = [int(b.idx) for b in blocks]
    assert len(set(before)) == len(blocks) > 1
    assert compiled.compile_transformer_blocks(model) == len(blocks)
    assert {b.idx for b in blocks} == {compiled.COMPILED_BLOCK_INDEX}
    assert [b._ltxbot_idx for b in blocks] == before
