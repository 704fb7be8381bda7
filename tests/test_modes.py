"""The modes beyond image-to-video, against the stock ltx-pipelines classes, bit for bit, on the CPU.

Each case renders one clip through our composition (``generator.ltx2.pipeline.generate``)
and one through the stock class on the same tiny checkpoints, image, prompt, seed and tiles,
in a fresh interpreter. The stock classes call ``torch.cuda.synchronize()`` unconditionally,
so it is stubbed; their ``ModelLedger`` hard-codes the 12B Gemma, so they get ours
(``LtxLedger``, checked against ltx-core's numbers in tests/test_models.py). A second run of
ours with one deliberate change must differ, or the comparison could not fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_python

# Each fidelity case renders three clips (the stock class, ours, ours changed) on a shared CPU.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMPARE = """
import json, sys
from pathlib import Path
import numpy as np
import torch
torch.cuda.synchronize = lambda *args, **kwargs: None
from ltx_core.loader import LoraPathStrengthAndSDOps
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
from ltx_core.model.video_vae import SpatialTilingConfig, TemporalTilingConfig, TilingConfig
from ltx_pipelines.keyframe_interpolation import KeyframeInterpolationPipeline
from ltx_pipelines.ti2vid_two_stages_hq import TI2VidTwoStagesHQPipeline
from ltx_pipelines.utils.args import ImageConditioningInput
from ltx_pipelines.utils.constants import DEFAULT_NEGATIVE_PROMPT, detect_params
from generator.ltx2 import hq, keyframes, pipeline
from generator.ltx2.models import LtxLedger
from generator.protocol import JobSpec

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
case, change = sys.argv[2], sys.argv[3]
user = tuple(LoraPathStrengthAndSDOps(str(l.path), l.strength, LTXV_LORA_COMFY_RENAMING_MAP) for l in spec.loras)
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

def lora(strength):
    return LoraPathStrengthAndSDOps(str(models.distilled_lora), strength, LTXV_LORA_COMFY_RENAMING_MAP)

def ledger(loras):
    return LtxLedger(dtype=torch.bfloat16, device=cpu, checkpoint_path=str(models.checkpoint),
                     gemma_root_path=str(models.gemma_root), spatial_upsampler_path=str(models.spatial_upsampler),
                     loras=loras)

tiling = TilingConfig(spatial_config=SpatialTilingConfig(t.spatial_px, t.spatial_overlap_px),
                      temporal_config=TemporalTilingConfig(t.temporal_frames, t.temporal_overlap_frames))
common = dict(prompt=req.prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT, seed=req.seed, height=req.height,
              width=req.width, num_frames=req.frames, frame_rate=req.fps, tiling_config=tiling)
if case == "hq":
    stock = TI2VidTwoStagesHQPipeline(
        checkpoint_path=str(models.checkpoint), distilled_lora=[lora(1.0)],
        distilled_lora_strength_stage_1=hq.DISTILLED_LORA_STRENGTH_STAGE_1,
        distilled_lora_strength_stage_2=hq.DISTILLED_LORA_STRENGTH_STAGE_2,
        spatial_upsampler_path=str(models.spatial_upsampler), gemma_root=str(models.gemma_root), loras=(),
        device=cpu)
    # The stock class puts the owner's LoRAs first: loras=(*loras, distilled) in each stage's ledger.
    stock.stage_1_model_ledger = ledger((*user, lora(hq.DISTILLED_LORA_STRENGTH_STAGE_1)))
    stock.stage_2_model_ledger = stock.stage_1_model_ledger.with_loras(
        (*user, lora(hq.DISTILLED_LORA_STRENGTH_STAGE_2)))
    params = hq.HQ_PARAMS
    images = [ImageConditioningInput(str(spec.image_path), 0, req.image_strength)]
    steps = req.steps or params.num_inference_steps
else:
    stock = KeyframeInterpolationPipeline(
        checkpoint_path=str(models.checkpoint), distilled_lora=[lora(1.0)],
        spatial_upsampler_path=str(models.spatial_upsampler), gemma_root=str(models.gemma_root), loras=[],
        device=cpu)
    stock.stage_1_model_ledger = ledger(user)
    stock.stage_2_model_ledger = stock.stage_1_model_ledger.with_additional_loras((lora(1.0),))
    params = detect_params(str(models.checkpoint))
    images = [ImageConditioningInput(str(spec.image_path), 0, req.image_strength),
              ImageConditioningInput(str(spec.end_image_path), req.frames - 1, req.image_strength)]
    steps = req.steps
# The stock scripts' main() runs under inference_mode (the keyframe class's __call__ has no decorator).
with torch.inference_mode():
    video, audio = stock(**common, num_inference_steps=steps, video_guider_params=params.video_guider_params,
                         audio_guider_params=params.audio_guider_params, images=images)
    stock_frames = np.concatenate([chunk.cpu().numpy() for chunk in video])
    stock_audio = audio.waveform.float().cpu().numpy()
del stock

frames, waveform = ours()
if change == "strengths":  # stage 1 takes stage 2's LoRA strength and back
    hq.DISTILLED_LORA_STRENGTH_STAGE_1, hq.DISTILLED_LORA_STRENGTH_STAGE_2 = (
        hq.DISTILLED_LORA_STRENGTH_STAGE_2, hq.DISTILLED_LORA_STRENGTH_STAGE_1)
elif change == "order":  # the end image first and the first image last
    original = keyframes.conditioning_images
    def swapped(spec):
        images, condition = original(spec)
        (a, b) = images
        return [a._replace(path=b.path), b._replace(path=a.path)], condition
    pipeline.conditioning_images = swapped
elif change == "no_lora":  # the same job without the owner's LoRA
    spec = spec.model_copy(update={"loras": (), "request": spec.request.model_copy(update={"loras": ()})})
changed_frames, changed_audio = ours()
print(json.dumps({
    "shape": list(frames.shape), "stock_shape": list(stock_frames.shape),
    "frames_equal": bool(np.array_equal(frames, stock_frames)),
    "audio_equal": bool(np.array_equal(waveform, stock_audio)),
    "frames_diff": float(np.abs(frames.astype(np.float64) - stock_frames.astype(np.float64)).max()),
    "audio_diff": float(np.abs(waveform - stock_audio).max()),
    "changed_frames_equal": bool(np.array_equal(changed_frames, stock_frames)),
    "changed_audio_equal": bool(np.array_equal(changed_audio, stock_audio)),
}))
"""


WRITE_LORA = """
import sys
from pathlib import Path
from generator.ltx2.tiny import write_tiny_lora
write_tiny_lora(Path(sys.argv[1]), Path(sys.argv[2]))
print("ok")
"""


def write_end_image(path: Path) -> None:
    """An image unlike the first (a flat colour with a bar), so swapping the two shows."""
    from PIL import Image

    image = Image.new("RGB", (128, 128), (20, 200, 90))
    image.paste((240, 30, 30), (0, 40, 128, 70))
    image.save(path)


def _compare(tmp_path: Path, tiny_models: Path, case: str, change: str, **request: Any) -> dict[str, Any]:
    from tests.test_generator import make_spec

    if change == "no_lora":
        lora = tmp_path / "camera.safetensors"
        run_python(WRITE_LORA, str(tiny_models / "ltx-2.3-tiny-dev.safetensors"), str(lora))
        request |= {"loras": [{"name": "camera", "strength": 0.8}],
                    "spec_loras": [{"name": "camera", "path": str(lora), "strength": 0.8}]}

    if case == "keyframes":
        end = tmp_path / "end.png"
        write_end_image(end)
        request |= {"end_image": end.name, "end_image_path": str(end)}
    spec_loras, asked = request.pop("spec_loras", []), request.pop("loras", [])
    spec = make_spec(tmp_path, tiny_models, audio=True, width=128, height=64, frames=9, steps=2, **request)
    data = spec.model_dump()
    spec = type(spec).model_validate(data | {"loras": spec_loras, "request": data["request"] | {"loras": asked}})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result: dict[str, Any] = json.loads(run_python(COMPARE, str(tmp_path / "spec.json"), case, change))
    return result


def test_two_stage_hq_is_the_stock_hq_pipeline_bit_for_bit(tmp_path: Path, tiny_models: Path) -> None:
    result = _compare(tmp_path, tiny_models, "hq", "strengths", pipeline="two_stage_hq")
    assert result["shape"] == result["stock_shape"] == [9, 64, 128, 3]
    assert result["frames_equal"] and result["audio_equal"], result
    # Swapping the two stages' LoRA strengths gives another clip: the comparison sees the stages.
    assert not result["changed_frames_equal"], result


def test_an_owners_lora_is_fused_as_the_stock_hq_pipeline_fuses_it(tmp_path: Path, tiny_models: Path) -> None:
    """The owner's LoRA goes first in both stages' ledgers, before the distilled LoRA, as in ltx-pipelines."""
    result = _compare(tmp_path, tiny_models, "hq", "no_lora", pipeline="two_stage_hq")
    assert result["frames_equal"] and result["audio_equal"], result
    # Without the LoRA the clip differs: the LoRA was applied.
    assert not result["changed_frames_equal"], result


def test_end_image_is_the_stock_keyframe_interpolation_bit_for_bit(tmp_path: Path, tiny_models: Path) -> None:
    result = _compare(tmp_path, tiny_models, "keyframes", "order", pipeline="two_stage")
    assert result["shape"] == result["stock_shape"] == [9, 64, 128, 3]
    assert result["frames_equal"] and result["audio_equal"], result
    # The end image at frame 0 and the first at the last frame: another clip.
    assert not result["changed_frames_equal"], result


def _clip(path: Path) -> tuple[int, set[tuple[int, int]], float, list[Any]]:
    import av
    import numpy as np

    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), {(f.shape[1], f.shape[0]) for f in frames}, rate, [np.asarray(f) for f in frames]


@pytest.mark.parametrize("mode", ["end_image", "loop", "two_stage_hq", "lora"])
def test_ltxbot_animate_renders_each_mode_with_exact_frames_size_and_fps(
    tmp_path: Path, tiny_models: Path, mode: str
) -> None:
    from tests.conftest import image_bytes
    from tests.test_animate import ltxbot, write_config

    write_config(tmp_path, tiny_models)
    if mode == "lora":
        run_python(WRITE_LORA, str(tiny_models / "ltx-2.3-tiny-dev.safetensors"), str(tmp_path / "camera.safetensors"))
        with (tmp_path / "config.yaml").open("a") as config:
            config.write("loras:\n  camera:\n    file: camera.safetensors\n    strength: 0.8\n    fits: '2.3'\n")
    (tmp_path / "photo.png").write_bytes(image_bytes("PNG", (400, 300)))
    write_end_image(tmp_path / "end.png")
    extra = {"end_image": ["--end-image", "end.png"], "loop": ["--loop"],
             "two_stage_hq": ["--pipeline", "two_stage_hq"], "lora": ["--lora", "camera"]}[mode]
    result = ltxbot(tmp_path, "animate", "photo.png", "waves roll in", "--width", "128", "--height", "64",
                    "--frames", "17", *extra, "--out", "clip.mp4")
    assert result.returncode == 0, result.stderr
    frames, sizes, fps, _ = _clip(tmp_path / "clip.mp4")
    assert (frames, sizes, fps) == (17, {(128, 64)}, 24.0)
    detail = json.loads(ltxbot(tmp_path, "job", "1", "--json").stdout)
    params = detail["params"]
    assert params["loop"] is (mode == "loop")
    assert (params["end_image"] is not None) is (mode == "end_image")
    assert params["pipeline"] == ("two_stage_hq" if mode == "two_stage_hq" else "two_stage")
    assert params["loras"] == ([{"name": "camera", "strength": 0.8}] if mode == "lora" else [])
    if mode == "end_image":  # the end image was stored through the intake, beside the first, fitted to the clip
        from PIL import Image

        with Image.open(tmp_path / "data" / "uploads" / params["end_image"]) as stored:
            assert stored.size == (128, 64)


def test_ltxbot_animate_refuses_end_image_with_loop_naming_both(tmp_path: Path, tiny_models: Path) -> None:
    from tests.conftest import image_bytes
    from tests.test_animate import ltxbot, write_config

    write_config(tmp_path, tiny_models)
    (tmp_path / "photo.png").write_bytes(image_bytes("PNG", (400, 300)))
    write_end_image(tmp_path / "end.png")
    result = ltxbot(tmp_path, "animate", "photo.png", "waves", "--end-image", "end.png", "--loop")
    assert result.returncode == 2
    assert "end_image and loop cannot go together" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "uploads").exists() or not any((tmp_path / "data" / "uploads").iterdir())
