"""Batched stage-1 guidance (``generator/ltx2/guidance.py``) against the passes run one by one.

The tiny checkpoint has 2 transformer blocks, and ltx-core silently perturbs nothing
when the STG blocks (28 for LTX-2.3, 29 for LTX-2.0) do not exist, so these tests
rewrite it with 30 blocks: every guided pass then changes the result, and a
perturbation on the wrong sample of the batch shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, clean_env, run_python, tiny_model_settings

# Six renders of a 30-block model share one process per version (the module fixture).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VERSIONS = ("2.3.0", "2.0.0")  # ltx-pipelines' detect_params: LTX_2_3_PARAMS (stg_blocks [28]), LTX_2_PARAMS ([29])
BLOCKS = 30

# Float32, CPU, 2 steps: batching the four passes (2 or 4 per forward) moved the final
# stage-1 latents by at most 1.19e-6 with LTX-2.3's guider parameters and 1.43e-6 with
# LTX-2.0's, 3.0e-7 and 3.7e-7 of their largest value (3.91). The bound sits just above;
# a perturbation on the wrong sample moved them by 2.8e-3 to 3.6e-3.
RELATIVE_TOLERANCE = 5e-7

DEEP = """
import json, sys
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from ltx_core.model.transformer import LTXModelConfigurator
from generator.ltx2.tiny import random_state
source, target, version, blocks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with safe_open(source, "pt") as f:
    metadata = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
config = json.loads(metadata["config"])
config["transformer"] = config["transformer"] | {"num_layers": blocks}
with torch.device("meta"):
    transformer = LTXModelConfigurator.from_config(config)
connectors = ("model.diffusion_model.video_embeddings_connector.", "model.diffusion_model.audio_embeddings_connector.")
tensors = {k: v for k, v in tensors.items() if not k.startswith("model.diffusion_model.") or k.startswith(connectors)}
state = random_state(transformer, torch.Generator().manual_seed(5))
tensors |= {"model.diffusion_model." + k: v for k, v in state.items()}
save_file(tensors, target, metadata={"config": json.dumps(config), "model_version": version})
print(json.dumps(sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})[-1]))
"""

COMPARE = """
import json, sys
import torch
import generator.ltx2.guidance as guidance
import generator.ltx2.pipeline as pipeline
from ltx_pipelines.utils.helpers import multi_modal_guider_factory_denoising_func
from generator.protocol import JobSpec

torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core runner were 20x slower, not faster
spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
finals = []
def keep(stage, video, audio):
    if stage == "generating":
        finals.append((video.latent.float().clone(), audio.latent.float().clone()))
pipeline.DENOISE_OBSERVERS.append(keep)
passes = []
run_passes = guidance.run_passes
def recording_run_passes(*args, **kwargs):
    out = run_passes(*args, **kwargs)
    passes.append({k: (v.float().clone(), a.float().clone()) for k, (v, a) in out.items()})
    return out
guidance.run_passes = recording_run_passes

def render(batch):
    finals.clear()
    passes.clear()
    pipeline.generate(spec.model_copy(update={"guidance_batch": batch}), lambda event: None)
    return finals[-1], list(passes)

def stock(max_batch, **kwargs):
    return multi_modal_guider_factory_denoising_func(**kwargs)

ours = pipeline.batched_guider_denoising_func
pipeline.batched_guider_denoising_func = stock
reference, _ = render(1)
pipeline.batched_guider_denoising_func = ours
sequential, sequential_passes = render(1)
batched = {batch: render(batch)[0] for batch in (2, 4)}

perturbation_batch = guidance.perturbation_batch
def swapped(i, j):
    def wrong(forward):
        masks = list(perturbation_batch(forward).perturbations)
        masks[i], masks[j] = masks[j], masks[i]
        return guidance.BatchedPerturbationConfig(perturbations=masks)
    return wrong
wrong = {}
# Passes run in ltx-pipelines' order: cond, uncond, ptb (STG), mod (isolated modality).
for name, (i, j) in {"stg_on_cond": (0, 2), "isolation_on_uncond": (1, 3)}.items():
    guidance.perturbation_batch = swapped(i, j)
    wrong[name] = render(4)[0]
guidance.perturbation_batch = perturbation_batch

def diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))
first = sequential_passes[0]
print(json.dumps({
    "scale": max(float(t.abs().max()) for t in sequential),
    "stock_equal": all(torch.equal(x, y) for x, y in zip(reference, sequential)),
    "passes": list(first),
    "pass_effects": {name: diff(first[name], first["cond"]) for name in first if name != "cond"},
    "batched": {str(batch): diff(result, sequential) for batch, result in batched.items()},
    "wrong": {name: diff(result, sequential) for name, result in wrong.items()},
}))
"""


def _deep_checkpoint(tiny_models: Path, root: Path, version: str) -> Path:
    target = root / f"ltx-{version}-tiny-{BLOCKS}-blocks.safetensors"
    last = run_python(DEEP, str(tiny_models / "ltx-2.3-tiny-dev.safetensors"), str(target), version, str(BLOCKS))
    assert int(last) == BLOCKS - 1
    return target


def _spec(work: Path, tiny_models: Path, checkpoint: Path, **request: Any) -> Any:
    from tests.test_generator import make_spec

    return make_spec(work, tiny_models, models=tiny_model_settings(tiny_models) | {"checkpoint": str(checkpoint)},
                     **request)


@pytest.fixture(scope="module", params=VERSIONS)
def comparison(request: pytest.FixtureRequest, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One float32 one-stage render per way of running the guided passes, for one version's guider params."""
    work = tmp_path_factory.mktemp(f"guidance-{request.param}")
    checkpoint = _deep_checkpoint(tiny_models, work, request.param)
    spec = _spec(work, tiny_models, checkpoint, pipeline="one_stage", width=96, height=64, frames=9, steps=2)
    path = work / "spec.json"
    path.write_text(spec.model_copy(update={"dtype": "float32"}).model_dump_json())
    return json.loads(run_python(COMPARE, str(path)))


def test_every_guided_pass_changes_the_result(comparison: dict[str, Any]) -> None:
    # CFG, STG and isolated modality all run (both versions' params), and each moves the
    # prediction: the STG block exists, so a mask put on the wrong sample cannot go unseen.
    assert comparison["passes"] == ["cond", "uncond", "ptb", "mod"]
    bound = RELATIVE_TOLERANCE * comparison["scale"]
    assert all(effect > 10 * bound for effect in comparison["pass_effects"].values()), comparison


def test_batched_guidance_equals_the_passes_run_one_by_one(comparison: dict[str, Any]) -> None:
    bound = RELATIVE_TOLERANCE * comparison["scale"]
    assert all(d <= bound for d in comparison["batched"].values()), comparison


def test_a_perturbation_on_the_wrong_sample_is_detected(comparison: dict[str, Any]) -> None:
    bound = RELATIVE_TOLERANCE * comparison["scale"]
    assert all(d > 100 * bound for d in comparison["wrong"].values()), comparison


def test_guidance_batch_1_is_ltx_pipelines_guider_bit_for_bit(comparison: dict[str, Any]) -> None:
    assert comparison["stock_equal"], comparison


GENERATOR = """
import sys
import torch
import generator.ltx2.pipeline as pipeline
from ltx_pipelines.utils.helpers import multi_modal_guider_factory_denoising_func
spec_path, latents_path, guider = sys.argv[1:]
if guider == "stock":
    pipeline.batched_guider_denoising_func = (
        lambda max_batch, **kwargs: multi_modal_guider_factory_denoising_func(**kwargs))
latents = []
pipeline.DENOISE_OBSERVERS.append(lambda stage, video, audio: latents.extend([video.latent, audio.latent]))
from generator.run import main
code = main([spec_path])
torch.save([t.clone() for t in latents], latents_path)
raise SystemExit(code)
"""


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import av

    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, audio


def test_guidance_batch_1_clip_is_todays_clip_through_the_generator(tmp_path: Path, tiny_models: Path) -> None:
    """The generator's own ``main`` in a fresh process at guidance_batch 1, against the same
    process running ltx-pipelines' own guider function: the same float32 latents after
    each stage, the same frames and audio samples, exactly."""
    import torch

    checkpoint = _deep_checkpoint(tiny_models, tmp_path, "2.3.0")
    clips, latents = {}, {}
    for guider in ("ours", "stock"):
        work = tmp_path / guider
        work.mkdir()
        spec = _spec(work, tiny_models, checkpoint, pipeline="two_stage", width=128, height=64, frames=9, steps=2)
        assert spec.guidance_batch == 1  # the default
        (work / "spec.json").write_text(spec.model_copy(update={"dtype": "float32"}).model_dump_json())
        proc = subprocess.run(
            [sys.executable, "-c", GENERATOR, str(work / "spec.json"), str(work / "latents.pt"), guider],
            capture_output=True, text=True, env=clean_env() | {"OMP_NUM_THREADS": "1"}, timeout=600, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        clips[guider] = _decoded(spec.output_path)
        latents[guider] = torch.load(work / "latents.pt")
    (frames, audio), (stock_frames, stock_audio) = clips["ours"], clips["stock"]
    assert frames.shape == stock_frames.shape and frames.shape[0] == 9 and audio.size > 0
    assert len(latents["ours"]) == len(latents["stock"]) == 4  # video and audio after stage 1 and stage 2
    assert all(torch.equal(a, b) for a, b in zip(latents["ours"], latents["stock"], strict=True))
    assert np.array_equal(frames, stock_frames) and np.array_equal(audio, stock_audio)
