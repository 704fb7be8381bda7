"""Extend against the stock ltx-pipelines class, bit for bit, on the CPU; and the join.

The new segment of an extension is ``TI2VidTwoStagesPipeline`` given the clip's last frames as
its conditioning images (docs/DESIGN.md, 'Extend'): the same tiny checkpoints, prompt, seed and
tiles must give the same frames and sound, and swapping two conditioning frames must not.
The joined clip holds the source's decoded frames, then the segment after the overlap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMPARE = """
import json, sys
import numpy as np
import torch
torch.cuda.synchronize = lambda *args, **kwargs: None
from ltx_core.loader import LoraPathStrengthAndSDOps
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
from ltx_core.model.video_vae import SpatialTilingConfig, TemporalTilingConfig, TilingConfig
from ltx_pipelines.ti2vid_two_stages import TI2VidTwoStagesPipeline
from ltx_pipelines.utils.args import ImageConditioningInput
from ltx_pipelines.utils.constants import DEFAULT_NEGATIVE_PROMPT, detect_params
from generator.ltx2 import extend, pipeline
from generator.ltx2.models import LtxLedger
from generator.protocol import JobSpec

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
change = sys.argv[2]
req, models, t = spec.request, spec.models, spec.tiling
cpu = torch.device("cpu")

kept = {}
original_join = extend.join_segment
def join(source, fps, segment, audio):
    kept["segment"], kept["joined"] = [], []
    def tee():
        for chunk in segment:
            kept["segment"].append(chunk.copy())
            yield chunk
    frames, track = original_join(source, fps, tee(), audio)
    kept["segment_audio"], kept["joined_audio"] = audio[0].copy(), track[0].copy()
    def joined():
        for chunk in frames:
            kept["joined"].append(chunk.copy())
            yield chunk
    return joined(), track
extend.join_segment = join

def ours():
    kept.clear()
    done = pipeline.generate(spec, lambda event: None)
    return (np.concatenate(kept["segment"]), kept["segment_audio"], np.concatenate(kept["joined"]),
            kept["joined_audio"], done)

segment, segment_audio, joined, joined_audio, done = ours()
source = extend.read_source(spec)
images = [ImageConditioningInput(str(spec.output_path.parent / f"extend-context-{i}.png"), i, 1.0)
          for i in extend.CONDITION_FRAMES]
stock = TI2VidTwoStagesPipeline(
    checkpoint_path=str(models.checkpoint),
    distilled_lora=[LoraPathStrengthAndSDOps(str(models.distilled_lora), 1.0, LTXV_LORA_COMFY_RENAMING_MAP)],
    spatial_upsampler_path=str(models.spatial_upsampler), gemma_root=str(models.gemma_root), loras=[], device=cpu)
stock.stage_1_model_ledger = LtxLedger(dtype=torch.bfloat16, device=cpu, checkpoint_path=str(models.checkpoint),
                                       gemma_root_path=str(models.gemma_root),
                                       spatial_upsampler_path=str(models.spatial_upsampler))
stock.stage_2_model_ledger = stock.stage_1_model_ledger.with_additional_loras(
    (LoraPathStrengthAndSDOps(str(models.distilled_lora), 1.0, LTXV_LORA_COMFY_RENAMING_MAP),))
params = detect_params(str(models.checkpoint))
tiling = TilingConfig(spatial_config=SpatialTilingConfig(t.spatial_px, t.spatial_overlap_px),
                      temporal_config=TemporalTilingConfig(t.temporal_frames, t.temporal_overlap_frames))
with torch.inference_mode():
    video, audio = stock(prompt=req.prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT, seed=req.seed,
                         height=req.height, width=req.width, num_frames=req.frames, frame_rate=req.fps,
                         num_inference_steps=req.steps, video_guider_params=params.video_guider_params,
                         audio_guider_params=params.audio_guider_params, images=images, tiling_config=tiling)
    stock_frames = np.concatenate([chunk.cpu().numpy() for chunk in video])
    stock_audio = audio.waveform.float().cpu().numpy()
del stock

if change == "order":  # the overlap's first and last conditioning frames swapped
    original = extend.conditioning_inputs
    def swapped(spec, source):
        images = original(spec, source)
        first, last = images[0], images[-1]
        return [first._replace(path=last.path), *images[1:-1], last._replace(path=first.path)]
    extend.conditioning_inputs = swapped
changed, changed_audio, _, _, _ = ours()
original_frames = np.concatenate(list(extend.source_frames(spec.source_video_path)))
print(json.dumps({
    "segment_shape": list(segment.shape), "stock_shape": list(stock_frames.shape),
    "joined_shape": list(joined.shape), "done_frames": done.frames,
    "frames_equal": bool(np.array_equal(segment, stock_frames)),
    "audio_equal": bool(np.array_equal(segment_audio, stock_audio)),
    "head_is_source": bool(np.array_equal(joined[:source.frames], original_frames)),
    "tail_is_segment": bool(np.array_equal(joined[source.frames:], segment[extend.EXTEND_OVERLAP_FRAMES:])),
    "joined_audio_samples": int(joined_audio.shape[-1]),
    "changed_frames_equal": bool(np.array_equal(changed, stock_frames)),
}))
"""


def write_source_clip(path: Path, *, width: int, height: int, frames: int, fps: int = 24,
                      audio: bool = True) -> np.ndarray:
    """A clip as the bot delivers them (H.264 + AAC through the project's writer): moving bars and a tone.

    Returns the frames as they decode from the file.
    """
    from generator.encode import ClipWriter
    from generator.ltx2.extend import source_frames

    writer = ClipWriter(path, width=width, height=height, fps=fps, crf=18)
    if audio:
        rate = 16000
        t = np.arange(int(frames / fps * rate)) / rate
        writer.write_audio(np.stack([np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32) * 0.5, rate)
    x = np.arange(width)[None, :, None]
    for i in range(frames):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        frame[..., 0] = ((x[..., 0] * 4 + i * 12) % 256).astype(np.uint8)
        frame[..., 1] = 40 + 8 * i
        frame[height // 3: height // 2, (i * 5) % width:, 2] = 230
        writer.write_frames(frame[None])
    writer.close()
    return np.concatenate(list(source_frames(path)))


def extend_spec(tmp_path: Path, tiny_models: Path, *, source_frames: int, frames: int, **request: Any) -> Path:
    from tests.test_generator import make_spec

    clip = tmp_path / "source.mp4"
    write_source_clip(clip, width=128, height=64, frames=source_frames)
    spec = make_spec(tmp_path, tiny_models, audio=True, width=128, height=64, frames=frames, steps=2, **request)
    data = spec.model_dump()
    extension = {"mode": "extend", "source_video": clip.name, "source_job": 1, "source_frames": source_frames}
    spec = type(spec).model_validate(data | {"request": data["request"] | extension, "source_video_path": str(clip)})
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    return path


def test_extension_segment_is_the_stock_two_stage_pipeline_given_the_last_frames(
    tmp_path: Path, tiny_models: Path
) -> None:
    spec = extend_spec(tmp_path, tiny_models, source_frames=17, frames=17)
    result = json.loads(run_python(COMPARE, str(spec), "order"))
    assert result["segment_shape"] == result["stock_shape"] == [17, 64, 128, 3]
    assert result["frames_equal"] and result["audio_equal"], result
    # The joined clip: the source's 17 decoded frames, then the segment's 8 new ones.
    assert result["joined_shape"] == [25, 64, 128, 3] and result["done_frames"] == 25
    assert result["head_is_source"] and result["tail_is_segment"], result
    # The first and last conditioning frames swapped: another segment, so the comparison sees the order.
    assert not result["changed_frames_equal"], result


def test_crossfade_keeps_the_clip_before_the_overlap_and_the_segment_after() -> None:
    from generator.ltx2.extend import crossfade

    rate, fps = 240, 24  # 10 samples a frame
    original = np.full((2, 170), 0.5, dtype=np.float32)
    segment = np.full((2, 170), -0.25, dtype=np.float32)
    joined = crossfade(original, segment, 17, fps, rate)
    # The segment starts 9 frames (90 samples) before the clip's end: 80 + 170 samples.
    assert joined.shape == (2, 250)
    assert np.all(joined[:, :80] == 0.5) and np.all(joined[:, 170:] == -0.25)
    assert joined[0, 80] == pytest.approx(0.5) and joined[0, 169] == pytest.approx(-0.25, abs=0.01)
    silent = crossfade(None, segment, 17, fps, rate)
    assert np.all(silent[:, :80] == 0.0) and np.all(silent[:, 170:] == -0.25)


def test_a_source_clip_that_is_not_the_requested_one_is_refused_naming_it(tmp_path: Path, tiny_models: Path) -> None:
    from generator.protocol import JobSpec
    from tests.test_generator import run_generator

    path = extend_spec(tmp_path, tiny_models, source_frames=17, frames=17)
    spec = JobSpec.model_validate_json(path.read_text())
    wrong = spec.model_copy(update={"request": spec.request.model_copy(update={"source_frames": 25})})
    code, events = run_generator(tmp_path, wrong)
    assert code == 2
    assert events[-1].event == "error" and "the clip has 17 frames, the request says 25" in events[-1].message


def test_request_refuses_extend_fields_that_do_not_fit() -> None:
    from pydantic import ValidationError

    from generator.protocol import GenerationRequest, describe_validation_error

    base: dict[str, Any] = {"prompt": "waves", "width": 128, "height": 64, "frames": 17, "seed": 1, "mode": "extend",
            "source_video": "a.mp4", "source_frames": 17}
    assert GenerationRequest.model_validate(base).total_frames == 25
    cases: list[tuple[dict[str, Any], str]] = [({"frames": 9}, "frames must be at least 17 for extend"),
                          ({"source_frames": None}, "source_frames is required for extend"),
                          ({"source_frames": 18}, "source_frames must be one more than a multiple of 8"),
                          ({"mode": "animate", "source_video": None}, "source_frames is only for extend")]
    for change, words in cases:
        with pytest.raises(ValidationError) as caught:
            GenerationRequest.model_validate(base | change)
        assert words in describe_validation_error(caught.value).lower()



def test_each_press_adds_the_configured_seconds_until_the_maximum() -> None:
    from types import SimpleNamespace

    from bot.config import Settings
    from bot.jobs_service import JobService
    from generator.protocol import GenerationRequest

    def next_segment(settings: Settings, **request: Any) -> int:
        source = GenerationRequest.model_validate(
            {"prompt": "waves", "width": 128, "height": 64, "seed": 1} | request)
        return JobService.extension_frames(SimpleNamespace(settings=settings), source)  # type: ignore[arg-type]

    defaults = Settings()  # 4 s a press, 20 s at most, limits.max_frames 257
    assert next_segment(defaults, frames=97) == 9 + 96  # 97 + 96 = 193 frames, 8.0 s
    # An extension of an extension: 401 frames so far, 480 allowed: 72 more, not 96.
    assert next_segment(defaults, frames=97, mode="extend", source_video="a.mp4", source_frames=313) == 9 + 72
    assert next_segment(defaults, frames=473, mode="extend", source_video="a.mp4", source_frames=9) == 0
    short = Settings(extend={"segment_seconds": 0.34, "max_seconds": 0.75})  # type: ignore[arg-type]
    assert next_segment(short, frames=9) == 17 and next_segment(short, frames=17) == 0


async def test_worker_renders_an_extension_longer_by_the_new_segment(
    make_settings: Any, store: Any
) -> None:
    """Through the worker and the real generator: an animate clip, then an extension of it."""
    import hashlib
    import shutil

    import av

    from bot.db.models import JobStatus
    from bot.worker import Worker
    from generator.ltx2.extend import source_frames
    from tests.test_worker import queue_job

    settings = make_settings()
    worker = Worker(settings, store)
    common = {"width": 128, "height": 64, "audio": True}
    first_id = await queue_job(settings, store, frames=17, **common)
    first = await worker.step()
    assert first is not None and first.id == first_id and first.status == JobStatus.SUCCEEDED
    clip = Path(first.output_path or "")
    # What SharedFiles.clip_as_upload does on the front end: the clip in uploads by its content.
    name = f"{hashlib.sha256(clip.read_bytes()).hexdigest()}.mp4"
    shutil.copyfile(clip, settings.uploads_dir / name)
    second_id = await queue_job(settings, store, frames=25, seed=9, mode="extend", source_video=name,
                                source_job=first_id, source_frames=17, **common)
    second = await worker.step()
    assert second is not None and second.id == second_id and second.status == JobStatus.SUCCEEDED, second
    original = np.concatenate(list(source_frames(clip)))
    joined = np.concatenate(list(source_frames(Path(second.output_path or ""))))
    # 17 frames, then the 25-frame segment less its 9 overlapping ones: 33, at the clip's size and rate.
    assert original.shape == (17, 64, 128, 3) and joined.shape == (33, 64, 128, 3)
    head = np.abs(joined[:17].astype(np.int16) - original.astype(np.int16)).mean()
    assert head < 4.0, head  # the original's decoded frames, after one more H.264 pass
    with av.open(str(second.output_path)) as container:
        assert float(container.streams.video[0].average_rate) == 24.0
        audio = container.streams.audio[0]
        seconds = sum(f.samples for f in container.decode(audio=0)) / audio.rate
    with av.open(str(clip)) as container:
        first_seconds = sum(f.samples for f in container.decode(audio=0)) / container.streams.audio[0].rate
    # Sound to the end: the first clip's track plus the 16 new frames' (the model's track runs a little short).
    assert seconds == pytest.approx(first_seconds + 16 / 24, abs=0.08), (seconds, first_seconds)
