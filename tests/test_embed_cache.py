"""The prompt-embedding cache (``generator/ltx2/embed_cache.py``): hits, misses and its bound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from generator.protocol import DoneEvent, JobSpec, parse_event
from tests.conftest import ROOT, clean_env, tiny_model_settings
from tests.test_generator import make_spec
from tests.test_guidance import _decoded


def _entry(size: int) -> Any:
    import torch
    from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessorOutput

    return EmbeddingsProcessorOutput(torch.zeros(size // 4), None, torch.ones(4, dtype=torch.bool))


def test_cache_stays_under_its_bound_dropping_the_least_recently_used(tmp_path: Path) -> None:
    import torch

    from generator.ltx2.embed_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", max_bytes=3 * 4200)
    for i, key in enumerate("abc"):
        cache.put(key, _entry(4000))
        os.utime(tmp_path / "cache" / f"{key}.safetensors", (1000 + i, 1000 + i))
    assert cache.get("a", torch.device("cpu")) is not None  # a is now the most recently used
    cache.put("d", _entry(4000))
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == ["a.safetensors", "c.safetensors", "d.safetensors"]
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= cache.max_bytes
    cache.put("huge", _entry(20_000))  # larger than the whole bound: never stored
    assert not (tmp_path / "cache" / "huge.safetensors").exists()


def test_entry_round_trips_bit_for_bit_and_damage_is_a_miss(tmp_path: Path) -> None:
    import torch
    from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessorOutput

    from generator.ltx2.embed_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path, max_bytes=2**20)
    out = EmbeddingsProcessorOutput(torch.randn(1, 7, 8, dtype=torch.bfloat16), torch.randn(1, 7, 4),
                                    torch.tensor([[0, 1, 1, 1, 1, 1, 1]]))
    cache.put("k", out)
    hit = cache.get("k", torch.device("cpu"))
    assert hit is not None
    for a, b in zip(out, (hit.video_encoding, hit.audio_encoding, hit.attention_mask), strict=True):
        assert b is not None and a.dtype == b.dtype and torch.equal(a, b)
    (tmp_path / "k.safetensors").write_bytes(b"not a safetensors file")
    assert cache.get("k", torch.device("cpu")) is None
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary behind


def test_key_covers_prompt_checkpoint_and_gemma_root(tmp_path: Path) -> None:
    import torch

    from generator.ltx2.embed_cache import entry_key, model_identity

    ckpt, gemma = tmp_path / "model.safetensors", tmp_path / "gemma"
    ckpt.write_bytes(b"x" * 10)
    gemma.mkdir()
    (gemma / "config.json").write_text("{}")
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    base = entry_key("waves", model_identity(ckpt, gemma, bf16, cpu))
    assert base == entry_key("waves", model_identity(ckpt, gemma, bf16, cpu))
    assert base != entry_key("waves roll", model_identity(ckpt, gemma, bf16, cpu))
    assert base != entry_key("waves", model_identity(ckpt, gemma, torch.float32, cpu))
    (gemma / "config.json").write_text('{"changed": 1}')
    changed_gemma = model_identity(ckpt, gemma, bf16, cpu)
    assert base != entry_key("waves", changed_gemma)
    ckpt.write_bytes(b"y" * 11)  # replaced in place
    assert entry_key("waves", changed_gemma) != entry_key("waves", model_identity(ckpt, gemma, bf16, cpu))


# The generator's own main, recording the final latents: on the tiny model a changed prompt can
# leave the uint8 frames as they were, so the latents show what the embeddings did.
GENERATOR = """
import sys
import torch
import generator.ltx2.pipeline as pipeline
spec_path, latents_path = sys.argv[1:]
latents = []
pipeline.DENOISE_OBSERVERS.append(lambda stage, video, audio: latents.extend([video.latent, audio.latent]))
from generator.run import main
code = main([spec_path])
torch.save([t.clone() for t in latents], latents_path)
raise SystemExit(code)
"""


def _run(work: Path, tiny_models: Path, cache: Path | None, **request: Any) -> tuple[DoneEvent, Any]:
    work.mkdir(parents=True)
    models = request.pop("models", tiny_model_settings(tiny_models))
    spec: JobSpec = make_spec(work, tiny_models, models=models, pipeline="one_stage", width=64, height=64,
                              frames=9, steps=2, **request)
    # float32: in bf16 the tiny model's latents do not move with the prompt, and the test would prove nothing.
    spec = spec.model_copy(update={"dtype": "float32"})
    if cache is not None:
        spec = spec.model_copy(update={"embedding_cache_dir": cache, "embedding_cache_bytes": 2**30})
    (work / "spec.json").write_text(spec.model_dump_json())
    proc = subprocess.run([sys.executable, "-c", GENERATOR, str(work / "spec.json"), str(work / "latents.pt")],
                          capture_output=True, text=True, env=clean_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = parse_event(proc.stdout.splitlines()[-1])
    assert isinstance(done, DoneEvent)
    import torch

    return done, (*_decoded(spec.output_path), *torch.load(work / "latents.pt"))


def _same(a: Any, b: Any) -> bool:
    import torch

    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)
               for x, y in zip(a, b, strict=True))


def _phases(done: DoneEvent) -> list[str]:
    return [p.name for p in done.phases]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_from_the_cache_skips_gemma_and_gives_the_same_clip(tmp_path: Path, tiny_models: Path) -> None:
    cache = tmp_path / "cache"
    _, uncached = _run(tmp_path / "uncached", tiny_models, None)
    first, _ = _run(tmp_path / "first", tiny_models, cache)
    assert "text_encode" in _phases(first)
    assert len(list(cache.glob("*.safetensors"))) == 2  # the prompt and the negative prompt
    rerun, clip = _run(tmp_path / "rerun", tiny_models, cache)
    assert "text_encode" not in _phases(rerun) and "embeddings" not in _phases(rerun)
    assert _same(uncached, clip)  # frames, audio samples, final video and audio latents

    tweak, tweaked = _run(tmp_path / "tweak", tiny_models, cache, prompt="waves roll out")
    assert "text_encode" in _phases(tweak)  # the new prompt misses (the negative prompt hits)
    assert len(list(cache.glob("*.safetensors"))) == 3
    assert not _same(tweaked, clip)

    other = tmp_path / "other.safetensors"
    shutil.copy(tiny_models / "ltx-2.3-tiny-dev.safetensors", other)
    models = tiny_model_settings(tiny_models) | {"checkpoint": str(other)}
    moved, _ = _run(tmp_path / "other", tiny_models, cache, models=models)
    assert "text_encode" in _phases(moved)  # another checkpoint misses both prompts
    assert len(list(cache.glob("*.safetensors"))) == 5
