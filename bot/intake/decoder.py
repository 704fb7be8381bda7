"""The decoder process: one image, decoded under hard CPU and address-space limits, back as a clean PNG.

Run as ``python -m bot.intake.decoder MEMORY_MIB CPU_SECONDS``; ``bot.intake.image`` starts one per
image and reads its answer. The limits are set before a byte of input is read, with the hard
limits lowered too, so no input can lift them. Whatever happens, the answer is one JSON line on
stdout, followed by the PNG's bytes when it succeeded; a process killed by its limits tells the
parent by its exit status (docs/DESIGN.md, "Uploads").

Request on stdin: one JSON line ``{"fmt", "width", "height", "orientation", "target", "max_pixels"}``
(width and height as the file stores them, target as displayed), then the image bytes.
"""

from __future__ import annotations

import io
import json
import math
import resource
import signal
import struct
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

from bot.intake.headers import TRANSPOSING_ORIENTATIONS, fit_box, reduce_factor

NEUTRAL_BACKGROUND = (128, 128, 128)
# Rows are converted and reduced a strip at a time, so no full-size converted copy ever exists.
STRIP_PIXELS = 1 << 20
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _CpuExhausted(Exception):
    pass


def _on_cpu_limit(_signum: int, _frame: object) -> NoReturn:
    # SIGXCPU at the soft limit; the hard limit, a second later, kills outright if this cannot run.
    raise _CpuExhausted


def limit(memory_mib: int, cpu_seconds: int) -> None:
    """Hard limits for the rest of this process's life; soft and hard lowered together."""
    memory = memory_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it writes no file, only its stdout pipe
    signal.signal(signal.SIGXCPU, _on_cpu_limit)


def peak_kib() -> int:
    """This process's own peak resident set (VmHWM): unlike ru_maxrss it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def render(data: bytes, request: dict[str, Any]) -> bytes:
    """Decode the first frame, fit it to ``request["target"]``, orient it, and return PNG bytes."""
    fmt = request["fmt"]
    orientation = int(request["orientation"])
    target_w, target_h = (int(v) for v in request["target"])
    stored = (target_h, target_w) if orientation in TRANSPOSING_ORIENTATIONS else (target_w, target_h)
    Image.MAX_IMAGE_PIXELS = int(request["max_pixels"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise Refusal("too_large", "pixels") from None
    del data
    with image:
        if image.size != (request["width"], request["height"]):
            raise Refusal("corrupt", "header")
        if fmt == "JPEG":
            # JPEG decodes straight to 1/2, 1/4 or 1/8 of its size: less memory and time.
            image.draft("RGB", stored)
        image.load()
        fitted = _fit(image, stored)
    if orientation in _TRANSPOSE:
        fitted = fitted.transpose(_TRANSPOSE[orientation])
    if fitted.mode == "RGBA":
        background = Image.new("RGBA", fitted.size, (*NEUTRAL_BACKGROUND, 255))
        fitted = Image.alpha_composite(background, fitted)
    rgb = fitted.convert("RGB")
    # Rebuilt from raw pixels: re-saving alone keeps ICC profiles and comments.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _working_mode(image: Image.Image) -> str:
    mode = image.mode
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info):
        return "RGBA"
    if mode in {"1", "L"} or mode.startswith("I"):
        return "L"
    return "RGB"


def _to_working(image: Image.Image, mode: str) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        return image.convert("I").point(lambda v: v / 257).convert("L")
    return image if image.mode == mode else image.convert(mode)


def _fit(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Centre-crop to the target's aspect and resize (as ``ImageOps.fit``), reducing strip by strip first.

    The reduction is an integer box filter to at least REDUCING_GAP times the target; converting
    each strip to the working mode only then keeps a palette or 16-bit image from ever existing
    as a full-size RGB copy.
    """
    mode = _working_mode(image)
    box = fit_box(image.size, target)
    factor = reduce_factor(box, target)
    if factor == 1:
        return _to_working(image, mode).resize(target, Image.Resampling.LANCZOS, box=box)
    left, top = math.floor(box[0]), math.floor(box[1])
    right, bottom = math.ceil(box[2]), math.ceil(box[3])
    reduced = Image.new(mode, (-(-(right - left) // factor), -(-(bottom - top) // factor)))
    rows = factor * max(1, STRIP_PIXELS // ((right - left) * factor))
    for y in range(top, bottom, rows):
        strip = image.crop((left, y, right, min(y + rows, bottom)))
        reduced.paste(_to_working(strip, mode).reduce(factor), (0, (y - top) // factor))
    image.close()  # the full-size pixels go before the last resize allocates
    inner = ((box[0] - left) / factor, (box[1] - top) / factor, (box[2] - left) / factor, (box[3] - top) / factor)
    return reduced.resize(target, Image.Resampling.LANCZOS, box=inner)


def _classify(exc: BaseException) -> tuple[str, str]:
    message = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in message:
        return "too_large", "memory"
    if "truncat" in message or isinstance(exc, struct.error | EOFError):
        return "truncated", "truncated"
    return "corrupt", "corrupt"


def main(argv: list[str]) -> int:
    limit(int(argv[0]), int(argv[1]))
    started = time.process_time()
    reply: dict[str, Any]
    payload = b""
    try:
        stdin = sys.stdin.buffer
        request = json.loads(stdin.readline())
        payload = render(stdin.read(), request)
        reply = {"ok": True}
    except Refusal as refusal:
        reply = {"ok": False, "code": refusal.code, "why": refusal.message}
    except _CpuExhausted:
        reply = {"ok": False, "code": "too_large", "why": "cpu"}
    except Exception as exc:
        code, why = _classify(exc)
        reply = {"ok": False, "code": code, "why": why, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    reply.update(peak_kib=peak_kib(), cpu_s=round(usage.ru_utime + usage.ru_stime, 3), png_bytes=len(payload),
                 decode_cpu_s=round(time.process_time() - started, 3))
    out = sys.stdout.buffer
    out.write(json.dumps(reply).encode() + b"\n" + payload)
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
