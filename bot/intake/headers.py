"""What an upload's header bytes say, read without decoding a pixel: size, frames, orientation, cost.

Pure Python over bytes, with every loop bounded by the input's length, so it is safe to run in the
bot's own process. It also rebuilds the file keeping only what the pixel decoder needs (for PNG and
JPEG), so no metadata parser of Pillow's ever runs on a stranger's bytes: broken metadata can
never cost a good image (docs/DESIGN.md, "Uploads").
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Literal

from bot.intake.errors import IntakeError

ImageFormat = Literal["JPEG", "PNG", "WEBP"]
ALLOWED_TEXT = "Please upload a JPEG, PNG or WebP image."
# EXIF orientations 5 to 8 swap width and height.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# The most scans a progressive JPEG may have (libjpeg-turbo's own fuzzers stop at 500), and the
# most block visits all its scans may add up to: every scan walks every block of its components,
# so a file of many empty scans costs CPU time in proportion to scans x blocks (about 13 ns each).
MAX_JPEG_SCANS = 500
MAX_JPEG_SCAN_BLOCKS = 300_000_000
# Header segments or chunks before the image data; real files have a few dozen.
MAX_SEGMENTS = 10_000
# Deflate cannot expand beyond 1032:1, and every Huffman-coded JPEG block costs at least one bit.
DEFLATE_MAX_RATIO = 1032
# The largest text chunk inflated to look for EXIF in a PNG.
MAX_TEXT_BYTES = 1 << 20
NOTE_UNREADABLE_ORIENTATION = "its rotation tag could not be read, so it is used as stored"

_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Kept when a JPEG is rebuilt for the decoder: tables, frame header, and Adobe's colour-transform flag.
_JPEG_KEPT = frozenset({0xDB, 0xC4, 0xDD, 0xCC, 0xEE}) | _SOF_MARKERS
# A marker in entropy-coded data: 0xFF, not a stuffed zero, not a restart marker (fill bytes skipped).
_JPEG_MARKER = re.compile(rb"\xff+([\x01-\xcf\xd8-\xfe])")
# Kept when a PNG is rebuilt: what decides the first frame's pixels.
_PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}


@dataclass(frozen=True)
class Header:
    """The stored (not yet oriented) geometry of the first frame, and what decoding it will cost."""

    fmt: ImageFormat
    width: int
    height: int
    frames: int
    orientation: int
    # What the decoder gets: the input without metadata and trailing bytes (WebP: unchanged).
    pixels: bytes = field(repr=False)
    # Bytes per decoded pixel held while decoding (Pillow's image plus the decoder's own buffers).
    bytes_per_pixel: int = 4
    # Memory the decoder needs whatever the output size (a progressive JPEG's coefficients).
    fixed_bytes: int = 0
    # Whether fitting it makes a full copy even when nothing is reduced: a mode conversion (palette,
    # 16-bit, CMYK, 1-bit) or a premultiplied copy for resampling with alpha.
    copies: bool = True
    notes: tuple[str, ...] = ()
    jpeg_scans: int = 0
    jpeg_blocks: int = 0
    # Set when the file holds far too little data for its claimed size (raised after the size checks,
    # so an image that is simply too large hears that first).
    data_problem: IntakeError | None = None

    @property
    def oriented_size(self) -> tuple[int, int]:
        if self.orientation in TRANSPOSING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height

    def stored_target(self, width: int, height: int) -> tuple[int, int]:
        """An output size as displayed, turned back into the file's stored orientation."""
        return (height, width) if self.orientation in TRANSPOSING_ORIENTATIONS else (width, height)

    def decoded_size(self, stored_target: tuple[int, int]) -> tuple[int, int]:
        """The size the decoder produces: JPEG decodes straight to 1/2, 1/4 or 1/8 (``Image.draft``)."""
        if self.fmt != "JPEG":
            return self.width, self.height
        scale = jpeg_draft_scale((self.width, self.height), stored_target)
        return -(-self.width // scale), -(-self.height // scale)

    def decode_bytes(self, stored_target: tuple[int, int]) -> int:
        """A high estimate of the decoding process's peak, beyond the interpreter and the input bytes."""
        width, height = self.decoded_size(stored_target)
        box = fit_box((width, height), stored_target)
        factor = reduce_factor(box, stored_target)
        decoded = width * height
        # The reduced working copy is 4 bytes a pixel; with no reduction, a full-size copy if any.
        area = math.ceil(box[2] - box[0]) * math.ceil(box[3] - box[1])
        working = 4 * area // (factor * factor) if factor > 1 or self.copies else 0
        output = 16 * stored_target[0] * stored_target[1]
        return decoded * self.bytes_per_pixel + working + output + self.fixed_bytes


def jpeg_draft_scale(size: tuple[int, int], request: tuple[int, int]) -> int:
    """The DCT scale Pillow's ``JpegImageFile.draft`` picks for ``request`` (the same arithmetic)."""
    scale = min(size[0] // max(request[0], 1), size[1] // max(request[1], 1))
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


# The reduced image stays at least this many times the target, so LANCZOS still has the detail
# (Pillow's own ``reducing_gap`` idea; 2 is what its ``thumbnail`` uses).
REDUCING_GAP = 2.0


def fit_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred crop of ``size`` with the target's aspect ratio (what ``ImageOps.fit`` takes)."""
    width, height = size
    tw, th = target
    if width * th > height * tw:
        crop_w, crop_h = height * tw / th, float(height)
    else:
        crop_w, crop_h = float(width), width * th / tw
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def reduce_factor(box: tuple[float, float, float, float], target: tuple[int, int]) -> int:
    """The integer box-filter reduction that keeps the crop at least REDUCING_GAP times the target."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    return max(1, int(min(crop_w / (target[0] * REDUCING_GAP), crop_h / (target[1] * REDUCING_GAP))))


def read_header(data: bytes, fmt: ImageFormat) -> Header:
    """Parse ``data`` (already sniffed as ``fmt``); a header that cannot be read raises IntakeError."""
    try:
        if fmt == "JPEG":
            return _jpeg(data)
        if fmt == "PNG":
            return _png(data)
        return _webp(data)
    except (struct.error, IndexError, ValueError) as exc:
        # A field cut off mid-way: the parsers check lengths, this is the net under them.
        raise IntakeError("truncated", f"That {fmt} file is incomplete or damaged; try uploading it again.") from exc


def _damaged(fmt: str, why: str) -> IntakeError:
    return IntakeError("corrupt", f"That {fmt} file is damaged ({why}) and can't be read. {ALLOWED_TEXT}")


def _too_little(fmt: str, width: int, height: int, *, complete: bool) -> IntakeError:
    if not complete:
        return _truncated(fmt)
    return _damaged(fmt, f"it says it is {width}x{height} but holds far too little image data for that")


def _truncated(fmt: str) -> IntakeError:
    return IntakeError("truncated", f"That {fmt} file is incomplete or damaged; try uploading it again.")


# --- JPEG -------------------------------------------------------------------------------------


def _jpeg(data: bytes) -> Header:
    n = len(data)
    pos = 2
    kept = [b"\xff\xd8"]
    exif: bytes | None = None
    sof: tuple[int, bytes] | None = None
    segments = 0
    while True:
        pos = data.find(b"\xff", pos)  # bytes between segments are skipped, as Pillow and libjpeg do
        if pos < 0 or pos + 1 >= n:
            raise _truncated("JPEG")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        if marker == 0xD9:
            raise _damaged("JPEG", "it ends before any image data")
        if pos + 4 > n:
            raise _truncated("JPEG")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2:
            raise _damaged("JPEG", "a header segment has an impossible length")
        if end > n:
            raise _truncated("JPEG")
        body = data[pos + 4:end]
        if marker == 0xDA:
            break
        segments += 1
        if segments > MAX_SEGMENTS:
            raise _damaged("JPEG", f"more than {MAX_SEGMENTS} header segments")
        if marker in _SOF_MARKERS:
            if sof is not None:
                raise _damaged("JPEG", "it has two frame headers")
            sof = (marker, body)
        if marker == 0xE1 and exif is None and body.startswith(b"Exif\x00\x00"):
            exif = body[6:]
        if marker in _JPEG_KEPT and (marker != 0xEE or (body.startswith(b"Adobe") and len(body) >= 12)):
            kept.append(data[pos:end])
        pos = end
    if sof is None:
        raise _damaged("JPEG", "it has no frame header")
    marker, body = sof
    if len(body) < 6:
        raise _damaged("JPEG", "its frame header is too short")
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    count = body[5]
    if width == 0 or height == 0 or count == 0 or len(body) < 6 + 3 * count:
        raise _damaged("JPEG", "its frame header describes no pixels")
    sampling = [(body[6 + 3 * i + 1] >> 4, body[6 + 3 * i + 1] & 15) for i in range(count)]
    if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling):
        raise _damaged("JPEG", "its frame header has impossible sampling factors")
    h_max = max(h for h, _ in sampling)
    v_max = max(v for _, v in sampling)
    blocks = sum(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8) for h, v in sampling
    )
    scans, entropy, eoi = _jpeg_scans(data, pos, blocks)
    pixels = b"".join(kept) + data[pos:eoi if eoi is not None else n]
    problem = None
    if marker not in _ARITHMETIC_SOF and entropy * 8 < blocks:
        # Too few bits for the blocks the frame header claims: a lying or cut-off header.
        problem = _too_little("JPEG", width, height, complete=eoi is not None)
    multi_scan = marker in _PROGRESSIVE_SOF or scans > 1
    orientation, notes = orientation_from_exif(exif)
    return Header(
        "JPEG", width, height, 1, orientation, pixels,
        bytes_per_pixel=1 if count == 1 else 4, copies=count == 4,
        # A multi-scan JPEG keeps every block's 64 coefficients (2 bytes each) until the last scan.
        fixed_bytes=blocks * 128 if multi_scan else 0,
        notes=notes, jpeg_scans=scans, jpeg_blocks=blocks, data_problem=problem,
    )


def _jpeg_scans(data: bytes, pos: int, blocks: int) -> tuple[int, int, int | None]:
    """Count scans from the first SOS at ``pos``: (scans, entropy-coded bytes, end of EOI or None)."""
    n = len(data)
    scans = 0
    entropy = 0
    while True:
        marker = data[pos + 1]
        if marker == 0xD9:
            return scans, entropy, pos + 2
        if pos + 4 > n:
            return scans, entropy, None
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            # Stop counting once refused: the count only has to show it is too many.
            if scans > MAX_JPEG_SCANS or scans * blocks > MAX_JPEG_SCAN_BLOCKS:
                return scans, max(entropy, blocks), None
            found = _JPEG_MARKER.search(data, min(end, n))
            if found is None:
                return scans, entropy + max(0, n - end), None
            entropy += max(0, found.start() - end)
            pos = found.end() - 2
        else:
            found = _JPEG_MARKER.search(data, min(end, n))
            if found is None:
                return scans, entropy, None
            pos = found.end() - 2


# --- PNG --------------------------------------------------------------------------------------


def _png(data: bytes) -> Header:
    n = len(data)
    pos = 8
    kept = [_PNG_SIGNATURE]
    exif: bytes | None = None
    text_exif: bytes | None = None
    header: bytes | None = None
    frames = 1
    idat = 0
    idat_done = False
    ended = False
    cut_idat = False
    chunks = 0
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if header is None and kind != b"IHDR":
            raise _damaged("PNG", "it does not start with its header")
        chunks += 1
        if chunks > MAX_SEGMENTS and kind != b"IDAT":
            raise _damaged("PNG", f"more than {MAX_SEGMENTS} chunks")
        if kind == b"IDAT":
            if idat_done:
                raise _damaged("PNG", "its image data is split by other chunks")
            idat += min(length, max(0, n - pos - 8))
        elif idat:
            idat_done = True
        if end > n:
            if kind == b"IDAT":
                kept.append(data[pos:])  # the decoder reports the cut itself
                cut_idat = True
            break
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            if header is not None or length != 13:
                raise _damaged("PNG", "its header chunk is malformed")
            header = body
        elif kind == b"acTL" and length >= 8:
            frames = max(1, int.from_bytes(body[:4], "big"))
        elif kind == b"fcTL" and length >= 20 and header is not None:
            _check_apng_frame(header, body)
        elif kind == b"eXIf" and exif is None:
            exif = body
        elif kind in _PNG_TEXT and text_exif is None and body.startswith(b"Raw profile type exif\x00"):
            text_exif = _raw_profile_exif(kind, body)
        if kind in _PNG_KEPT:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            ended = True
            break
    if header is None:
        raise _truncated("PNG")
    if not idat:
        raise _truncated("PNG")
    if not ended and not cut_idat:
        # The image data arrived whole but IEND did not: Pillow accepts that, so the decoder gets one.
        kept.append(b"\x00\x00\x00\x00IEND\xaeB`\x82")
    width = int.from_bytes(header[0:4], "big")
    height = int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if width == 0 or height == 0 or colour not in _PNG_BIT_DEPTHS or depth not in _PNG_BIT_DEPTHS[colour]:
        raise _damaged("PNG", "its header describes an impossible image")
    if interlace > 1:
        raise _damaged("PNG", "it uses an unknown interlace method")
    raw = height * (1 + math.ceil(width * _PNG_CHANNELS[colour] * depth / 8))
    problem = _too_little("PNG", width, height, complete=ended) if raw > DEFLATE_MAX_RATIO * idat + 4096 else None
    # Pillow's modes: 1-bit, grey and palette keep a byte a pixel, 16-bit grey two, the rest four.
    bytes_per_pixel = 4 if colour in {2, 4, 6} else (2 if depth == 16 else 1)
    orientation, notes = orientation_from_exif(exif if exif is not None else text_exif)
    # 8-bit grey and RGB decode straight to the modes the fit works in; the rest are converted.
    copies = not (depth == 8 and colour in {0, 2}) or b"tRNS" in {chunk[4:8] for chunk in kept}
    return Header("PNG", width, height, frames, orientation, b"".join(kept), bytes_per_pixel=bytes_per_pixel,
                  copies=copies, notes=notes, data_problem=problem)


def _check_apng_frame(header: bytes, body: bytes) -> None:
    canvas_w, canvas_h = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    w, h, x, y = (int.from_bytes(body[i:i + 4], "big") for i in (4, 8, 12, 16))
    if w == 0 or h == 0 or x + w > canvas_w or y + h > canvas_h:
        raise _damaged("PNG", "an animation frame lies outside its canvas")


def _raw_profile_exif(kind: bytes, body: bytes) -> bytes | None:
    """EXIF that ImageMagick stores as hex text ("Raw profile type exif"); None when unreadable."""
    keyword_end = body.index(b"\x00")
    rest = body[keyword_end + 1:]
    try:
        if kind == b"zTXt":
            rest = _inflate(rest[1:])
        elif kind == b"iTXt":
            compressed = rest[:1] == b"\x01"
            rest = rest[2:]
            rest = rest[rest.index(b"\x00") + 1:]  # language tag
            rest = rest[rest.index(b"\x00") + 1:]  # translated keyword
            if compressed:
                rest = _inflate(rest)
        lines = rest.decode("latin-1").split("\n")
        return bytes.fromhex("".join(lines[3:]))
    except (ValueError, zlib.error):
        return b""  # present but unreadable: a note, never a refusal


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


# --- WebP -------------------------------------------------------------------------------------


def _webp(data: bytes) -> Header:
    n = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    pos = 12
    canvas: tuple[int, int] | None = None
    still: tuple[int, int] | None = None
    frames = 0
    exif: bytes | None = None
    chunks = 0
    while pos + 8 <= n:
        kind = data[pos:pos + 4]
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:min(pos + 8 + length, n)]
        chunks += 1
        if chunks > MAX_SEGMENTS:
            raise _damaged("WebP", f"more than {MAX_SEGMENTS} chunks")
        if kind == b"VP8X" and pos == 12 and len(body) >= 10:
            canvas = (1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little"))
        elif kind in {b"VP8 ", b"VP8L"} and still is None and frames == 0:
            still = _webp_bitstream_size(kind, body)
        elif kind == b"ANMF" and len(body) >= 16 and canvas is not None:
            frames += 1
            x, y = 2 * int.from_bytes(body[0:3], "little"), 2 * int.from_bytes(body[3:6], "little")
            w, h = 1 + int.from_bytes(body[6:9], "little"), 1 + int.from_bytes(body[9:12], "little")
            if x + w > canvas[0] or y + h > canvas[1]:
                raise _damaged("WebP", "an animation frame lies outside its canvas")
        elif kind == b"EXIF" and exif is None:
            exif = body
        pos += 8 + length + (length & 1)
    size = canvas or still
    if size is None:
        raise _truncated("WebP")
    orientation, notes = orientation_from_exif(exif)
    # libwebp's animation decoder keeps two canvas-sized RGBA buffers, Pillow copies the frame out
    # of them into bytes and then into its image: about 16 bytes a canvas pixel (measured, 17 kept).
    # VP8X flags: 0x10 alpha, 0x02 animation (whose frames Pillow hands over as RGBA).
    alpha = (canvas is not None and bool(data[20] & 0x12)) or (canvas is None and _webp_lossless_alpha(data))
    return Header("WEBP", size[0], size[1], max(frames, 1), orientation, data, bytes_per_pixel=17, copies=alpha,
                  notes=notes)


def _webp_lossless_alpha(data: bytes) -> bool:
    # A simple lossless file says in its header whether it uses alpha (VP8L's alpha_is_used bit).
    return data[12:16] == b"VP8L" and len(data) >= 25 and bool(int.from_bytes(data[21:25], "little") >> 28 & 1)


def _webp_bitstream_size(kind: bytes, body: bytes) -> tuple[int, int]:
    if kind == b"VP8 ":
        if len(body) < 10 or body[3:6] != b"\x9d\x01\x2a":
            raise _damaged("WebP", "its image data has no frame header")
        return int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
    if len(body) < 5 or body[0] != 0x2F:
        raise _damaged("WebP", "its lossless image data has no header")
    bits = int.from_bytes(body[1:5], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


# --- EXIF -------------------------------------------------------------------------------------


def orientation_from_exif(exif: bytes | None) -> tuple[int, tuple[str, ...]]:
    """The EXIF Orientation (1-8) read straight from the TIFF structure, and a note if it was unreadable.

    Only IFD0's one entry is read; nothing is re-serialised. No EXIF, or a value outside 1-8 (0 is
    common for "unknown"), means the pixels are used as stored.
    """
    if exif is None:
        return 1, ()
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    if len(tiff) < 8 or tiff[:4] not in {b"II*\x00", b"MM\x00*"}:
        return 1, (NOTE_UNREADABLE_ORIENTATION,)
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1, (NOTE_UNREADABLE_ORIENTATION,)
    count = min(int.from_bytes(tiff[ifd:ifd + 2], order), (len(tiff) - ifd - 2) // 12)
    for i in range(count):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if int.from_bytes(entry[0:2], order) != 0x0112:
            continue
        kind = int.from_bytes(entry[2:4], order)
        value = entry[8:12]
        if int.from_bytes(entry[4:8], order) < 1:
            return 1, (NOTE_UNREADABLE_ORIENTATION,)
        if kind in {3, 8}:  # SHORT, SSHORT
            orientation = int.from_bytes(value[0:2], order)
        elif kind in {4, 9}:  # LONG, SLONG
            orientation = int.from_bytes(value, order)
        elif kind in {1, 6, 7}:  # BYTE, SBYTE, UNDEFINED
            orientation = value[0]
        else:
            return 1, (NOTE_UNREADABLE_ORIENTATION,)
        return (orientation if 1 <= orientation <= 8 else 1), ()
    return 1, ()
