"""The prepared-weights cache: a build's state dict as the job used it, kept on disk for the next job.

The transformer's fp8-cast state dict is 18 GiB; the bf16 file it comes from is 42 GB. The
first job that builds it casts each tensor on the host, writes the result into a
safetensors file under the data dir while it uploads it, and later jobs read the cast
copy (less than half the bytes, and no cast). ``torch``'s bf16-to-e4m3 conversion is one
host-and-device function in c10 (``Float8_e4m3fn.h``), so the copy cast on the host holds
the bits a cast on the GPU gives (the loading benchmark checks it on the H200).

An entry is named by a hash of what it was made from: each source file's path, size,
mtime_ns and a hash of its safetensors header; the model; the SDOps chain (the quantization
policy is its last link); the exact keys the build asked for; the ltx-core and torch
versions. Anything else misses. A new entry for the same model and files replaces the
stale one; the cache is bounded (``generator.prepared_cache_gib``), least recently used out
first. An entry is written to a temporary name, flushed to disk and only then renamed, so
a crash leaves no file that is ever read (docs/DESIGN.md, 'Prepared weights and staging').
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch
from ltx_core.loader.primitives import StateDict

if TYPE_CHECKING:
    from ltx_core.loader.sd_ops import SDOps

    from generator.ltx2.weights import Select, WeightStore

log = logging.getLogger(__name__)
FORMAT = 1
SUFFIX = ".safetensors"
ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
# An entry's tensors in file order: (key, dtype, shape).
Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def safetensors_header(path: str | Path) -> tuple[dict[str, Any], int, bytes]:
    """(header, offset of the data, raw header bytes) of a safetensors file: 8 bytes of length, then JSON."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    header: dict[str, Any] = json.loads(raw)
    return header, 8 + length, raw


@dataclass(frozen=True)
class SourceFile:
    """What identifies a weights file for the cache: a rewrite in place changes the mtime or the header."""

    path: str
    size: int
    mtime_ns: int
    header_sha256: str

    @classmethod
    def of(cls, path: str) -> SourceFile:
        stat = Path(path).stat()
        _, _, raw = safetensors_header(path)
        return cls(path, stat.st_size, stat.st_mtime_ns, hashlib.sha256(raw).hexdigest())


def entry_key(sources: Iterable[SourceFile], model: str, sd_ops: SDOps | None, wanted: frozenset[str] | None) -> dict[
    str, Any
]:
    keys = "" if wanted is None else hashlib.sha256("\n".join(sorted(wanted)).encode()).hexdigest()
    return {
        "format": FORMAT, "model": model, "sd_ops": None if sd_ops is None else sd_ops.name,
        "sources": [vars(s) for s in sources], "keys": keys,
        "ltx_core": importlib.metadata.version("ltx-core"), "torch": torch.__version__,
    }


def _slot(key: dict[str, Any]) -> str:
    """The same model from the same paths: a newer entry for it makes the older one stale."""
    return json.dumps([key["model"], [s["path"] for s in key["sources"]]])


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class PreparedWriter:
    """Streams one entry into a temporary file; ``commit`` flushes it to disk and renames it in place."""

    def __init__(self, final: Path, layout: Layout, meta: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": meta}
        offset = 0
        self.sizes: dict[str, int] = {}
        for name, dtype, shape in layout:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes[name] = nbytes
            offset += nbytes
        self.nbytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        self.final = final
        self.temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.handle = open(self.temporary, "wb")  # noqa: SIM115 - closed in commit or abort
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.written = 0
        self.seconds = 0.0
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != self.sizes[name]:
            raise ValueError(f"{name}: {data.numel()} bytes, the header says {self.sizes[name]}")
        self.handle.write(memoryview(data.numpy()))  # type: ignore[arg-type]  # numpy arrays are buffers
        self.written += data.numel()
        self.seconds += time.perf_counter() - start

    def commit(self) -> None:
        """Flush and rename on a thread: the job goes on while the disk catches up (``join`` waits)."""
        if self.written != self.nbytes:
            self.abort()
            raise ValueError(f"{self.final.name}: {self.written} of {self.nbytes} bytes written")

        def finish() -> None:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
                self.temporary.replace(self.final)
                directory = os.open(self.final.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            except BaseException as exc:  # reported by join; the job does not depend on the cache
                self.error = exc
                with contextlib.suppress(OSError):
                    self.temporary.unlink()

        self.thread = threading.Thread(target=finish, name="prepared-weights-commit", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            log.warning("prepared weights not kept (%s): %s", self.final.name, self.error)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            self.temporary.unlink()


class PreparedCache:
    """Entries under ``root``, at most ``bound_bytes`` in all."""

    def __init__(self, root: Path, bound_bytes: int) -> None:
        self.root = root
        self.bound_bytes = bound_bytes

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]

    def size(self) -> int:
        total = 0
        for path in self.entries():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def lookup(self, key: dict[str, Any]) -> Path | None:
        path = self.root / f"{_digest(key)}{SUFFIX}"
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (OSError, safetensors.SafetensorError):
            return None
        if meta.get("ltxbot_key") != json.dumps(key, sort_keys=True):
            return None
        with contextlib.suppress(OSError):
            # Use time is the access time, set explicitly (whatever the mount's atime policy); the
            # mtime stays, so the entry's identity for staging does not change with use.
            os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
        return path

    def writer(self, key: dict[str, Any], layout: Layout) -> PreparedWriter | None:
        """A writer for a new entry, with room made for it; None when it cannot fit or be written."""
        need = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)
        if need > self.bound_bytes:
            log.info("prepared weights: %.2f GiB would not fit the %.2f GiB cache; not kept", need / 2**30,
                     self.bound_bytes / 2**30)
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._sweep_temporaries()
            self._make_room(need, _slot(key))
            return PreparedWriter(self.root / f"{_digest(key)}{SUFFIX}", layout,
                                  {"ltxbot_key": json.dumps(key, sort_keys=True), "ltxbot_slot": _slot(key)})
        except OSError as exc:
            log.warning("prepared weights not kept: %s", exc)
            return None

    def _make_room(self, need: int, slot: str) -> None:
        aged: list[tuple[int, int, Path]] = []
        for path in self.entries():
            try:
                stat = path.stat()  # first: reading the header may move the access time (relatime)
                with safetensors.safe_open(str(path), framework="pt") as handle:
                    stale = (handle.metadata() or {}).get("ltxbot_slot") == slot
            except (OSError, safetensors.SafetensorError):
                stale, stat = True, None
            if stale:  # made from an older version of these files, or with another policy
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            assert stat is not None
            aged.append((stat.st_atime_ns, stat.st_size, path))
        aged.sort()
        total = sum(size for _, size, _ in aged)
        while aged and total + need > self.bound_bytes:
            _, size, path = aged.pop(0)
            with contextlib.suppress(OSError):
                path.unlink()
            total -= size

    def _sweep_temporaries(self) -> None:
        """Temporary files of writers that died (their pid is gone) are removed, never read."""
        for path in self.root.glob(".*.tmp"):
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    path.unlink()


def load_through_cache(
    store: WeightStore, shards: list[str], select: Select, sd_ops: SDOps | None, device: torch.device, model: str,
    wanted: frozenset[str] | None,
) -> StateDict:
    """``StoreLoader.load`` through the prepared cache: read the entry, or make it while loading."""
    cache = store.prepared
    assert cache is not None
    key = entry_key([SourceFile.of(s) for s in shards], model, sd_ops, wanted)
    sd: dict[str, torch.Tensor] = {}
    found = cache.lookup(key)
    if found is not None:
        for name, tensor in store.tensors(str(found), lambda k, _shape: k, device, model, source="prepared"):
            sd[name] = tensor
        return _state_dict(sd, device)

    layout: Layout = []
    for shard in shards:
        header, _, _ = safetensors_header(shard)
        with safetensors.safe_open(shard, framework="pt") as handle:
            order = list(handle.keys())  # the order the store reads them in
        for file_key in order:
            info = header[file_key]
            shape = tuple(info["shape"])
            renamed = select(file_key, lambda shape=shape: shape)  # type: ignore[misc]
            if renamed is None:
                continue
            probe = torch.empty(shape, dtype=ST_DTYPES[info["dtype"]], device="meta")
            pairs = sd_ops.apply_to_key_value(renamed, probe) if sd_ops is not None else [(renamed, probe)]
            layout += [(k, v.dtype, tuple(v.shape)) for k, v in pairs]
    writer = cache.writer(key, layout)
    host = torch.device("cpu")
    for shard in shards:
        # Read and cast on the host (the cast the GPU would make, bit for bit), write, then upload.
        for name, tensor in store.tensors(shard, select, host, model, plan=False):
            start, wrote_before = time.perf_counter(), writer.seconds if writer is not None else 0.0
            pairs = sd_ops.apply_to_key_value(name, tensor) if sd_ops is not None else [(name, tensor)]
            for item_key, item in pairs:
                if writer is not None:
                    try:
                        writer.write(item_key, item)
                    except (OSError, ValueError) as exc:
                        log.warning("prepared weights not kept: %s", exc)
                        writer.abort()
                        writer = None
                sd[item_key] = item.to(device=device)
                store.plan.append((str(cache.root / f"{_digest(key)}{SUFFIX}"), item_key, item.nbytes))
            # The cast and the upload are part of reading the checkpoint this time; the write is apart.
            wrote = (writer.seconds - wrote_before) if writer is not None else 0.0
            store.counter.checkpoint_seconds += time.perf_counter() - start - wrote
    if writer is not None:
        try:
            writer.commit()
            store.committing.append(writer)
            store.counter.written_bytes += writer.written
            store.counter.written_seconds += writer.seconds
        except ValueError as exc:
            log.warning("prepared weights not kept: %s", exc)
    return _state_dict(sd, device)


def _state_dict(sd: dict[str, torch.Tensor], device: torch.device) -> StateDict:
    size = sum(v.nbytes for v in sd.values())
    return StateDict(sd=sd, device=device, size=size, dtype={v.dtype for v in sd.values()})

