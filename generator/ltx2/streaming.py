"""Lossless block streaming: a model's repeated blocks live in host memory and visit the GPU one by one.

A streamed block's parameters and buffers are packed into one host buffer (pinned while
the job's pin allowance lasts, pageable after it). Before the block runs, its bytes are
copied into one of a few device slots and its tensors become views of that slot; after
it runs they point back at the host copy and the slot is free for a later block. The
copy for the next streamed block is issued on a side CUDA stream while the current
block computes, ordered by events only: the hot loop never waits on the host.

Nothing about the math changes: the same modules run the same kernels on bit copies of
the same tensors in the same order, so the output is bit-identical to the fully resident
model (docs/DESIGN.md, 'VRAM budget and streaming'). Blocks the budget can hold stay
resident and are never copied.

The streamer assumes blocks run in the order they were given, every forward, all of them:
that is what makes one-ahead prefetch correct. Any other order (a block entered that is
not the next, a forward that ends with blocks left) raises :class:`StreamOrderError`
instead of computing with another block's weights. On the CPU the "device" slots are
ordinary tensors: the copies, hooks, ordering checks and residency run exactly as on a
GPU, so tests check the mechanism itself.

The hooks are module forward pre/post hooks, so a wrapper that replaces a block's
``forward`` (a per-block ``torch.compile``) runs inside them and composes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN = 256  # bytes; every tensor in a packed buffer starts on this boundary (any dtype's view is legal)


class StreamOrderError(RuntimeError):
    """A streamed model ran its blocks in another order than the one it was streamed for."""


@dataclass
class PinAllowance:
    """How many bytes of host memory this job may still pin (``None``: no limit)."""

    limit_bytes: int | None
    pinned_bytes: int = 0

    def take(self, nbytes: int) -> bool:
        if self.limit_bytes is not None and self.pinned_bytes + nbytes > self.limit_bytes:
            return False
        self.pinned_bytes += nbytes
        return True


@dataclass
class _Packed:
    """One streamed block: its host buffer and where each tensor sits in it."""

    index: int
    name: str
    module: torch.nn.Module
    host: torch.Tensor  # uint8, pinned or pageable
    # (owning module, attribute, "p" or "b", offset, nbytes, dtype, shape)
    layout: list[tuple[torch.nn.Module, str, str, int, int, torch.dtype, torch.Size]]

    @property
    def nbytes(self) -> int:
        return int(self.host.numel())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _tensors(module: torch.nn.Module) -> Iterable[tuple[torch.nn.Module, str, str, torch.Tensor]]:
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                yield owner, name, "p", param
        for name, buf in owner._buffers.items():
            if buf is not None:
                yield owner, name, "b", buf


def block_bytes(module: torch.nn.Module) -> int:
    """Bytes a block's packed buffer takes (its tensors, each aligned)."""
    return sum(_aligned(t.nbytes) for _, _, _, t in _tensors(module))


def _view(buffer: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def _point(packed: _Packed, buffer: torch.Tensor) -> None:
    """Make every tensor of the block a view of ``buffer`` (the host copy or a device slot)."""
    for owner, name, kind, offset, nbytes, dtype, shape in packed.layout:
        view = _view(buffer, offset, nbytes, dtype, shape)
        if kind == "p":
            owner._parameters[name] = torch.nn.Parameter(view, requires_grad=False)
        else:
            owner._buffers[name] = view


def _pack(index: int, name: str, module: torch.nn.Module, allowance: PinAllowance, pin: bool) -> _Packed:
    items = list(_tensors(module))
    layout = []
    offset = 0
    for owner, attr, kind, tensor in items:
        layout.append((owner, attr, kind, offset, tensor.nbytes, tensor.dtype, tensor.shape))
        offset += _aligned(tensor.nbytes)
    pinned = pin and allowance.take(offset)
    host = torch.empty(offset, dtype=torch.uint8, pin_memory=pinned)
    for (_, _, _, tensor), (_, _, _, start, nbytes, dtype, shape) in zip(items, layout, strict=True):
        _view(host, start, nbytes, dtype, shape).copy_(tensor.detach())
    packed = _Packed(index, name, module, host, layout)
    _point(packed, host)
    return packed


@dataclass
class StreamStats:
    """What a streamer did: the blocks it brought in, in order, and the bytes it copied."""

    brought_in: list[str] = field(default_factory=list)
    copies: int = 0
    bytes_copied: int = 0
    pinned_bytes: int = 0
    pageable_bytes: int = 0


class BlockStreamer:
    """Streams ``blocks`` (in forward order) of ``root`` through ``slots`` device buffers.

    ``resident`` names block indices that stay on the device. ``root`` is the module whose
    one forward runs every block once; its hooks start the first prefetch and check at the
    end that no streamed block was skipped.
    """

    def __init__(
        self,
        root: torch.nn.Module,
        blocks: Sequence[tuple[str, torch.nn.Module]],
        device: torch.device,
        *,
        resident: Iterable[int] = (),
        slots: int = 2,
        allowance: PinAllowance | None = None,
        pin: bool = True,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        allowance = allowance if allowance is not None else PinAllowance(None)
        keep = set(resident)
        self.stats = StreamStats()
        self.packed: list[_Packed] = []
        for index, (name, module) in enumerate(blocks):
            if index in keep:
                module.to(device)
                continue
            packed = _pack(index, name, module, allowance, pin=self.cuda and pin)
            if packed.host.is_pinned():
                self.stats.pinned_bytes += packed.nbytes
            else:
                self.stats.pageable_bytes += packed.nbytes
            self.packed.append(packed)
        self.resident = sorted(keep)
        self.by_module = {id(p.module): n for n, p in enumerate(self.packed)}
        count = min(slots, len(self.packed)) if self.packed else 0
        size = max((p.nbytes for p in self.packed), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
        self.slot_of: list[int | None] = [None] * count  # which packed block each slot holds or is receiving
        self.where: dict[int, int] = {}  # packed block -> the slot holding (or receiving) it
        self.cursor = 0
        self.next = 0  # position in self.packed of the block expected next
        if self.cuda:
            self.side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            self.ready = [torch.cuda.Event() for _ in range(count)]  # type: ignore[no-untyped-call]
            self.freed = [torch.cuda.Event() for _ in range(count)]  # type: ignore[no-untyped-call]
            for slot_buffer in self.slots:
                # Copies into the slots run on the side stream: their memory must not go back to the
                # compute stream's pool while one may still be in flight.
                slot_buffer.record_stream(self.side)
        self.handles = [root.register_forward_pre_hook(self._root_start),
                        root.register_forward_hook(self._root_end)]
        for packed in self.packed:
            self.handles.append(packed.module.register_forward_pre_hook(self._enter))
            self.handles.append(packed.module.register_forward_hook(self._leave))

    @property
    def streamed_bytes(self) -> int:
        return sum(p.nbytes for p in self.packed)

    @property
    def slot_bytes(self) -> int:
        return sum(int(s.numel()) for s in self.slots)

    def _issue(self, position: int) -> None:
        """Start copying packed block ``position`` into the next slot (once that slot's last user is done)."""
        held = self.where.get(position)
        if held is not None and self.slot_of[held] == position:
            return
        # Round robin over the issue sequence: with blocks in order, the block computing now and
        # the ones prefetched after it always sit in different slots.
        slot = self.cursor % len(self.slots)
        self.cursor += 1
        previous = self.slot_of[slot]
        if previous is not None:
            self.where.pop(previous, None)
        packed = self.packed[position]
        target = self.slots[slot][: packed.nbytes]
        if self.cuda:
            with torch.cuda.stream(self.side):
                # The slot's previous block must be finished on the compute stream before we overwrite it.
                self.side.wait_event(self.freed[slot])
                target.copy_(packed.host, non_blocking=True)
                self.ready[slot].record(self.side)
        else:
            target.copy_(packed.host)
        self.slot_of[slot] = position
        self.where[position] = slot
        self.stats.copies += 1
        self.stats.bytes_copied += packed.nbytes

    def _root_start(self, module: torch.nn.Module, args: Any) -> None:
        if self.next != 0:
            raise StreamOrderError(f"a forward started with {len(self.packed) - self.next} streamed blocks "
                                   f"of the last one not run (next: {self.packed[self.next].name})")
        for position in range(min(len(self.slots), len(self.packed))):
            self._issue(position)

    def _root_end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.next != 0:
            raise StreamOrderError(f"a forward ended with streamed block {self.packed[self.next].name} "
                                   f"and {len(self.packed) - self.next - 1} after it never run")

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        position = self.by_module[id(module)]
        if position != self.next:
            raise StreamOrderError(f"streamed block {self.packed[position].name} ran where "
                                   f"{self.packed[self.next].name} was expected")
        self._issue(position)  # a no-op unless no prefetch was issued for it
        slot = self.where[position]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        packed = self.packed[position]
        _point(packed, self.slots[slot])
        self.stats.brought_in.append(packed.name)
        # Prefetch into the spare slots (one ahead with two): the copies run while this block computes.
        for ahead in range(1, min(len(self.slots), len(self.packed))):
            self._issue((position + ahead) % len(self.packed))

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        position = self.by_module[id(module)]
        packed = self.packed[position]
        slot = self.where[position]
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        _point(packed, packed.host)
        self.next = (position + 1) % len(self.packed)

    @contextlib.contextmanager
    def on_device(self, packed: _Packed) -> Iterator[torch.nn.Module]:
        """One streamed block with its tensors on the device, for an edit in place (a LoRA fusion);
        what it holds afterwards goes back to its host copy. Not for the hot loop: it waits."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.invalidate()
        slot = self.slots[0][: packed.nbytes]
        slot.copy_(packed.host)
        _point(packed, self.slots[0])
        try:
            yield packed.module
        finally:
            packed.host.copy_(slot)
            _point(packed, packed.host)
            if self.cuda:
                torch.cuda.synchronize(self.device)

    def invalidate(self) -> None:
        """Forget what the slots hold (the host copies changed): the next forward copies every block again."""
        self.slot_of = [None] * len(self.slots)
        self.where = {}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def place(model: torch.nn.Module, device: torch.device, skip: Iterable[torch.nn.Module]) -> None:
    """Move every tensor of ``model`` to ``device`` except those inside the ``skip`` modules.

    Tied tensors stay tied: Gemma's ``lm_head`` holds the token embedding's own tensor, and
    moving each attribute on its own would put a second 1.9 GiB copy on the GPU.
    """
    skipped = {id(m) for block in skip for m in block.modules()}
    moved: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for owner in model.modules():
        if id(owner) in skipped:
            continue
        for name, param in owner._parameters.items():
            if param is not None and param.device != device:
                key = _key(param)
                if key not in moved:
                    moved[key] = torch.nn.Parameter(param.detach().to(device), requires_grad=False)
                owner._parameters[name] = moved[key]  # type: ignore[assignment]
        for name, buf in owner._buffers.items():
            if buf is not None and buf.device != device:
                key = _key(buf)
                if key not in moved:
                    moved[key] = buf.to(device)
                owner._buffers[name] = moved[key]


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` counting tied ones (the same storage and view) once."""
    return sum({_key(t): t.nbytes for t in tensors}.values())


def stream(
    model: torch.nn.Module,
    root: torch.nn.Module,
    blocks: torch.nn.ModuleList,
    device: torch.device,
    *,
    resident: int,
    allowance: PinAllowance | None = None,
    slots: int = 2,
    prefix: str = "",
    pin: bool = True,
    others_streamed: Sequence[torch.nn.Module] = (),
) -> BlockStreamer:
    """Stream ``blocks`` of a host-built ``model``: the first ``resident`` stay on ``device``, the rest stream.

    Everything outside the streamed blocks is moved to ``device``. The streamer is kept on
    ``model`` (attribute ``_ltxbot_streamers``) so it lives and dies with it. ``pin: False``
    keeps the host copies pageable (for a model that runs once or twice a job).
    ``others_streamed``: the streamed blocks of the model's other parts (the embeddings
    processor streams two connectors), which must stay on the host as well.
    """
    named = [(f"{prefix}{i}", b) for i, b in enumerate(blocks)]
    keep = range(min(max(resident, 0), len(named)))
    streamed = [b for i, (_, b) in enumerate(named) if i not in keep]
    place(model, device, [*streamed, *others_streamed])
    streamer = BlockStreamer(root, named, device, resident=keep, slots=slots, allowance=allowance, pin=pin)
    streamers: list[BlockStreamer] = getattr(model, "_ltxbot_streamers", [])
    streamers.append(streamer)
    object.__setattr__(model, "_ltxbot_streamers", streamers)
    return streamer


def streamers_of(model: Any) -> list[BlockStreamer]:
    found: list[BlockStreamer] = getattr(model, "_ltxbot_streamers", [])
    return found
