"""Intake on a corpus the tests create: every accepted image comes out clean; every bad one is refused kindly."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bot.intake import IntakeError
from bot.intake.image import ImageIntake, confined_path, normalise_image, sniff
from tests.conftest import clean_env, image_bytes
from tests.support.intake_images import png_chunks

TARGET = (256, 192)


def fit(_w: int, _h: int) -> tuple[int, int]:
    return TARGET


def normalise(data: bytes, tmp_path: Path, max_pixels: int = 40_000_000):  # type: ignore[no-untyped-def]
    return normalise_image(data, fit, tmp_path / "uploads", max_pixels=max_pixels, min_side=64)


def exif_jpeg() -> bytes:
    image = Image.new("RGB", (400, 200), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 100, 200))  # left quarter blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 30.0)}  # GPS
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, comment=b"secret comment", quality=95)
    return buffer.getvalue()


def png_with_text_and_icc() -> bytes:
    from PIL import ImageCms, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone private")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 10)).save(buffer, format="PNG", pnginfo=info, icc_profile=icc)
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (200, 200), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    body = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def bomb() -> bytes:
    """A real, valid 20000x20000 greyscale PNG of zeros: a few hundred KB that decodes to 400 MB."""
    row = b"\x00" + b"\x00" * 20000
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(20000)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


VALID = {
    "jpeg": lambda: image_bytes("JPEG", (640, 480)),
    "png": lambda: image_bytes("PNG", (640, 480)),
    "webp": lambda: image_bytes("WEBP", (640, 480)),
    "exif_jpeg": exif_jpeg,
    "png_text_icc": png_with_text_and_icc,
    "cmyk": lambda: image_bytes("JPEG", (300, 300), mode="CMYK"),
    "palette": lambda: image_bytes("PNG", (300, 300), mode="P"),
    "rgba": lambda: image_bytes("PNG", (300, 300), mode="RGBA"),
    "grey_alpha": lambda: image_bytes("PNG", (300, 300), mode="LA"),
    "sixteen_bit": lambda: image_bytes("PNG", (300, 300), mode="I;16"),
    "apng": lambda: animated("PNG"),
    "animated_webp": lambda: animated("WEBP"),
    "png_with_zip_appended": lambda: image_bytes("PNG", (300, 300)) + b"PK\x03\x04" + b"zipdata" * 100,
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_accepted_images_come_out_exact_and_clean(tmp_path: Path, name: str) -> None:
    data = VALID[name]()
    result = normalise(data, tmp_path)
    raw = result.path.read_bytes()
    assert result.path.parent == (tmp_path / "uploads").resolve()
    assert result.path.name == f"{result.sha256}.png"
    with Image.open(result.path) as out:
        assert out.size == TARGET and out.mode == "RGB" and out.format == "PNG"
        assert not out.info.get("icc_profile") and not out.info.get("exif") and not getattr(out, "text", {})
    chunks = png_chunks(raw)
    assert set(chunks) <= {b"IHDR", b"IDAT", b"IEND"}, chunks
    for secret in (b"Exif", b"CameraMaker", b"secret", b"someone private", b"PK\x03\x04", b"GPS"):
        assert secret not in raw
    if name in {"apng", "animated_webp"}:
        assert result.notes == ["animated image: the first frame was used"]
    else:
        assert result.notes == []


def test_exif_orientation_is_applied_to_the_pixels(tmp_path: Path) -> None:
    result = normalise_image(exif_jpeg(), lambda w, h: (w, h), tmp_path, max_pixels=10**7, min_side=64)
    assert (result.width, result.height) == (200, 400)  # the 400x200 image is shown rotated
    with Image.open(result.path) as out:
        top, bottom = out.getpixel((100, 10)), out.getpixel((100, 390))
    # Rotated 90 degrees clockwise for display, the blue left quarter is now at the top.
    assert top[2] > 150 and top[0] < 100
    assert bottom[0] > 150 and bottom[2] < 100


def test_same_input_gives_the_same_file(tmp_path: Path) -> None:
    data = exif_jpeg()
    assert normalise(data, tmp_path).sha256 == normalise(data, tmp_path).sha256


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    image = Image.new("I;16", (128, 128))
    image.putdata([20000] * (128 * 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    result = normalise_image(buffer.getvalue(), lambda w, h: (128, 128), tmp_path, max_pixels=10**7, min_side=64)
    with Image.open(result.path) as out:
        value = out.getpixel((64, 64))[0]
    assert 70 <= value <= 85  # 20000 / 257 = 77.8, not clipped to 255


def _other(fmt: str) -> bytes:
    return image_bytes(fmt, (100, 100))


REJECTED = {
    "gif_named_png": (lambda: _other("GIF"), "unsupported_type", "GIF"),
    "tiff_named_png": (lambda: _other("TIFF"), "unsupported_type", "TIFF"),
    "bmp": (lambda: _other("BMP"), "unsupported_type", "BMP"),
    "svg": (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "unsupported_type", "SVG"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, "unsupported_type", "HEIC"),
    "text": (lambda: b"hello, this is not an image", "unsupported_type", "text"),
    "empty": (lambda: b"", "empty", "empty"),
    "truncated_jpeg": (lambda: image_bytes("JPEG", (640, 480))[:3000], "truncated", "incomplete"),
    # Found by the end-to-end test: Pillow's PNG chunk reader raises struct.error on half a file.
    "half_png": (lambda: (lambda d: d[: len(d) // 2])(image_bytes("PNG", (320, 240))), "truncated", "incomplete"),
    "lying_header": (lambda: png_claiming(100000, 100000), "too_large", "megapixels"),
    "bomb": (bomb, "too_large", "megapixels"),
    "tiny": (lambda: image_bytes("PNG", (20, 20)), "too_small", "64"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejections_have_a_code_and_a_readable_message(tmp_path: Path, name: str) -> None:
    make, code, words = REJECTED[name]
    with pytest.raises(IntakeError) as info:
        normalise(make(), tmp_path)
    assert info.value.code == code
    assert words in info.value.message
    assert info.value.message.endswith(".")
    assert not list((tmp_path / "uploads").glob("*")) if (tmp_path / "uploads").exists() else True


def test_bomb_is_rejected_with_bounded_memory(tmp_path: Path) -> None:
    data = bomb()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (torch-heavy) pytest parent.
    script = (
        "import sys; from pathlib import Path; from bot.intake.image import normalise_image\n"
        "from bot.intake import IntakeError\n"
        "def hwm():\n"
        "    line = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0]\n"
        "    return int(line.split()[1])\n"
        "data = Path(sys.argv[1]).read_bytes()\n"
        "try:\n    normalise_image(data, lambda w, h: (256, 256), Path(sys.argv[2]), max_pixels=40_000_000)\n"
        "except IntakeError as e:\n    print(e.code, hwm())\n"
    )
    (tmp_path / "bomb.png").write_bytes(data)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png"), str(tmp_path / "u")],
                         capture_output=True, text=True, env=clean_env(), timeout=60, check=True).stdout.split()
    assert out[0] == "too_large"
    assert int(out[1]) * 1024 < 300 * 2**20  # peak RSS of the whole process, in bytes


def test_sniff_ignores_names_and_trusts_bytes() -> None:
    assert sniff(image_bytes("WEBP")) == "WEBP"
    with pytest.raises(IntakeError, match="GIF"):
        sniff(image_bytes("GIF"))


def test_paths_are_confined_to_the_uploads_dir(tmp_path: Path) -> None:
    assert confined_path(tmp_path, "abc.png") == (tmp_path / "abc.png").resolve()
    for name in ("../escape.png", "/etc/passwd", "a/../../x.png", "."):
        with pytest.raises(ValueError):
            confined_path(tmp_path, name)


async def test_event_loop_keeps_ticking_while_large_images_are_processed(tmp_path: Path) -> None:
    big = image_bytes("JPEG", (4000, 3000), quality=90)
    intake = ImageIntake(tmp_path / "uploads", max_pixels=40_000_000, min_side=64, threads=2)
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.01)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(intake.normalise(big, lambda w, h: (1024, 768)) for _ in range(10)))
    running = False
    await tick
    intake.close()
    assert all(r.width == 1024 for r in results)
    assert worst < 0.1, f"event loop stalled for {worst * 1000:.0f} ms"


def test_intake_cli_prints_json_and_never_a_traceback(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(exif_jpeg())
    bad = tmp_path / "bad.png"
    bad.write_bytes(image_bytes("GIF"))
    (tmp_path / "config.yaml").write_text("data_dir: data\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot.cli", "intake", *args], cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True, timeout=60)

    ok = run(str(good), "--width", "320", "--height", "192")
    assert ok.returncode == 0, ok.stderr
    payload = json.loads(ok.stdout)
    assert payload["ok"] and (payload["width"], payload["height"]) == (320, 192)
    assert Path(payload["path"]).is_file() and len(payload["sha256"]) == 64
    refused = run(str(bad))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert json.loads(refused.stdout) == {"ok": False, "code": "unsupported_type",
                                          "error": json.loads(refused.stdout)["error"]}
    missing = run(str(tmp_path / "nope.png"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
