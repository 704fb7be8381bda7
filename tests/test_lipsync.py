"""Lip-sync against the stock ``A2VidPipelineTwoStage``, bit for bit, on the CPU.

One clip through our composition (``generator.ltx2.pipeline.generate`` with ``mode: lipsync``)
and one through the stock class on the same tiny checkpoints, image, prompt, audio, seed and
tiles, in a fresh interpreter, as tests/test_modes.py does for the other modes (its
``torch.cuda.synchronize`` stub and ``LtxLedger`` for the stock class). A second run of ours
with the audio latent's time order reversed must differ, or the comparison could not fail.
"""

from __future__ import annotations

import json
import math
import struct
import wave
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RATE = 48000

COMPARE = """
import json, sys
import numpy as np
import torch
torch.cuda.synchronize = lambda *args, **kwargs: None
from ltx_core.loader import LoraPathStrengthAndSDOps
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
from ltx_core.model.video_vae import SpatialTilingConfig, TemporalTilingConfig, TilingConfig
from ltx_pipelines.a2vid_two_stage import A2VidPipelineTwoStage
from ltx_pipelines.utils.args import ImageConditioningInput
from ltx_pipelines.utils.constants import DEFAULT_NEGATIVE_PROMPT, detect_params
from generator.ltx2 import lipsync, pipeline
from generator.ltx2.models import LtxLedger
from generator.protocol import JobSpec

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
change = sys.argv[2]
req, models, t = spec.request, spec.models, spec.tiling
cpu = torch.device("cpu")

kept = {}
original_stream = pipeline.stream_clip
def stream(spec, tracker, frames, progress, audio):
    chunks = []
    def tee():
        for chunk in frames:
            chunks.append(chunk.copy())
            yield chunk
    done = original_stream(spec, tracker, tee(), progress, audio)
    kept["frames"], kept["audio"] = np.concatenate(chunks), audio[0].copy()
    return done
pipeline.stream_clip = stream

def ours():
    kept.clear()
    pipeline.generate(spec, lambda event: None)
    return kept["frames"], kept["audio"]

lora = LoraPathStrengthAndSDOps(str(models.distilled_lora), 1.0, LTXV_LORA_COMFY_RENAMING_MAP)
stock = A2VidPipelineTwoStage(
    checkpoint_path=str(models.checkpoint), distilled_lora=[lora],
    spatial_upsampler_path=str(models.spatial_upsampler), gemma_root=str(models.gemma_root), loras=[], device=cpu)
stock.stage_1_model_ledger = LtxLedger(
    dtype=torch.bfloat16, device=cpu, checkpoint_path=str(models.checkpoint), gemma_root_path=str(models.gemma_root),
    spatial_upsampler_path=str(models.spatial_upsampler))
stock.stage_2_model_ledger = stock.stage_1_model_ledger.with_additional_loras((lora,))
params = detect_params(str(models.checkpoint))
tiling = TilingConfig(spatial_config=SpatialTilingConfig(t.spatial_px, t.spatial_overlap_px),
                      temporal_config=TemporalTilingConfig(t.temporal_frames, t.temporal_overlap_frames))
# As the stock script's main(): under inference_mode, the audio read up to the clip's duration.
with torch.inference_mode():
    video, audio = stock(
        prompt=req.prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT, seed=req.seed, height=req.height,
        width=req.width, num_frames=req.frames, frame_rate=req.fps, num_inference_steps=req.steps,
        video_guider_params=params.video_guider_params,
        images=[ImageConditioningInput(str(spec.image_path), 0, req.image_strength)],
        audio_path=str(spec.audio_path), audio_max_duration=req.frames / req.fps, tiling_config=tiling)
    stock_frames = np.concatenate([chunk.cpu().numpy() for chunk in video])
    stock_audio = audio.waveform.float().cpu().numpy()
del stock

frames, waveform = ours()
if change == "order":  # the audio latent played backwards: the same sound, in another order
    original = lipsync.audio_track
    def reversed_track(run):
        decoded, latent = original(run)
        return decoded, latent.flip(2)
    lipsync.audio_track = reversed_track
changed_frames, changed_audio = ours()
print(json.dumps({
    "shape": list(frames.shape), "stock_shape": list(stock_frames.shape),
    "audio_shape": list(waveform.shape), "stock_audio_shape": list(stock_audio.shape),
    "frames_equal": bool(np.array_equal(frames, stock_frames)),
    "audio_equal": bool(np.array_equal(waveform, stock_audio)),
    "frames_diff": float(np.abs(frames.astype(np.float64) - stock_frames.astype(np.float64)).max()),
    "changed_frames_equal": bool(np.array_equal(changed_frames, stock_frames)),
}))
"""


def write_voice(path: Path, seconds: float, rate: int = RATE, channels: int = 2) -> int:
    """A stereo 16-bit WAV of a gliding tone with a beat (so reversing it in time changes it); its sample count."""
    count = round(seconds * rate)
    frames = bytearray()
    for i in range(count):
        t = i / rate
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 3 * t) * (t / seconds)
        left = int(12000 * envelope * math.sin(2 * math.pi * (220 + 600 * t) * t))
        right = int(9000 * envelope * math.sin(2 * math.pi * (330 + 200 * t) * t))
        frames += struct.pack("<" + "h" * channels, *([left, right][:channels]))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return count


def lipsync_spec(tmp_path: Path, tiny_models: Path, frames: int = 9, **request: Any) -> Any:
    from generator.protocol import JobSpec
    from tests.test_generator import make_spec

    voice = tmp_path / "voice.wav"
    write_voice(voice, frames / 24)
    data = make_spec(tmp_path, tiny_models, width=128, height=64, frames=frames, steps=2, **request).model_dump()
    return JobSpec.model_validate(data | {
        "request": data["request"] | {"mode": "lipsync", "audio_file": voice.name}, "audio_path": str(voice)})


def test_lipsync_is_the_stock_a2vid_two_stage_pipeline_bit_for_bit(tmp_path: Path, tiny_models: Path) -> None:
    spec = lipsync_spec(tmp_path, tiny_models)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result: dict[str, Any] = json.loads(run_python(COMPARE, str(tmp_path / "spec.json"), "order"))
    assert result["shape"] == result["stock_shape"] == [9, 64, 128, 3]
    # The clip's sound is the user's samples, clipped to the clip: 9 frames at 24 fps of 48 kHz.
    assert result["audio_shape"] == result["stock_audio_shape"] == [2, 9 * RATE // 24]
    assert result["frames_equal"] and result["audio_equal"], result
    # The audio latent reversed in time: another clip, so the comparison sees the audio conditioning.
    assert not result["changed_frames_equal"], result
