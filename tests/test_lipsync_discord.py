"""/lipsync end to end: the real bot and discord.py client, the real audio intake and generator on the
tiny checkpoint (CPU), against the loopback fake Discord."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pytest

from tests.conftest import image_bytes
from tests.support.audio_files import SECRET, encoded, wav_with_chunks
from tests.support.discord_harness import ALICE, Harness, decode_mp4
from tests.test_discord_e2e import make_harness  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(600)


def _uploads(harness: Harness) -> list[Path]:
    folder = harness.data_dir / "uploads"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def audio_samples(data: bytes) -> tuple[int, int]:
    """The decoded sample count and rate of an mp4's audio track."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)), stream.rate


async def test_lipsync_posts_a_clip_with_the_users_audio_and_refuses_hostile_tracks(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    h: Harness = await make_harness(limits={"max_upload_bytes": 2**20, "max_audio_seconds": 4.0})
    fake = h.fake
    photo = image_bytes(size=(320, 240))
    hostile = {
        "wrong type": (fake.attachment(image_bytes("PNG", (64, 64)), "voice.mp3", "audio/mpeg"),
                       "audio: That file is a picture, not audio"),
        # Says 1 KiB; the CDN streams 1.5 MiB, over the 1 MiB limit.
        "lying size": (fake.attachment(wav_with_chunks(8.0, 48000), "voice.wav", "audio/wav", declared_size=1024),
                       "audio: That file is larger than 1 MiB; please upload a smaller audio file."),
        "too long": (fake.attachment(encoded("mp3", 6.0), "voice.mp3", "audio/mpeg"),
                     "audio: That audio is longer than this server's 4 s"),
        "truncated": (fake.attachment(wav_with_chunks(2.0)[:60_000], "voice.wav", "audio/wav"),
                      "audio: That WAV file is cut short"),
        "garbled": (fake.attachment(b"OggS" + bytes(range(256)) * 40, "voice.ogg", "audio/ogg"),
                    "audio: That OGG file is incomplete or damaged"),
    }
    for name, (audio, says) in hostile.items():
        asked = await fake.slash(ALICE, "lipsync", {"prompt": "she sings"}, attachment=fake.attachment(
            photo, "photo.png"), attachments={"audio": audio})
        answer = await h.answer_text(asked)
        assert answer.startswith("I can't animate that: ") and says in answer, (name, answer)
        assert not _uploads(h), f"{name}: the refused track left {_uploads(h)} in uploads/"
    assert not await h.jobs()

    # A tagged M4A (title, artist): accepted, its tags dropped; 0.6 s of audio make a 9-frame clip.
    voice = encoded("m4a", 0.6, metadata={"title": SECRET, "artist": SECRET})
    asked = await fake.slash(ALICE, "lipsync", {"prompt": "she sings"}, attachment=fake.attachment(
        photo, "photo.png"), attachments={"audio": fake.attachment(voice, "voice.m4a", "audio/mp4")})
    assert "Job 1 is queued" in await h.answer_text(asked)
    (post,) = await h.wait_clip_post(count=1, timeout=500)
    clip = post.files[0].data
    (job,) = await h.jobs()
    assert job.params["mode"] == "lipsync" and job.params["frames"] == 9 and job.params["audio"]
    assert decode_mp4(clip) == (9, job.params["width"], job.params["height"])
    stored = h.data_dir / "uploads" / job.params["audio_file"]
    assert SECRET.encode() not in stored.read_bytes()
    with av.open(str(stored)) as track:
        given = track.streams.audio[0].frames or sum(f.samples for f in track.decode(audio=0))
    # The clip's sound is the stored track (9 frames at 24 fps of 48 kHz), within one AAC frame of padding.
    got, rate = audio_samples(clip)
    assert rate == 48000 and given == 9 * 2000
    assert abs(got - given) <= 1024, (got, given)
    assert "lip-sync" in post.json["content"]
