"""Hostile and unusual image files for the intake tests, built byte by byte where Pillow would refuse to."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

# TIFF field types and their sizes.
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
ORIENTATION, X_RESOLUTION, RESOLUTION_UNIT = 0x0112, 0x011A, 0x0128
PNG_ALLOWED_CHUNKS = {b"IHDR", b"IDAT", b"IEND"}
SECRETS = (b"Exif", b"CameraMaker", b"secret", b"someone private", b"PK\x03\x04", b"GPS", b"Raw profile")


def tiff(entries: list[tuple[int, int, int, bytes]], order: str = "<", ifd_offset: int = 8) -> bytes:
    """A TIFF block whose IFD0 holds ``(tag, type, count, value-or-offset)`` entries exactly as given."""
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, ifd_offset)
    body = head + b"\x00" * max(0, ifd_offset - len(head))
    body += struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(order + "HHI", tag, kind, count) + value[:4].ljust(4, b"\x00")
    return body + b"\x00\x00\x00\x00"


def short(value: int, order: str = "<") -> bytes:
    return struct.pack(order + "H", value)


def orientation_with_ascii_resolution(orientation: int = 6) -> bytes:
    """The issue's minimal case: Orientation 6 with XResolution stored as the ASCII string "72"."""
    return tiff([(ORIENTATION, 3, 1, short(orientation)), (X_RESOLUTION, 2, 3, b"72\x00")])


def halves(size: tuple[int, int] = (400, 200)) -> Image.Image:
    """Red with a blue left quarter: rotation mistakes show in where the blue ends up."""
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 4, size[1]))
    return image


def with_exif(fmt: str, exif: bytes, image: Image.Image | None = None) -> bytes:
    """``image`` saved as ``fmt`` with ``exif`` (a TIFF block) written verbatim where the format keeps it."""
    image = image or halves()
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        app1 = b"Exif\x00\x00" + exif
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    if fmt == "PNG":
        image.save(buffer, format="PNG")
        return insert_png_chunk(buffer.getvalue(), b"eXIf", exif)
    image.save(buffer, format="WEBP", exif=exif, lossless=True)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def insert_png_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """``data`` with one chunk added right after IHDR."""
    return data[:33] + png_chunk(kind, body) + data[33:]


def png_with_bad_raw_profile() -> bytes:
    buffer = io.BytesIO()
    halves().save(buffer, format="PNG")
    text = b"Raw profile type exif\x00" + b"\nexif\n      40\nnot hex at all, zz\n"
    data = insert_png_chunk(buffer.getvalue(), b"tEXt", text)
    # And a zTXt with an unknown compression method, which made Pillow refuse the file outright.
    return insert_png_chunk(data, b"zTXt", b"Raw profile type exif\x00\x01" + b"\x78\x9cnot deflate")


def jpeg_with_short_segments() -> bytes:
    """A JPEG with a JFIF and an Adobe segment too short for the fields Pillow reads from them."""
    buffer = io.BytesIO()
    halves().save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    segments = b"\xff\xe0\x00\x07JFIF\x00" + b"\xff\xee\x00\x07Adobe"
    return data[:2] + segments + data[2:]


def one_pixel_wide_png(height: int = 40_000_000) -> bytes:
    """A valid 1 x ``height`` RGB PNG of black rows (about 160 KB)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * 4 * 1_000_000
    body = b"".join(compressor.compress(row) for _ in range(height // 1_000_000)) + compressor.flush()
    return png_claiming(1, height, body=body)


def png_claiming(width: int, height: int, colour: int = 2, body: bytes | None = None) -> bytes:
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    data = body if body is not None else zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg(size: tuple[int, int] = (256, 256), *, progressive: bool = False, noise: bool = True, **save: object) -> bytes:
    image = Image.effect_noise(size, 40).convert("RGB") if noise else halves(size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", progressive=progressive, quality=80, **save)  # type: ignore[arg-type]
    return buffer.getvalue()


def patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its frame header claiming ``width`` x ``height`` (unchanged if it has none)."""
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in {0xC4, 0xC8, 0xCC}:
            return data[:pos + 5] + struct.pack(">HH", height, width) + data[pos + 9:]
        pos += 2 + length
    return data


def many_scans(data: bytes, scans: int) -> bytes:
    """A progressive JPEG with ``scans`` extra empty AC scans of its first component before EOI.

    Every scan makes libjpeg walk every block of its component, so the cost is scans x blocks.
    """
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, data[data.index(b"\xff\xda") + 5], 0x00, 1, 63, 0x00])
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + sos * scans + data[eoi:]


def webp_canvas(width: int, height: int, frame: int = 16) -> bytes:
    """An animated WebP: a ``width`` x ``height`` canvas around one ``frame`` x ``frame`` lossless frame."""
    buffer = io.BytesIO()
    Image.new("RGB", (frame, frame), (10, 200, 10)).save(buffer, format="WEBP", lossless=True)
    small = buffer.getvalue()
    vp8l = small[12:]  # the VP8L chunk, header and payload
    vp8x = b"VP8X" + (10).to_bytes(4, "little") + bytes([0x02, 0, 0, 0]) + \
        (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    anim = b"ANIM" + (6).to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"\x00\x00"
    anmf_body = b"\x00" * 6 + (frame - 1).to_bytes(3, "little") + (frame - 1).to_bytes(3, "little") + \
        (100).to_bytes(3, "little") + b"\x00" + vp8l
    anmf = b"ANMF" + len(anmf_body).to_bytes(4, "little") + anmf_body + (b"\x00" if len(anmf_body) & 1 else b"")
    body = b"WEBP" + vp8x + anim + anmf
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def png_chunks(raw: bytes) -> list[bytes]:
    """The chunk types of a PNG; fails on trailing bytes after the last chunk."""
    chunks = []
    position = 8
    while position < len(raw):
        length = int.from_bytes(raw[position:position + 4], "big")
        chunks.append(raw[position + 4:position + 8])
        position += 12 + length
    assert position == len(raw), "trailing bytes after IEND"
    return chunks


def assert_clean_output(path: Path, size: tuple[int, int], uploads: Path, secrets: tuple[bytes, ...] = SECRETS) -> None:
    """The byte-level promises for an accepted image: exact size, content-addressed, no metadata byte.

    ``secrets`` are strings the inputs carry; a random image's compressed pixels hold a given
    three bytes by chance roughly once in 150 outputs, so fuzzed inputs pass longer ones.
    """
    import hashlib

    raw = path.read_bytes()
    assert path.parent == uploads.resolve()
    assert path.name == f"{hashlib.sha256(raw).hexdigest()}.png"
    with Image.open(path) as out:
        assert out.size == size and out.mode == "RGB" and out.format == "PNG"
        assert not out.info.get("icc_profile") and not out.info.get("exif") and not getattr(out, "text", {})
    assert set(png_chunks(raw)) <= PNG_ALLOWED_CHUNKS
    for secret in secrets:
        assert secret not in raw, secret
