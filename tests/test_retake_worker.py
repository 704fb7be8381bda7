"""A retake through the worker, end to end: a delivered clip becomes an upload, the retake job runs
in the real generator subprocess on the tiny checkpoint (CPU), real SQLite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import pytest

from bot.config import Settings
from bot.db.models import JobStatus
from bot.db.store import JobStore, NewJob
from bot.intake.image import normalise_image
from bot.retake import retake_request
from bot.shared_files import SharedFiles
from bot.worker import Worker
from tests.conftest import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _read(path: Path) -> dict[str, object]:
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video=0))
        audio = container.streams.audio
        samples = 0
        if audio:
            container.seek(0)
            samples = sum(frame.samples for frame in container.decode(audio=0))
        return {"frames": len(frames), "size": {(f.width, f.height) for f in frames},
                "fps": float(video.average_rate), "audio_seconds": samples / audio[0].rate if audio else None}


async def test_worker_renders_a_retake_with_the_source_clips_frames_size_fps_and_sound(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    settings = make_settings()
    image = normalise_image(image_bytes(), lambda w, h: (128, 64), settings.uploads_dir, max_pixels=10**7)
    source_params = {"prompt": "a kite rises", "width": 128, "height": 64, "frames": 17, "fps": 24, "steps": 2,
                     "seed": 1, "pipeline": "two_stage", "audio": True}
    created = await store.create(NewJob(user_id="u", prompt="a kite rises", params=source_params,
                                        input_path=str(image.path), input_sha256=image.sha256))
    worker = Worker(settings, store)
    source = await worker.step()
    assert source is not None and source.status == JobStatus.SUCCEEDED and source.id == created.id

    # What the front end does on the form's submit: the clip into uploads, the request from the source's params.
    name = await SharedFiles(settings, store).clip_as_upload(source)
    assert name is not None and (settings.uploads_dir / name).is_file()
    request = retake_request(source.params, prompt="the kite spins", start=0.38, end=0.71, seed=9,
                             source_video=name, source_job=source.id)
    await store.create(NewJob(user_id="u", prompt=request.prompt, params=request.model_dump(mode="json"),
                              input_path=source.input_path, input_sha256=source.input_sha256))
    done = await worker.step()
    assert done is not None and done.status == JobStatus.SUCCEEDED, done and done.error_message
    assert [p["name"] for p in done.phases or []] == [
        "text_encode", "embeddings", "source_encode", "stage_1", "audio_decode", "video_decode", "finalize"]

    retaken, original = _read(Path(done.output_path or "")), _read(Path(source.output_path or ""))
    assert (retaken["frames"], retaken["size"], retaken["fps"]) == (17, {(128, 64)}, 24.0)
    assert (original["frames"], original["size"], original["fps"]) == (17, {(128, 64)}, 24.0)
    # The sound is the source's length (the audio latent is trimmed or padded to the clip, as the stock class does).
    assert retaken["audio_seconds"] == pytest.approx(original["audio_seconds"], abs=0.05)
    assert (done.params["source_job"], done.params["pipeline"], done.params["retake_start"]) == (
        source.id, "one_stage", 0.38)


async def test_a_retake_whose_source_clip_is_gone_fails_with_a_sentence(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    settings = make_settings()
    image = normalise_image(image_bytes(), lambda w, h: (128, 64), settings.uploads_dir, max_pixels=10**7)
    params = {"prompt": "a kite rises", "width": 128, "height": 64, "frames": 17, "fps": 24, "steps": 2, "seed": 1,
              "pipeline": "one_stage", "audio": False}
    request = retake_request(params, prompt="the kite spins", start=0.0, end=0.5, seed=9,
                             source_video="f" * 64 + ".mp4", source_job=1)
    await store.create(NewJob(user_id="u", prompt=request.prompt, params=request.model_dump(mode="json"),
                              input_path=str(image.path), input_sha256=image.sha256))
    done = await Worker(settings, store).step()
    assert done is not None and done.status == JobStatus.FAILED
    assert done.error_message is not None and "cannot be retaken: the clip to retake is no longer stored" in (
        done.error_message)
