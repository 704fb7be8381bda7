"""``ltxbot animate --audio``: a lip-sync clip on the CPU through the intake, the store, the worker and the
real generator on the tiny checkpoints."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import av
import pytest

from tests.conftest import image_bytes
from tests.test_animate import ltxbot, write_config
from tests.test_lipsync import write_voice

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_ltxbot_animate_with_audio_renders_a_clip_as_long_as_the_track_carrying_it(
    tmp_path: Path, tiny_models: Path
) -> None:
    write_config(tmp_path, tiny_models)
    (tmp_path / "photo.png").write_bytes(image_bytes("PNG", (400, 300)))
    given = write_voice(tmp_path / "voice.wav", 17 / 24)  # 17 frames' worth at 24 fps
    result = ltxbot(tmp_path, "animate", "photo.png", "she sings", "--audio", "voice.wav", "--width", "128",
                    "--height", "64", "--out", "clip.mp4")
    assert result.returncode == 0, result.stderr
    with av.open(str(tmp_path / "clip.mp4")) as clip:
        video = clip.streams.video[0]
        rate = float(video.average_rate)
        frames = list(clip.decode(video=0))
    with av.open(str(tmp_path / "clip.mp4")) as clip:
        assert clip.streams.audio, "the clip has no audio track"
        audio_rate = clip.streams.audio[0].rate
        samples = sum(frame.samples for frame in clip.decode(audio=0))
    assert (len(frames), {(f.width, f.height) for f in frames}, rate) == (17, {(128, 64)}, 24.0)
    # The user's track: 48 kHz, as long as they sent it (AAC pads to its 1024-sample frames, no more).
    assert audio_rate == 48000 and given == 17 * 2000
    assert abs(samples - given) <= 1024, (samples, given)
    detail = json.loads(ltxbot(tmp_path, "job", "1", "--json").stdout)
    params = detail["params"]
    # Each input is encoded once; the user's track is encoded, never decoded from the latent.
    assert [phase["name"] for phase in detail["phases"]] == [
        "text_encode", "embeddings", "image_encode", "audio_encode", "stage_1", "upsample", "stage_2",
        "video_decode", "finalize"]
    assert params["mode"] == "lipsync" and params["frames"] == 17 and params["pipeline"] == "two_stage"
    with wave.open(str(tmp_path / "data" / "uploads" / params["audio_file"])) as stored:
        assert (stored.getnframes(), stored.getnchannels(), stored.getframerate()) == (given, 2, 48000)


def test_ltxbot_animate_refuses_a_picture_as_audio_and_keeps_nothing(tmp_path: Path, tiny_models: Path) -> None:
    write_config(tmp_path, tiny_models)
    (tmp_path / "photo.png").write_bytes(image_bytes("PNG", (400, 300)))
    (tmp_path / "voice.mp3").write_bytes(image_bytes("PNG", (64, 64)))
    result = ltxbot(tmp_path, "animate", "photo.png", "she sings", "--audio", "voice.mp3")
    assert result.returncode == 2
    assert "audio: That file is a picture, not audio" in result.stderr and "Traceback" not in result.stderr
    uploads = tmp_path / "data" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    frames = ltxbot(tmp_path, "animate", "photo.png", "she sings", "--audio", "voice.mp3", "--frames", "17")
    assert frames.returncode == 2 and "--frames does not go with --audio" in frames.stderr
