"""Prompt-embedding cache: the embeddings processor's outputs of one prompt, kept on disk.

A Rerun or a Tweak that keeps the prompt asks for the same text again; its embeddings are a
pure function of the text, the Gemma weights, the embeddings processor's weights (in the main
checkpoint), the dtype and the device kind. Each entry is keyed by a SHA-256 over all of
these, so a changed prompt, negative prompt, checkpoint or Gemma folder misses. When every
prompt of a job hits, neither Gemma nor the processor is built (docs/DESIGN.md,
'Prompt-embedding cache').

Files are named by the hash alone and hold only tensors (safetensors, no pickle), never the
prompt's text. Writes go to a temporary file in the same folder and are renamed into place,
so a crash or a second generator never leaves a half entry. The folder is bounded by size:
reading an entry bumps its modification time, and after each write the oldest entries go
until the folder is under its bound (least recently used first).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessorOutput
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

if TYPE_CHECKING:
    from collections.abc import Callable

    from generator.phases import PhaseTracker

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Bump when the stored layout or what the key covers changes: older entries then miss.
FORMAT = 1


def file_identity(path: Path) -> list[Any]:
    """Where a file is, how large, and when it last changed: a replaced checkpoint misses."""
    resolved = path.expanduser().resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


def folder_identity(root: Path) -> list[Any]:
    """Every file under a model folder (Gemma's shards, config, tokenizer), as ``file_identity``."""
    resolved = root.expanduser().resolve()
    files = sorted(p for p in resolved.rglob("*") if p.is_file())
    return [str(resolved), [[str(p.relative_to(resolved)), *file_identity(p)[1:]] for p in files]]


def model_identity(checkpoint: Path, gemma_root: Path, dtype: torch.dtype, device: torch.device) -> str:
    """What every prompt's embeddings depend on besides the text, as one string."""
    return json.dumps(
        {
            "format": FORMAT,
            "checkpoint": file_identity(checkpoint),
            "gemma_root": folder_identity(gemma_root),
            "dtype": str(dtype),
            # CPU and CUDA kernels round differently: an entry made on one is not the other's output.
            "device": device.type,
            "ltx_core": _version("ltx-core"),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def entry_key(text: str, identity: str) -> str:
    digest = hashlib.sha256()
    for part in (identity, text):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One prompt's ``EmbeddingsProcessorOutput`` fields."""

    video_encoding: torch.Tensor
    audio_encoding: torch.Tensor | None
    attention_mask: torch.Tensor


class EmbeddingCache:
    """A folder of entries under the data dir, at most ``max_bytes`` in all."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str, device: torch.device) -> Entry | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # least recently used goes first
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("embedding cache entry unreadable (%s); encoding the prompt", exc.strerror)
            return None
        try:
            tensors = load_tensors(data)
        except Exception:  # a foreign or damaged file: treat as a miss and let the next write replace it
            log.warning("embedding cache entry damaged; encoding the prompt", exc_info=True)
            path.unlink(missing_ok=True)
            return None
        audio = tensors.get("audio_encoding")
        return Entry(
            video_encoding=tensors["video_encoding"].to(device),
            audio_encoding=None if audio is None else audio.to(device),
            attention_mask=tensors["attention_mask"].to(device),
        )

    def put(self, key: str, output: Any) -> None:
        """Store an ``EmbeddingsProcessorOutput``; a failure to write only costs the next job a Gemma pass."""
        tensors = {
            "video_encoding": output.video_encoding,
            "attention_mask": output.attention_mask,
        }
        if output.audio_encoding is not None:
            tensors["audio_encoding"] = output.audio_encoding
        data = save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        if len(data) > self.max_bytes:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                Path(tmp).replace(self._path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("embedding cache not written (%s)", exc.strerror)
            return
        self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every entry, oldest first."""
        found = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another generator evicted it meanwhile
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def evict(self) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _to(encoded: tuple[tuple[torch.Tensor, ...], torch.Tensor], device: torch.device) -> Any:
    states, mask = encoded
    return tuple(t.to(device) for t in states), mask.to(device)


def prompt_contexts(
    prompts: list[str],
    *,
    ledger: Any,
    tracker: PhaseTracker,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str, int, int], None],
    cache: EmbeddingCache | None,
    identity: Callable[[], str],
) -> list[Any]:
    """Each prompt's embeddings-processor output, from the cache where it has them.

    The misses run the ``text_encode`` and ``embeddings`` phases as before; when nothing
    misses, neither phase runs and no Gemma is built.
    """
    keys = [entry_key(p, identity()) for p in prompts] if cache is not None else []
    contexts: list[Any] = [None] * len(prompts)
    if cache is not None:
        for i, key in enumerate(keys):
            hit = cache.get(key, device)
            if hit is not None:
                contexts[i] = EmbeddingsProcessorOutput(hit.video_encoding, hit.audio_encoding, hit.attention_mask)
    missing = [i for i, c in enumerate(contexts) if c is None]
    if cache is not None:
        log.info("embedding cache: %d of %d prompts found", len(prompts) - len(missing), len(prompts))
    if not missing:
        return contexts

    with tracker.phase("text_encode"):
        progress("reading the prompt", 0, 1)
        text_encoder = tracker.watch(ledger.text_encoder(), "text encoder")
        # Each prompt's 49 layers of hidden states wait in host memory (0.36 GiB per 1,024-token
        # prompt on the 12B) so the second encode does not stack on the first's: Gemma sets
        # the whole run's peak.
        hidden = {i: _to(text_encoder.encode(prompts[i]), torch.device("cpu")) for i in missing}
        del text_encoder

    with tracker.phase("embeddings"):
        processor = tracker.watch(ledger.gemma_embeddings_processor(), "embeddings processor")
        for i in missing:
            contexts[i] = processor.process_hidden_states(*_to(hidden.pop(i), device))
            if cache is not None:
                cache.put(keys[i], contexts[i])
        del processor, hidden
    return contexts
