"""Fuzzed uploads: randomised EXIF, lying sizes and canvases, many-scan JPEGs, animations, cuts and appendages.

Each example goes through the real decoder process (and a few through ``ltxbot intake`` itself);
the limits are checked on what the decoder measured in itself. Reproducible in CI (derandomised);
a longer campaign: ``INTAKE_FUZZ_EXAMPLES=2000 INTAKE_FUZZ_SEED=1 INTAKE_FUZZ_REPORT=fuzz.jsonl
pytest tests/test_intake_fuzz.py``, which appends one JSON line per example to the report
(``python tests/support/intake_fuzz_report.py fuzz.jsonl`` sums it up).
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from bot.intake import IntakeError
from bot.intake.image import DecodeLimits, DecoderUsage, normalise_image
from tests.support.intake_images import assert_clean_output, many_scans, patch_jpeg_size, png_chunk, tiff, webp_canvas

LIMITS = DecodeLimits()
MIB = 2**20
# The wall-clock slack over the decoder's own timeout: the parent's header checks and file write.
SLACK_SECONDS = 5.0
EXAMPLES = int(os.environ.get("INTAKE_FUZZ_EXAMPLES", "50"))
CLI_EXAMPLES = int(os.environ.get("INTAKE_FUZZ_CLI_EXAMPLES", "6"))
SEED = os.environ.get("INTAKE_FUZZ_SEED")
REPORT = os.environ.get("INTAKE_FUZZ_REPORT")
TAGS = [0x0112, 0x011A, 0x011B, 0x0128, 0x010F, 0x0110, 0x0131, 0x8769, 0x8825, 0x9003, 0xA005, 0x927C]
# What the fuzzed inputs carry that must not survive: the EXIF header, the appended zip's start.
FUZZ_SECRETS = (b"Exif\x00\x00", b"PK\x03\x04zipzip")
MODES = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"], "WEBP": ["RGB", "RGBA"]}


def _side(draw: st.DrawFn, largest: int, small_one_in: int) -> int:
    """Mostly at or above the 64-pixel minimum; below it now and then (hypothesis favours small numbers)."""
    if draw(st.integers(1, small_one_in)) == 1:
        return draw(st.integers(1, 63))
    return draw(st.integers(64, largest))


def _campaign(test: Callable[..., None], examples: int) -> Callable[..., None]:
    options = settings(
        max_examples=examples, deadline=None, database=None, derandomize=SEED is None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    return options(seed(int(SEED))(test) if SEED is not None else test)


@st.composite
def exif_blocks(draw: st.DrawFn) -> bytes:
    order = draw(st.sampled_from("<>"))
    entries = []
    for _ in range(draw(st.integers(0, 5))):
        tag = draw(st.sampled_from(TAGS) | st.integers(0, 0xFFFF))
        kind = draw(st.integers(0, 14))
        count = draw(st.sampled_from([0, 1, 2, 3, 4, 255, 2**31]) | st.integers(0, 2**32 - 1))
        entries.append((tag, kind, count, draw(st.binary(min_size=4, max_size=4))))
    orientation = draw(st.integers(0, 9))
    kind = draw(st.sampled_from([3, 3, 3, 4, 1, 2, 5, 8]))
    value = struct.pack(order + ("I" if kind == 4 else "H"), orientation) if kind in {3, 4, 8} else bytes([orientation])
    entries.insert(draw(st.integers(0, len(entries))), (0x0112, kind, draw(st.sampled_from([1, 1, 1, 0, 2])), value))
    block = tiff(entries, order) + draw(st.binary(max_size=48))
    damage = draw(st.sampled_from(["none"] * 6 + ["ifd_offset", "magic", "cut"]))
    if damage == "ifd_offset":
        block = block[:4] + struct.pack(order + "I", draw(st.integers(0, 2**32 - 1))) + block[8:]
    elif damage == "magic":
        block = b"JUNK" + block[4:]
    elif damage == "cut":
        block = block[:draw(st.integers(0, len(block)))]
    return block


def _base(
    fmt: str, mode: str, size: tuple[int, int], frames: int, progressive: bool, exif: bytes | None, noise: int
) -> bytes:
    # Smoothed noise from a drawn seed: Pillow's effect_noise is not reproducible, and hypothesis
    # needs the same draws to give the same bytes.
    small = (size[0] // 4 + 1, size[1] // 4 + 1)
    grey = Image.frombytes("L", small, random.Random(noise).randbytes(small[0] * small[1])).resize(size)
    image = grey.convert(mode if mode != "CMYK" else "RGB")
    if mode == "CMYK":
        image = image.convert("CMYK")
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", progressive=progressive, quality=75)
        data = buffer.getvalue()
        if exif is not None:
            app1 = b"Exif\x00\x00" + exif[:65000]
            data = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
        return data
    extra = [image.transpose(Image.Transpose.ROTATE_180)] * (frames - 1)
    if fmt == "PNG":
        image.save(buffer, format="PNG", save_all=frames > 1, append_images=extra)
        data = buffer.getvalue()
        return data[:33] + png_chunk(b"eXIf", exif) + data[33:] if exif is not None else data
    image.save(buffer, format="WEBP", save_all=frames > 1, append_images=extra, exif=exif or b"", quality=60)
    return buffer.getvalue()


def _lie(fmt: str, data: bytes, width: int, height: int) -> bytes:
    if fmt == "JPEG":
        return patch_jpeg_size(data, width, height)
    if fmt == "PNG":
        ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
        return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]
    if data[12:16] == b"VP8X":
        return data[:24] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little") + data[30:]
    return data


@st.composite
def uploads(draw: st.DrawFn) -> tuple[str, bytes]:
    """(a short description, the file's bytes)."""
    if draw(st.integers(0, 19)) == 0:
        size = draw(st.integers(16, 16383)), draw(st.integers(16, 16383))
        return f"webp canvas {size}", webp_canvas(*size)
    fmt = draw(st.sampled_from(["JPEG", "PNG", "WEBP"]))
    mode = draw(st.sampled_from(MODES[fmt]))
    if draw(st.integers(0, 24)) == 0:  # now and then a real photo's size, to test memory near the limits
        size = draw(st.integers(2000, 6000)), draw(st.integers(2000, 4500))
    else:
        size = _side(draw, 400, 8), _side(draw, 400, 8)
    frames = draw(st.integers(1, 3)) if fmt != "JPEG" else 1
    progressive = fmt == "JPEG" and draw(st.booleans())
    exif = draw(st.none() | exif_blocks())
    data = _base(fmt, mode, size, frames, progressive, exif, draw(st.integers(0, 2**32 - 1)))
    steps = [f"{fmt} {mode} {size} frames={frames} progressive={progressive} exif={exif is not None}"]
    for change in draw(st.lists(st.sampled_from(["lie", "scans", "cut", "append", "flip"]), max_size=3)):
        if change == "lie":
            width, height = _side(draw, 65535, 6), _side(draw, 65535, 6)
            data = _lie(fmt, data, width, height)
        elif change == "scans":
            if fmt != "JPEG" or b"\xff\xda" not in data or b"\xff\xd9" not in data:
                continue
            scans = draw(st.sampled_from([10, 400, 499, 501, 3000, 30000]))
            data = many_scans(data, scans)
            change = f"scans={scans}"
        elif change == "cut":
            data = data[:draw(st.integers(16, max(16, len(data) - 1)))]
        elif change == "append":
            data += draw(st.sampled_from([b"PK\x03\x04" + b"zip" * 50, b"\xff\xd8\xff\xe0", b"IEND", b""])) + \
                draw(st.binary(max_size=256))
        elif change == "flip":
            raw = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                raw[draw(st.integers(12, max(12, len(raw) - 1))) % len(raw)] = draw(st.integers(0, 255))
            data = bytes(raw)
        steps.append(change)
    return "; ".join(steps), data


def _env() -> dict[str, str]:
    # As tests.conftest.clean_env; not imported from there so a campaign runs without pytest.
    return {k: v for k, v in os.environ.items() if not k.startswith(("LTXBOT_", "DISCORD_"))}


def _record(row: dict[str, Any]) -> None:
    if REPORT:
        with open(REPORT, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _check_usage(usage: DecoderUsage, wall: float) -> None:
    assert wall < LIMITS.timeout_seconds + SLACK_SECONDS, wall
    if usage.ran:
        assert usage.wall_seconds is not None and usage.wall_seconds < LIMITS.timeout_seconds + 1
        if usage.peak_rss_kib is not None:  # None: killed by a limit, which held by construction
            assert usage.peak_rss_kib * 1024 < LIMITS.memory_mib * MIB, usage
            assert usage.cpu_seconds is not None and usage.cpu_seconds < LIMITS.cpu_seconds + 1, usage


@given(case=uploads(), identity=st.booleans())
def _decoder_process(case: tuple[str, bytes], identity: bool) -> None:
    description, data = case
    usage = DecoderUsage()
    with tempfile.TemporaryDirectory() as folder:
        uploads_dir = Path(folder) / "uploads"
        started = time.monotonic()
        outcome = "accepted"
        try:
            result = normalise_image(data, (lambda w, h: (w, h)) if identity else (lambda w, h: (256, 192)),
                                     uploads_dir, max_pixels=40_000_000, min_side=64, limits=LIMITS, usage=usage)
        except IntakeError as error:
            assert error.message.endswith("."), error.message
            outcome = error.code
        else:
            assert_clean_output(result.path, (result.width, result.height), uploads_dir, FUZZ_SECRETS)
        wall = time.monotonic() - started
    _record({"case": description, "bytes": len(data), "outcome": outcome, "wall_s": round(wall, 3),
             "decoder_ran": usage.ran, "peak_rss_kib": usage.peak_rss_kib, "cpu_s": usage.cpu_seconds,
             "decoder_wall_s": usage.wall_seconds, "exit": usage.exit_status})
    _check_usage(usage, wall)


test_fuzzed_uploads_through_the_decoder_process = _campaign(_decoder_process, EXAMPLES)


@given(case=uploads())
def _ltxbot_intake(case: tuple[str, bytes]) -> None:
    _, data = case
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "config.yaml").write_text("data_dir: data\n")
        (root / "upload").write_bytes(data)
        started = time.monotonic()
        command = [sys.executable, "-m", "bot.cli", "intake", "upload", "--width", "256", "--height", "192"]
        proc = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True, timeout=120)
        wall = time.monotonic() - started
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode in {0, 2}, (proc.returncode, proc.stderr)
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout
        payload = json.loads(lines[0])
        assert payload["ok"] is (proc.returncode == 0)
        if payload["ok"]:
            assert_clean_output(Path(payload["path"]), (256, 192), root / "data" / "uploads", FUZZ_SECRETS)
        decoder = payload.get("decoder")
        if decoder is not None and decoder["peak_rss_mib"] is not None:
            assert decoder["peak_rss_mib"] < LIMITS.memory_mib and decoder["cpu_s"] < LIMITS.cpu_seconds + 1, payload
    assert wall < LIMITS.timeout_seconds + 30  # the interpreter's own start-up on a busy CI machine included


test_fuzzed_uploads_through_ltxbot_intake = _campaign(_ltxbot_intake, CLI_EXAMPLES)


def test_png_lie_keeps_a_valid_header_crc() -> None:
    """The fuzzer's lying PNG must be a lie Pillow reads, not a CRC error."""
    buffer = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buffer, format="PNG")
    lied = _lie("PNG", buffer.getvalue(), 5000, 4000)
    assert zlib.crc32(lied[12:29]).to_bytes(4, "big") == lied[29:33]
    with Image.open(io.BytesIO(lied)) as image:
        assert image.size == (5000, 4000)
