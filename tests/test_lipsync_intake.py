"""The audio intake of /lipsync: each allowed format in, every hostile file out with a reason, nothing left behind."""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import av
import pytest

from bot.intake import IntakeError
from bot.intake.audio import AudioLimits, clip_frames, normalise_audio, sniff_audio
from tests.conftest import image_bytes
from tests.support.audio_files import SECRET, encoded, info_chunk, wav_with_chunks

MAX_SECONDS = 10.0


def take(data: bytes, tmp_path: Path, max_frames: int = 257) -> tuple[Path, int, float]:
    audio = normalise_audio(data, tmp_path / "uploads", max_seconds=MAX_SECONDS, fps=24, max_frames=max_frames,
                            limits=AudioLimits())
    return audio.path, audio.frames, audio.seconds


def refused(data: bytes, tmp_path: Path) -> IntakeError:
    with pytest.raises(IntakeError) as info:
        take(data, tmp_path)
    uploads = tmp_path / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir()), "a refused file left something in uploads/"
    assert info.value.message.endswith("."), info.value.message
    return info.value


def samples(path: Path) -> tuple[int, int, int]:
    with wave.open(str(path)) as stored:
        return stored.getnframes(), stored.getnchannels(), stored.getframerate()


def test_clip_frames_is_the_longest_8k_plus_1_inside_the_audio() -> None:
    assert clip_frames(2.0, 24, 257) == 41  # 48 frames of audio: 41 fit, 49 would outrun it
    assert clip_frames(17 / 24, 24, 257) == 17
    assert clip_frames(60.0, 24, 257) == 257  # capped by limits.max_frames
    assert clip_frames(60.0, 24, 100) == 97  # a cap off the grid rounds down onto it
    assert clip_frames(0.3, 24, 257) == 1


@pytest.mark.parametrize("kind", ["mp3", "m4a", "ogg", "wav"])
def test_each_allowed_format_becomes_a_clip_long_48k_stereo_wav_named_by_content(tmp_path: Path, kind: str) -> None:
    data = encoded(kind, 2.0, channels=1 if kind == "wav" else 2)
    assert sniff_audio(data) == kind
    path, frames, seconds = take(data, tmp_path)
    assert frames == 41 and seconds == 41 / 24
    assert samples(path) == (41 * 48000 // 24, 2, 48000)  # mono upmixed, every rate to 48 kHz
    assert path.name == hashlib.sha256(path.read_bytes()).hexdigest() + ".wav"
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [path.name]


@pytest.mark.parametrize("kind", ["mp3", "m4a", "ogg"])
def test_tags_are_dropped(tmp_path: Path, kind: str) -> None:
    data = encoded(kind, 1.0, metadata={"title": SECRET, "comment": SECRET, "artist": SECRET})
    assert SECRET.encode() in data
    path, _, _ = take(data, tmp_path)
    assert SECRET.encode() not in path.read_bytes()
    with av.open(str(path)) as stored:
        assert not dict(stored.metadata) and not dict(stored.streams.audio[0].metadata)


def test_a_wav_with_a_large_info_chunk_keeps_only_its_samples(tmp_path: Path) -> None:
    data = wav_with_chunks(1.0, extra=info_chunk(SECRET, padding=200_000))
    path, frames, _ = take(data, tmp_path)
    assert frames == 17 and SECRET.encode() not in path.read_bytes()
    # RIFF header, fmt chunk, data: nothing else.
    assert path.stat().st_size == 44 + samples(path)[0] * 4


@pytest.mark.parametrize(("data", "says"), [
    (image_bytes("PNG", (64, 64)), "a picture, not audio"),
    (image_bytes("JPEG", (64, 64)), "a picture, not audio"),
    (b"fLaC" + b"\x00" * 100, "FLAC audio"),
    (b"hello, this is a text file\n" * 10, "text, not audio"),
    (b"\x00\x00\x00\x18ftypavif" + b"\x00" * 100, "a video or another MP4 file"),
    (b"", "empty"),
])
def test_other_types_are_refused_by_their_bytes(tmp_path: Path, data: bytes, says: str) -> None:
    problem = refused(data, tmp_path)
    assert problem.code in {"unsupported_type", "empty"} and says in problem.message
    assert "MP3, WAV, M4A or OGG" in problem.message


def test_a_video_named_m4a_is_refused(tmp_path: Path) -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ipod") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height = 64, 64
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 10, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    problem = refused(buffer.getvalue(), tmp_path)
    assert problem.code == "unsupported_type" and "video" in problem.message


@pytest.mark.parametrize("kind", ["mp3", "m4a", "ogg", "wav"])
def test_audio_over_the_limit_is_refused(tmp_path: Path, kind: str) -> None:
    problem = refused(encoded(kind, MAX_SECONDS + 2), tmp_path)
    assert problem.code == "too_large" and "longer than this server's 10 s" in problem.message


def test_a_header_that_hides_the_length_does_not_get_past_the_limit(tmp_path: Path) -> None:
    """A WAV whose data size says "unknown" (as a streaming writer leaves it): the decoded samples count."""
    problem = refused(wav_with_chunks(MAX_SECONDS + 2, data_size=0xFFFFFFFF), tmp_path)
    assert problem.code == "too_large"


@pytest.mark.parametrize("kind", ["mp3", "m4a", "wav"])
def test_truncated_files_are_refused(tmp_path: Path, kind: str) -> None:
    data = encoded(kind, 4.0)
    problem = refused(data[: len(data) // 3], tmp_path)
    assert problem.code in {"truncated", "corrupt"}, problem.code
    assert "cut short" in problem.message or "incomplete or damaged" in problem.message


def test_a_garbled_body_behind_a_good_signature_is_refused(tmp_path: Path) -> None:
    problem = refused(b"OggS" + bytes(range(256)) * 40, tmp_path)
    assert problem.code == "corrupt" and "OGG" in problem.message


def test_audio_too_short_for_a_clip_is_refused(tmp_path: Path) -> None:
    problem = refused(encoded("wav", 0.2), tmp_path)
    assert problem.code == "too_small" and "at least 0.38 s" in problem.message


def test_a_long_track_is_cut_to_max_frames_and_says_so(tmp_path: Path) -> None:
    audio = normalise_audio(encoded("wav", 8.0), tmp_path / "uploads", max_seconds=MAX_SECONDS, fps=24,
                            max_frames=97)
    assert (audio.frames, audio.seconds) == (97, 97 / 24)
    assert samples(audio.path)[0] == 97 * 2000
    assert audio.notes == ["the clip covers the first 4.0 s of your 8.0 s of audio"]


@pytest.mark.parametrize(("extra", "says"), [
    ({"pipeline": "distilled"}, "pipeline must be two_stage for lipsync"),
    ({"audio": False}, "audio must stay on for lipsync"),
    ({"loop": True}, "end_image and loop do not go with lipsync"),
    ({"loras": [{"name": "camera"}]}, "lora does not go with lipsync"),
    ({"audio_file": None}, "audio_file is required for lipsync"),
])
def test_a_lipsync_request_is_two_stage_with_sound_and_nothing_else(extra: dict[str, object], says: str) -> None:
    from pydantic import ValidationError

    from bot.drafts import draftable
    from generator.protocol import GenerationRequest

    base = {"prompt": "she sings", "width": 128, "height": 64, "frames": 9, "seed": 1, "mode": "lipsync",
            "audio_file": "a.wav"}
    # A server that drafts by default still renders a lip-sync clip whole (a Rerun included).
    assert not draftable(GenerationRequest.model_validate(base))
    with pytest.raises(ValidationError, match=says):
        GenerationRequest.model_validate(base | extra)
