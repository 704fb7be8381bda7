"""Intake against the files issue 16 found: broken EXIF, many-scan JPEGs, lying headers, huge canvases.

Limits are measured in the decoder process itself (its VmHWM and CPU time, as it reports them),
never in this pytest process.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bot.config import Limits
from bot.intake import IntakeError
from bot.intake.image import DecodeLimits, DecoderUsage, ImageIntake, NormalisedImage, normalise_image
from tests.conftest import clean_env, image_bytes
from tests.support.intake_images import (
    ORIENTATION,
    RESOLUTION_UNIT,
    X_RESOLUTION,
    assert_clean_output,
    jpeg,
    jpeg_with_short_segments,
    many_scans,
    one_pixel_wide_png,
    orientation_with_ascii_resolution,
    patch_jpeg_size,
    png_claiming,
    png_with_bad_raw_profile,
    short,
    tiff,
    webp_canvas,
    with_exif,
)

MIB = 2**20
LIMITS = DecodeLimits()


def run(data: bytes, tmp_path: Path, target: tuple[int, int] | None = None,
        limits: DecodeLimits = LIMITS) -> tuple[NormalisedImage, DecoderUsage]:
    usage = DecoderUsage()
    result = normalise_image(data, (lambda w, h: target or (w, h)), tmp_path / "uploads", max_pixels=40_000_000,
                             min_side=64, limits=limits, usage=usage)
    return result, usage


def refused(data: bytes, tmp_path: Path, limits: DecodeLimits = LIMITS) -> tuple[IntakeError, DecoderUsage, float]:
    usage = DecoderUsage()
    started = time.monotonic()
    with pytest.raises(IntakeError) as info:
        normalise_image(data, lambda w, h: (256, 192), tmp_path / "uploads", max_pixels=40_000_000, min_side=64,
                        limits=limits, usage=usage)
    assert info.value.message.endswith("."), info.value.message
    return info.value, usage, time.monotonic() - started


def assert_within_limits(usage: DecoderUsage, limits: DecodeLimits = LIMITS) -> None:
    assert usage.ran and usage.peak_rss_kib is not None and usage.cpu_seconds is not None
    assert usage.peak_rss_kib * 1024 < limits.memory_mib * MIB
    assert usage.cpu_seconds < limits.cpu_seconds


def blue_on_top(path: Path) -> bool:
    with Image.open(path) as out:
        top, bottom = out.getpixel((100, 10)), out.getpixel((100, 390))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    return top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_orientation_6_with_an_ascii_x_resolution_is_applied(tmp_path: Path, fmt: str) -> None:
    """Pillow's EXIF serialiser raised TypeError on this; the rotation is read from the raw tag now."""
    result, usage = run(with_exif(fmt, orientation_with_ascii_resolution()), tmp_path)
    assert (result.width, result.height) == (200, 400)  # the 400x200 image is shown rotated
    assert blue_on_top(result.path)
    assert result.notes == []
    assert_clean_output(result.path, (200, 400), tmp_path / "uploads")
    assert_within_limits(usage)


BROKEN_METADATA = {
    # ResolutionUnit as a RATIONAL (it is a SHORT), beside a real rotation: Pillow said "truncated".
    "resolution_unit_as_a_rational": lambda: with_exif(
        "JPEG", tiff([(ORIENTATION, 3, 1, short(6)), (RESOLUTION_UNIT, 5, 1, (26).to_bytes(4, "little"))])),
    "resolution_unit_undefined": lambda: with_exif(
        "PNG", tiff([(ORIENTATION, 3, 1, short(6)), (RESOLUTION_UNIT, 7, 1, b"\x02"),
                     (X_RESOLUTION, 2, 3, b"72\x00")])),
    "exif_that_is_not_tiff": lambda: with_exif("WEBP", b"this is not a TIFF block at all"),
    "bad_raw_profile_text_chunks": png_with_bad_raw_profile,
    "short_jfif_and_adobe_segments": jpeg_with_short_segments,
}


@pytest.mark.parametrize("name", sorted(BROKEN_METADATA))
def test_broken_metadata_never_costs_a_good_image(tmp_path: Path, name: str) -> None:
    result, usage = run(BROKEN_METADATA[name](), tmp_path)
    rotated = name.startswith("resolution_unit")
    assert (result.width, result.height) == ((200, 400) if rotated else (400, 200))
    if rotated:
        assert blue_on_top(result.path)
    if name == "exif_that_is_not_tiff":
        assert result.notes == ["its rotation tag could not be read, so it is used as stored"]
    assert_clean_output(result.path, (result.width, result.height), tmp_path / "uploads")
    assert_within_limits(usage)


def test_progressive_jpeg_of_many_empty_scans_is_refused_at_once(tmp_path: Path) -> None:
    """20,000 empty scans over a 2048x2048 image: about 17 s of CPU in libjpeg, refused from the header."""
    data = many_scans(jpeg((2048, 2048), progressive=True), 20_000)
    error, usage, seconds = refused(data, tmp_path)
    assert error.code == "too_large" and "scans" in error.message
    assert not usage.ran and seconds < 2


def test_progressive_jpeg_under_the_scan_limit_decodes_within_limits(tmp_path: Path) -> None:
    data = many_scans(jpeg((1024, 1024), progressive=True), 400)
    result, usage = run(data, tmp_path, (256, 256))
    assert (result.width, result.height) == (256, 256)
    assert_within_limits(usage)


def test_tiny_animated_webp_with_a_huge_canvas_is_refused_before_decoding(tmp_path: Path) -> None:
    """94 bytes that made libwebp and Pillow allocate 1.26 GB for a 6324x6324 canvas."""
    data = webp_canvas(6324, 6324)
    assert len(data) < 120
    error, usage, _ = refused(data, tmp_path)
    assert error.code == "too_large" and "6324x6324" in error.message and "MiB" in error.message
    assert not usage.ran


def test_animated_webp_with_a_canvas_that_fits_is_decoded_within_limits(tmp_path: Path) -> None:
    result, usage = run(webp_canvas(2000, 1500), tmp_path, (256, 192))
    assert_clean_output(result.path, (256, 192), tmp_path / "uploads")
    assert_within_limits(usage)


LYING = {
    "jpeg_sof": lambda: patch_jpeg_size(jpeg((64, 64), progressive=True), 6000, 6000),
    "png_ihdr": lambda: png_claiming(6000, 6000, colour=6),
}


@pytest.mark.parametrize("name", sorted(LYING))
def test_dimensions_that_lie_are_refused_without_decoding(tmp_path: Path, name: str) -> None:
    error, usage, seconds = refused(LYING[name](), tmp_path)
    assert error.code == "corrupt" and "far too little image data" in error.message
    assert not usage.ran and seconds < 2


def test_one_pixel_wide_png_is_too_small_before_any_decoding(tmp_path: Path) -> None:
    """A valid 1x40000000 PNG: the old path decoded it (3 s, 530 MB) to say too small, or corrupt."""
    error, usage, _ = refused(one_pixel_wide_png(), tmp_path)
    assert error.code == "too_small" and "1x40000000" in error.message
    assert not usage.ran


def _noise(size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise((size[0] // 8, size[1] // 8), 60).convert("RGB").resize(size)


PHOTOS = {
    "jpeg": lambda: _save(_noise((6000, 4000)), "JPEG", quality=90),
    "progressive_jpeg": lambda: _save(_noise((6000, 4000)), "JPEG", quality=90, progressive=True),
    "rgba_png": lambda: _save(_noise((6000, 4000)).convert("RGBA"), "PNG", compress_level=1),
    # A phone's 12 Mpx photo as WebP: libwebp's canvases make WebP the costliest format per pixel.
    "webp_12_megapixels": lambda: _save(_noise((4000, 3000)), "WEBP", quality=80),
}


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_valid_large_photo_is_accepted_by_ltxbot_intake_under_the_limits(tmp_path: Path, name: str) -> None:
    (tmp_path / "photo").write_bytes(PHOTOS[name]())
    (tmp_path / "config.yaml").write_text("data_dir: data\n")
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "intake", "photo"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"], payload
    assert payload["decoder"]["peak_rss_mib"] < 300 and payload["decoder"]["cpu_s"] < 10, payload


def _decoder(
    request: dict[str, object], data: bytes, memory_mib: int, cpu_seconds: int
) -> tuple[int, dict[str, object]]:
    proc = subprocess.run([sys.executable, "-m", "bot.intake.decoder", str(memory_mib), str(cpu_seconds)],
                          input=json.dumps(request).encode() + b"\n" + data, capture_output=True, env=clean_env(),
                          timeout=60)
    line = proc.stdout.partition(b"\n")[0]
    return proc.returncode, (json.loads(line) if line else {})


def test_decoder_process_cannot_exceed_its_cpu_limit() -> None:
    """Past the header checks (called directly), 17 s of scans stop at the 1 s CPU limit."""
    data = many_scans(jpeg((2048, 2048), progressive=True), 20_000)
    request = {"fmt": "JPEG", "width": 2048, "height": 2048, "orientation": 1, "target": [256, 256],
               "max_pixels": 40_000_000}
    started = time.monotonic()
    status, reply = _decoder(request, data, 300, 1)
    assert time.monotonic() - started < 10
    assert (status == 0 and reply["code"] == "too_large" and reply["why"] == "cpu") or status in {
        -signal.SIGXCPU, -signal.SIGKILL}, (status, reply)


def test_decoder_process_cannot_exceed_its_memory_limit() -> None:
    data = _save(_noise((6000, 4000)), "PNG", compress_level=1)
    request = {"fmt": "PNG", "width": 6000, "height": 4000, "orientation": 1, "target": [1024, 768],
               "max_pixels": 40_000_000}
    status, reply = _decoder(request, data, 100, 10)
    assert status == 0 and reply["code"] == "too_large" and reply["why"] == "memory", (status, reply)
    assert isinstance(reply["peak_kib"], int) and reply["peak_kib"] * 1024 < 100 * MIB


def test_wall_clock_timeout_kills_the_decoder(tmp_path: Path) -> None:
    error, usage, seconds = refused(image_bytes("PNG", (320, 240)), tmp_path, DecodeLimits(timeout_seconds=0.001))
    assert error.code == "too_large" and "longer than" in error.message
    assert usage.ran and usage.peak_rss_kib is None and seconds < 5


def test_a_crashed_decoder_is_a_corrupt_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr("bot.intake.image.sys.executable", str(crash))
    error, usage, _ = refused(image_bytes("PNG", (320, 240)), tmp_path)
    assert error.code == "corrupt" and "crashed" in error.message
    assert usage.exit_status == -signal.SIGSEGV


async def test_image_intake_raises_nothing_but_intake_error(tmp_path: Path) -> None:
    intake = ImageIntake(tmp_path / "uploads", max_pixels=40_000_000, min_side=64, threads=1)

    def broken_target(_w: int, _h: int) -> tuple[int, int]:
        raise RuntimeError("a bug in the caller")

    try:
        with pytest.raises(IntakeError) as info:
            await intake.normalise(image_bytes("PNG", (320, 240)), broken_target)
    finally:
        intake.close()
    assert info.value.code == "corrupt" and "error id" in info.value.message


def test_ltxbot_intake_answers_one_json_line_when_something_unexpected_fails(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(image_bytes("PNG", (320, 240)))
    (tmp_path / "not_a_folder").write_text("a file where the output folder should be")
    (tmp_path / "config.yaml").write_text("data_dir: data\n")
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "intake", "good.png", "--out", "not_a_folder"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is False


def test_decode_limit_defaults_match_the_config() -> None:
    assert DecodeLimits.of(Limits()) == LIMITS
    assert DecodeLimits.of(Limits(decode_memory_mib=600)).memory_mib == 600
