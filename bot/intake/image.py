"""Sniff, decode, orient, fit and rebuild an uploaded image (DESIGN lessons 7 and 9).

Everything here is synchronous and CPU-bound; ``ImageIntake`` runs it in a bounded
thread pool so the event loop keeps answering Discord.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

from bot.intake.errors import IntakeError

ImageFormat = Literal["JPEG", "PNG", "WEBP"]
TargetSize = Callable[[int, int], tuple[int, int]]
ALLOWED_FORMATS: tuple[ImageFormat, ...] = ("JPEG", "PNG", "WEBP")
ALLOWED_TEXT = "Please upload a JPEG, PNG or WebP image."
NEUTRAL_BACKGROUND = (128, 128, 128)
# What Pillow's decoders raise on damaged input (a half PNG fails in its chunk reader with struct.error).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# EXIF orientations 5 to 8 swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class NormalisedImage:
    path: Path
    width: int
    height: int
    sha256: str
    source_width: int
    source_height: int
    notes: list[str] = field(default_factory=list)


def sniff(data: bytes) -> ImageFormat:
    """The image type from its first bytes; names and declared content types are not trusted."""
    if not data:
        raise IntakeError("empty", f"That file is empty. {ALLOWED_TEXT}")
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise IntakeError("unsupported_type", f"That file is {_describe_other(data)}. {ALLOWED_TEXT}")


def _describe_other(data: bytes) -> str:
    head = data[:512]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF image"
    if head.startswith(b"BM"):
        return "a BMP image"
    if head[4:12] in {b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"}:
        return "a HEIC photo (try exporting it as JPEG)"
    if head[4:12] == b"ftypavif":
        return "an AVIF image"
    if b"<svg" in head.lower():
        return "an SVG drawing"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image we can read"
    return "text, not an image"


def normalise_image(
    data: bytes,
    target: TargetSize,
    uploads_dir: Path,
    *,
    max_pixels: int,
    min_side: int = 64,
) -> NormalisedImage:
    """Decode ``data`` under guards, apply EXIF orientation, fit to the target size, save a clean PNG.

    ``target(width, height)`` gets the oriented source size and returns the output size.
    The file is named by the sha256 of its bytes, under ``uploads_dir``.
    """
    fmt = sniff(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        raise IntakeError("too_large", _too_large_text(max_pixels)) from None
    except DECODE_ERRORS as exc:
        raise IntakeError("corrupt", f"That {fmt} file is damaged and can't be read. {ALLOWED_TEXT}") from exc
    try:
        clean, notes, (source_w, source_h), (out_w, out_h) = _decode(image, fmt, target, max_pixels, min_side)
    except Image.DecompressionBombError:
        raise IntakeError("too_large", _too_large_text(max_pixels)) from None
    except DECODE_ERRORS as exc:
        message = str(exc).lower()
        code: Literal["truncated", "corrupt"] = "truncated" if "truncat" in message or isinstance(
            exc, struct.error | EOFError) else "corrupt"
        raise IntakeError(code, f"That {fmt} file is incomplete or damaged; try uploading it again.") from exc
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=6)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    path = _write_confined(uploads_dir, f"{digest}.png", payload)
    return NormalisedImage(path, out_w, out_h, digest, source_w, source_h, notes)


def _decode(
    image: Image.Image, fmt: ImageFormat, target: TargetSize, max_pixels: int, min_side: int
) -> tuple[Image.Image, list[str], tuple[int, int], tuple[int, int]]:
    notes: list[str] = []
    with image:
        # The header's claimed size is checked before any pixel is decoded: a
        # decompression bomb or a lying header never gets to allocate.
        if image.width * image.height > max_pixels:
            raise IntakeError("too_large", _too_large_text(max_pixels))
        if getattr(image, "n_frames", 1) > 1:
            notes.append("animated image: the first frame was used")
        orientation = image.getexif().get(0x0112, 1)
        source_w, source_h = image.size
        if orientation in _TRANSPOSING_ORIENTATIONS:
            source_w, source_h = source_h, source_w
        if min(source_w, source_h) < min_side:
            raise IntakeError(
                "too_small", f"That image is {source_w}x{source_h}; each side needs at least {min_side} pixels."
            )
        out_w, out_h = target(source_w, source_h)
        if fmt == "JPEG":
            # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: less memory and time.
            request = (out_h, out_w) if orientation in _TRANSPOSING_ORIENTATIONS else (out_w, out_h)
            image.draft("RGB", request)
        image.load()
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented)
        fitted = ImageOps.fit(rgb, (out_w, out_h), Image.Resampling.LANCZOS)
        # Rebuilt from raw pixels: re-saving alone keeps ICC profiles and comments.
        clean = Image.frombytes("RGB", fitted.size, fitted.tobytes())
    return clean, notes, (source_w, source_h), (out_w, out_h)


def _too_large_text(max_pixels: int) -> str:
    return (
        f"That image has too many pixels (the limit is {max_pixels / 1e6:.0f} megapixels); "
        "please upload a smaller one."
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        image = image.convert("I").point(lambda v: v / 257).convert("L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*NEUTRAL_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_local_image(path: Path, max_bytes: int) -> bytes:
    """A file from the owner's disk (``ltxbot intake``/``animate``), under the same byte limit as uploads."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise IntakeError("too_many_bytes", f"That file is larger than {max_bytes / 2**20:.0f} MiB.")
        with path.open("rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as exc:
        raise IntakeError("download_failed", f"That file could not be read ({exc.strerror}).") from None


def confined_path(root: Path, name: str) -> Path:
    """``root / name`` after checking it cannot escape ``root`` (DESIGN lesson 9)."""
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise ValueError(f"refusing a path outside {base.name}/")
    return path


def _write_confined(root: Path, name: str, payload: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = confined_path(root, name)
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ImageIntake:
    """Runs ``normalise_image`` off the event loop with bounded concurrency."""

    def __init__(self, uploads_dir: Path, *, max_pixels: int, min_side: int, threads: int = 2) -> None:
        self.uploads_dir = uploads_dir
        self.max_pixels = max_pixels
        self.min_side = min_side
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="intake")
        self._slots = asyncio.Semaphore(threads)

    async def normalise(self, data: bytes, target: TargetSize) -> NormalisedImage:
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool,
                lambda: normalise_image(
                    data, target, self.uploads_dir, max_pixels=self.max_pixels, min_side=self.min_side
                ),
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
