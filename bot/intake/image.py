"""Sniff, check, decode, orient, fit and rebuild an uploaded image (docs/DESIGN.md, "Uploads").

The header checks run here, in pure Python; the pixels are decoded by a fresh decoder process
per image (``bot.intake.decoder``) under CPU-time and address-space limits it cannot lift, with a
wall-clock timeout on top. ``ImageIntake`` bounds how many run at once and keeps all of it off
the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import bot
from bot.intake.errors import IntakeError
from bot.intake.headers import ALLOWED_TEXT, MAX_JPEG_SCAN_BLOCKS, MAX_JPEG_SCANS, Header, ImageFormat, read_header

if TYPE_CHECKING:
    from bot.config import Limits

log = logging.getLogger(__name__)

TargetSize = Callable[[int, int], tuple[int, int]]
ALLOWED_FORMATS: tuple[ImageFormat, ...] = ("JPEG", "PNG", "WEBP")
ANIMATED_NOTE = "animated image: the first frame was used"
# The largest output side asked of the decoder (the model's largest size is well below it).
MAX_OUTPUT_SIDE = 4096
# The decoder process before it holds an image: the interpreter and Pillow (about 27 MiB of address
# space, measured) with room to spare; the estimate adds it to what decoding the image will need.
DECODER_BASELINE_BYTES = 48 * 2**20


@dataclass(frozen=True)
class DecodeLimits:
    """Per image, for the decoder process: address space, CPU time, and wall time until it is killed.

    The defaults are ``limits.decode_*`` in the config; the address-space cap also caps peak RSS.
    """

    memory_mib: int = 300
    cpu_seconds: int = 10
    timeout_seconds: float = 20.0

    @classmethod
    def of(cls, limits: Limits) -> DecodeLimits:
        return cls(limits.decode_memory_mib, limits.decode_cpu_seconds, limits.decode_timeout_seconds)


@dataclass
class DecoderUsage:
    """What the decoder process used for one image (filled in by ``normalise_image`` when asked)."""

    ran: bool = False
    peak_rss_kib: int | None = None  # the process's own VmHWM; None when it was killed
    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    exit_status: int | None = None


@dataclass(frozen=True)
class NormalisedImage:
    path: Path
    width: int
    height: int
    sha256: str
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
    limits: DecodeLimits | None = None,
    usage: DecoderUsage | None = None,
) -> NormalisedImage:
    """Check ``data``'s header, decode it in a limited process, fit it to the target size, save a clean PNG.

    ``target(width, height)`` gets the oriented source size and returns the output size; it runs
    here, in the caller's process (``SizedRequest`` keeps the request it builds), between the header
    checks and the decode. The file is named by the sha256 of its bytes, under ``uploads_dir``.
    """
    limits = limits or DecodeLimits()
    fmt = sniff(data)
    header = read_header(data, fmt)
    source_w, source_h = header.oriented_size
    if min(source_w, source_h) < min_side:
        raise IntakeError(
            "too_small", f"That image is {source_w}x{source_h}; each side needs at least {min_side} pixels."
        )
    if source_w * source_h > max_pixels:
        raise IntakeError("too_large", _too_large_text(max_pixels))
    if header.data_problem is not None:
        raise header.data_problem
    _check_scans(header)
    out_w, out_h = target(source_w, source_h)
    if not (1 <= out_w <= MAX_OUTPUT_SIDE and 1 <= out_h <= MAX_OUTPUT_SIDE):
        raise IntakeError(
            "invalid_request", f"The output size must be 1 to {MAX_OUTPUT_SIDE} pixels a side; got {out_w}x{out_h}."
        )
    needed = DECODER_BASELINE_BYTES + 2 * len(header.pixels) + header.decode_bytes(header.stored_target(out_w, out_h))
    if needed > limits.memory_mib * 2**20:
        raise IntakeError("too_large", _too_much_memory_text(header, needed, limits))
    payload = _decode_in_child(header, (out_w, out_h), max_pixels, limits, usage or DecoderUsage())
    digest = hashlib.sha256(payload).hexdigest()
    path = _write_confined(uploads_dir, f"{digest}.png", payload)
    notes = ([ANIMATED_NOTE] if header.frames > 1 else []) + list(header.notes)
    return NormalisedImage(path, out_w, out_h, digest, notes)


def _check_scans(header: Header) -> None:
    if header.jpeg_scans > MAX_JPEG_SCANS:
        raise IntakeError(
            "too_large",
            f"That JPEG is made of more than {MAX_JPEG_SCANS} progressive scans, more than this bot decodes; "
            "please save it again as an ordinary JPEG.",
        )
    if header.jpeg_scans * header.jpeg_blocks > MAX_JPEG_SCAN_BLOCKS:
        raise IntakeError(
            "too_large",
            f"That JPEG has {header.jpeg_scans} progressive scans over {header.width}x{header.height} pixels, "
            "too many to decode in time; please save it again as an ordinary JPEG.",
        )


def _too_large_text(max_pixels: int) -> str:
    return (
        f"That image has too many pixels (the limit is {max_pixels / 1e6:.0f} megapixels); "
        "please upload a smaller one."
    )


def _too_much_memory_text(header: Header, needed: int, limits: DecodeLimits) -> str:
    kind = {"JPEG": "progressive JPEG" if header.fixed_bytes else "JPEG", "PNG": "PNG", "WEBP": "WebP"}[header.fmt]
    what = "canvas" if header.fmt == "WEBP" else "image"
    return (
        f"That {kind}'s {what} is {header.width}x{header.height}; decoding it would need about "
        f"{needed / 2**20:.0f} MiB, over this bot's {limits.memory_mib} MiB for one image. "
        "Please upload a smaller one (or save it as an ordinary JPEG)."
    )


def _decode_in_child(
    header: Header, target: tuple[int, int], max_pixels: int, limits: DecodeLimits, usage: DecoderUsage
) -> bytes:
    """Run ``bot.intake.decoder`` on the header's pixel bytes; its answer, or an IntakeError that says why.

    One fresh process per image, so the CPU limit and the peak are per image and nothing one image
    did to a process (its heap, a decoder's state) can reach the next; ``ImageIntake`` bounds how
    many run at once. Its environment carries only what Python needs: no token reaches it.
    """
    request = {
        "fmt": header.fmt, "width": header.width, "height": header.height, "orientation": header.orientation,
        "target": list(target), "max_pixels": max_pixels,
    }
    command = [sys.executable, "-m", "bot.intake.decoder", str(limits.memory_mib), str(limits.cpu_seconds)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(Path(bot.__file__).resolve().parents[1])}
    fmt = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP"}[header.fmt]
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, env=env)
        except OSError as exc:
            raise RuntimeError(f"the image decoder could not be started ({exc.strerror})") from None
        try:
            out, _ = proc.communicate(json.dumps(request).encode() + b"\n" + header.pixels, limits.timeout_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate()
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - 300))
        stderr_tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
    usage.ran = True
    usage.wall_seconds = round(time.monotonic() - started, 3)
    usage.exit_status = proc.returncode
    too_long = (
        f"That image takes too long to decode (over {limits.cpu_seconds} s of processor time); "
        "please upload a smaller or simpler one."
    )
    if timed_out:
        raise IntakeError("too_large", f"That image took longer than {limits.timeout_seconds:g} s to decode; "
                                       "please upload a smaller or simpler one.")
    if proc.returncode in {-signal.SIGXCPU, -signal.SIGKILL}:
        raise IntakeError("too_large", too_long if proc.returncode == -signal.SIGXCPU else
                          f"That image needs more time or memory than this bot allows for one image "
                          f"({limits.memory_mib} MiB); please upload a smaller one.")
    line, _, rest = out.partition(b"\n")
    try:
        reply = json.loads(line)
        ok, code, why = bool(reply["ok"]), str(reply.get("code", "")), str(reply.get("why", ""))
        usage.peak_rss_kib, usage.cpu_seconds = int(reply["peak_kib"]), float(reply["cpu_s"])
        png = rest[:int(reply["png_bytes"])]
    except (ValueError, KeyError, TypeError):
        log.warning("image decoder ended with status %s and no answer: %s", proc.returncode, stderr_tail)
        raise IntakeError("corrupt", f"That {fmt} file crashed the image decoder, so it can't be used. "
                                     f"{ALLOWED_TEXT}") from None
    if ok and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) == int(reply["png_bytes"]):
        return png
    if ok:
        raise IntakeError("corrupt", f"That {fmt} file could not be decoded completely. {ALLOWED_TEXT}")
    if code == "too_large":
        message = {
            "pixels": _too_large_text(max_pixels),
            "cpu": too_long,
        }.get(why, f"That image needs more memory to decode than this bot allows for one image "
                   f"({limits.memory_mib} MiB); please upload a smaller one.")
        raise IntakeError("too_large", message)
    if why == "header":
        raise IntakeError("corrupt", f"That {fmt} file is damaged (its header disagrees with its image data) "
                                     f"and can't be read. {ALLOWED_TEXT}")
    if reply.get("detail"):
        log.info("image decoder refused a %s file: %s", fmt, reply["detail"])
    raise IntakeError("truncated" if code == "truncated" else "corrupt",
                      f"That {fmt} file is incomplete or damaged; try uploading it again.")


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
    """``root / name`` after checking it cannot escape ``root`` (docs/DESIGN.md, "Uploads")."""
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
    """Runs ``normalise_image`` off the event loop: at most ``threads`` decoder processes at once.

    ``normalise`` is the bot's last resort: it raises nothing but IntakeError, so one upload can
    cost its requester a private, specific reply and nothing more.
    """

    def __init__(
        self, uploads_dir: Path, *, max_pixels: int, min_side: int, threads: int = 2,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.uploads_dir = uploads_dir
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.limits = limits or DecodeLimits()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="intake")
        self._slots = asyncio.Semaphore(threads)

    async def normalise(self, data: bytes, target: TargetSize) -> NormalisedImage:
        async with self._slots:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._pool,
                    lambda: normalise_image(
                        data, target, self.uploads_dir, max_pixels=self.max_pixels, min_side=self.min_side,
                        limits=self.limits,
                    ),
                )
            except IntakeError:
                raise
            except Exception:
                error_id = secrets.token_hex(4)
                log.exception("image intake failed unexpectedly (error id %s)", error_id)
                raise IntakeError(
                    "corrupt",
                    f"Something went wrong while reading that image (error id {error_id}); "
                    "please try again, or send it as a PNG or JPEG.",
                ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
