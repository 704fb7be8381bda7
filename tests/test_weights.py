"""What a job reads (``generator/ltx2/weights.py``), counted at the safetensors reader itself.

Each job runs the real ``generate`` on the tiny checkpoints in a fresh interpreter, with
``safetensors.safe_open`` wrapped so every tensor handed out is recorded with the phase
that asked for it; the clip's decoder input, frames and audio are kept for comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.slow

JOBS = """
import functools, json, sys
from pathlib import Path
import numpy as np
import safetensors
import torch
from generator import faults
from generator.ltx2 import pipeline
from generator.ltx2.models import LtxLedger
from generator.protocol import JobSpec

phase = ["-"]
original_start = faults.at_phase_start
def at_phase_start(name):
    phase[0] = name
    original_start(name)
faults.at_phase_start = at_phase_start

reads = []
real_open = safetensors.safe_open
class CountingOpen:
    def __init__(self, path, *args, **kwargs):
        self.inner, self.name = real_open(path, *args, **kwargs), Path(path).name
    def __enter__(self):
        self.inner.__enter__()
        return self
    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)
    def keys(self):
        return self.inner.keys()
    def metadata(self):
        return self.inner.metadata()
    def get_slice(self, key):  # shapes only: a slice that could read data is not handed out
        shape = self.inner.get_slice(key).get_shape()
        return type("Shape", (), {"get_shape": lambda self: shape})()
    def get_tensor(self, key):
        tensor = self.inner.get_tensor(key)
        reads.append([phase[0], self.name, key, tensor.nbytes])
        return tensor
safetensors.safe_open = CountingOpen

kept = {}
original_decode = pipeline.vae_decode_video
def decode(latent, *args):
    kept["latent"] = latent.float().clone()
    return original_decode(latent, *args)
pipeline.vae_decode_video = decode
original_stream = pipeline.stream_clip
def stream(spec, tracker, frames, progress, audio):
    frames_kept = []
    def tee():
        for chunk in frames:
            frames_kept.append(chunk.copy())
            yield chunk
    done = original_stream(spec, tracker, tee(), progress, audio)
    kept["frames"], kept["audio"] = np.concatenate(frames_kept), audio[0].copy()
    return done

base = JobSpec.model_validate_json(open(sys.argv[1]).read())
runs = json.loads(sys.argv[2])
clips, out = {}, {}
for name, change in runs.items():
    reads.clear()
    kept.clear()
    used = change.pop("used_keys_only", True)
    spec = base.model_copy(update=change | {"output_path": base.output_path.with_name(name + ".mp4")})
    pipeline.stream_clip = stream
    done = pipeline.generate(spec, lambda event: None,
                             ledger_factory=functools.partial(LtxLedger, used_keys_only=used))
    clips[name] = dict(kept)
    out[name] = {"reads": list(reads), "leaked": done.leaked_models}
reference = clips[next(iter(runs))]
for name, clip in clips.items():
    out[name]["same_as_first"] = {
        "latent": bool(torch.equal(clip["latent"], reference["latent"])),
        "frames": bool(np.array_equal(clip["frames"], reference["frames"])),
        "audio": bool(np.array_equal(clip["audio"], reference["audio"])),
    }
    out[name]["latent_diff"] = float((clip["latent"] - reference["latent"]).abs().max())
files = {}
for path in Path(sys.argv[3]).rglob("*.safetensors"):
    with real_open(str(path), "pt") as handle:
        files[path.name] = {key: handle.get_tensor(key).nbytes for key in handle.keys()}
print(json.dumps({"runs": out, "files": files}))
"""

CHECKPOINT = "ltx-2.3-tiny-dev.safetensors"
LORA = "ltx-2.3-tiny-distilled-lora.safetensors"
UPSAMPLER = "ltx-2.3-tiny-spatial-upscaler-x2.safetensors"
CONNECTORS = ("model.diffusion_model.video_embeddings_connector.", "model.diffusion_model.audio_embeddings_connector.")


def _jobs(tmp_path: Path, tiny_models: Path, runs: dict[str, dict[str, Any]], **request: Any) -> dict[str, Any]:
    from tests.test_generator import make_spec

    spec = make_spec(tmp_path, tiny_models, pipeline="two_stage", audio=True, width=128, height=64, frames=9,
                     steps=2, **request)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result: dict[str, Any] = json.loads(run_python(JOBS, str(tmp_path / "spec.json"), json.dumps(runs),
                                                   str(tiny_models)))
    return result


def _phase_reads(run: dict[str, Any], phase: str) -> list[tuple[str, str, int]]:
    return [(name, key, nbytes) for p, name, key, nbytes in run["reads"] if p == phase]


@pytest.mark.parametrize(("fp8", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_stage_2_from_the_kept_transformer_is_the_reloaded_clip_bit_for_bit(
    tmp_path: Path, tiny_models: Path, fp8: bool, dtype: str
) -> None:
    runs = {"reload": {"stage_2_transformer": "reload", "fp8_cast": fp8, "dtype": dtype},
            "reuse": {"stage_2_transformer": "reuse", "fp8_cast": fp8, "dtype": dtype}}
    result = _jobs(tmp_path, tiny_models, runs)
    reload, reuse = result["runs"]["reload"], result["runs"]["reuse"]
    assert reuse["same_as_first"] == {"latent": True, "frames": True, "audio": True}, reuse["latent_diff"]
    assert reuse["leaked"] == [] and reload["leaked"] == []
    lora = result["files"][LORA]
    # Reused: stage 2 reads the LoRA, every tensor of it once, and nothing else.
    assert sorted((name, key) for name, key, _ in _phase_reads(reuse, "stage_2")) == sorted(
        (LORA, key) for key in lora)
    assert sum(n for *_, n in _phase_reads(reuse, "stage_2")) == sum(lora.values())
    # Reloaded: stage 2 reads the checkpoint's transformer again (what the reuse saves).
    assert {name for name, _, _ in _phase_reads(reload, "stage_2")} == {CHECKPOINT, LORA}


def test_a_job_reads_each_used_key_once_and_no_discarded_key(tmp_path: Path, tiny_models: Path) -> None:
    runs = {"used": {}, "stock": {"used_keys_only": False, "stage_2_transformer": "reload"}}
    result = _jobs(tmp_path, tiny_models, runs, fp8_cast=True)
    used, stock = result["runs"]["used"], result["runs"]["stock"]
    # ltx-core's own reads and ours give the same clip.
    assert used["same_as_first"] == stock["same_as_first"] == {"latent": True, "frames": True, "audio": True}
    checkpoint = result["files"][CHECKPOINT]

    def connector_reads(run: dict[str, Any], phase: str) -> list[str]:
        return [k for name, k, _ in _phase_reads(run, phase) if name == CHECKPOINT and k.startswith(CONNECTORS)]

    # The transformer's SDOps match the connectors: ltx-core reads them and drops them; we never read them.
    assert connector_reads(stock, "stage_1") and connector_reads(stock, "stage_2")
    assert connector_reads(used, "stage_1") == []
    transformer_keys = {
        k for k in checkpoint if k.startswith("model.diffusion_model.") and not k.startswith(CONNECTORS)}
    assert {k for _, k, _ in _phase_reads(used, "stage_1")} == transformer_keys
    # The embeddings processor reads its own keys and nothing else.
    processor_keys = {k for k in checkpoint if k.startswith(("text_embedding_projection.", *CONNECTORS))}
    assert sorted(k for _, k, _ in _phase_reads(used, "embeddings")) == sorted(processor_keys)

    # Over the whole job each key is read once, except what two builds legitimately share:
    # the video encoder is built for the image encode and again for the upsample (each
    # phase frees its models), and vae.per_channel_statistics belongs to the encoder and
    # the decoder alike. The audio encoder is never built, so its keys are never read.
    counts: dict[tuple[str, str], int] = {}
    for _, name, key, _ in used["reads"]:
        counts[(name, key)] = counts.get((name, key), 0) + 1

    def expected(key: str) -> int:
        return 2 if key.startswith("vae.encoder.") else 3 if key.startswith("vae.per_channel_statistics.") else 1

    files = result["files"]
    gemma = next(name for name in files if name.startswith("model-"))
    wanted = {(CHECKPOINT, k): expected(k) for k in files[CHECKPOINT] if not k.startswith("audio_vae.encoder.")}
    wanted |= {(LORA, k): 1 for k in files[LORA]} | {(UPSAMPLER, k): 1 for k in files[UPSAMPLER]}
    wanted |= {(gemma, k): 1 for k in files[gemma] if not k.startswith(("vision_tower.", "multi_modal_projector."))}
    assert counts == wanted
    sizes = {(name, key): n for name, keys in files.items() for key, n in keys.items()}
    total = sum(n for *_, n in used["reads"])
    assert total == sum(sizes[k] * c for k, c in wanted.items())
    # What the stock path reads on top: the connectors with each transformer load, and the
    # transformer a second time for stage 2.
    connectors = sum(n for k, n in checkpoint.items() if k.startswith(CONNECTORS))
    transformer = sum(checkpoint[k] for k in transformer_keys)
    assert sum(n for *_, n in stock["reads"]) - total == 2 * connectors + transformer
