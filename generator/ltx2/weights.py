"""Where model weights come from: one host-side store that every model build reads through.

ltx-core's loader reads every tensor whose key the builder's SDOps match and lets
``load_state_dict(strict=False)`` drop what the model does not have. The transformer's
SDOps match the whole ``model.diffusion_model.`` prefix, so each transformer build read
(and on CUDA uploaded) the 4 GB of ``{video,audio}_embeddings_connector`` weights that
belong to the embeddings processor, only to discard them. Here the builder names the keys
its meta model holds and the store reads those alone (``UsedKeysBuilder``).

The store also records each read (file, key, bytes, which build asked, where it came from),
so a job can say what it read. It is the one place weights enter the process: the
prepared cache under the data dir (``generator/ltx2/prepared.py``) and the standby's
staged host copies (``generator/ltx2/staging.py``) serve the same (file, key) requests
here, and ``WeightStore.host_tensor`` is the host-side lookup the VRAM budget's block
streaming reads from (docs/DESIGN.md, "Loading weights" and "Prepared weights and staging").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from ltx_core.loader.fuse_loras import apply_loras
from ltx_core.loader.primitives import LoraPathStrengthAndSDOps, LoraStateDictWithStrength, StateDict
from ltx_core.loader.registry import DummyRegistry
from ltx_core.loader.sd_ops import SDOps
from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder

from generator.loadstats import LoadCounter
from generator.ltx2.prepared import PreparedCache, PreparedWriter, load_through_cache
from generator.ltx2.staging import StagedWeights, write_plan

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# (key in the file, its shape from the header) -> the key's name after the SDOps, or None: not read.
Select = Callable[[str, Callable[[], tuple[int, ...]]], "str | None"]
# Where a tensor came from: the model's own file, the prepared cache, or the standby's staged copy.
Source = Literal["checkpoint", "prepared", "staged"]


@dataclass(frozen=True)
class Read:
    """One tensor handed out by the store, in the file's dtype (before any cast)."""

    path: str
    key: str
    nbytes: int
    model: str
    source: Source = "checkpoint"


@dataclass
class WeightStore:
    """Reads tensors from safetensors files, or from the standby's staged copies, and remembers what it read.

    ``prepared``: the prepared-weights cache the transformer build reads through
    (``generator/ltx2/prepared.py``); ``staged``: host tensors the standby read ahead
    (``generator/ltx2/staging.py``); ``pin``: page-lock those before the first copy to CUDA.
    ``plan`` is what the next job will read, in order (the standby stages from it).
    """

    reads: list[Read] = field(default_factory=list)
    prepared: PreparedCache | None = None
    staged: StagedWeights | None = None
    pin: bool = True
    counter: LoadCounter = field(default_factory=LoadCounter)
    plan: list[tuple[str, str, int]] = field(default_factory=list)
    committing: list[PreparedWriter] = field(default_factory=list)

    def host_tensor(self, path: str, key: str) -> torch.Tensor | None:
        """The staged host copy of (file, key), handed out once; None: read it from the file."""
        return None if self.staged is None else self.staged.take(path, key)

    def tensors(
        self, path: str, select: Select, device: torch.device, model: str, *,
        source: Source = "checkpoint", plan: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(new key, tensor) for each key of ``path`` that ``select`` maps to a name; the rest is never read.

        ``select`` gets the key and a function that gives its shape from the file's header.
        """
        copied_from_staged = False
        with safetensors.safe_open(path, framework="pt", device=str(device)) as handle:
            keys = handle.keys()  # a safetensors handle is not iterable
            for key in keys:

                def shape(key: str = key) -> tuple[int, ...]:
                    return tuple(handle.get_slice(key).get_shape())

                name = select(key, shape)
                if name is None:
                    continue
                start = time.perf_counter()
                host = self.host_tensor(path, key)
                if host is not None:
                    if device.type == "cuda" and self.pin and self.staged is not None and not self.staged.pinned:
                        self.staged.pin()
                        self.counter.pin_seconds += self.staged.pin_seconds
                    tensor = host.to(device=device, non_blocking=True, copy=False)
                    copied_from_staged = copied_from_staged or tensor is not host
                    self.counter.staged_bytes += host.nbytes
                    if self.staged is not None and self.staged.pinned:
                        self.counter.pinned_bytes += host.nbytes
                    self.counter.staged_seconds += time.perf_counter() - start
                    self.reads.append(Read(path, key, host.nbytes, model, "staged"))
                else:
                    raw = handle.get_tensor(key)
                    tensor = raw.to(device=device, non_blocking=True, copy=False)
                    if source == "prepared":
                        self.counter.prepared_bytes += raw.nbytes
                        self.counter.prepared_seconds += time.perf_counter() - start
                    else:
                        self.counter.checkpoint_bytes += raw.nbytes
                        self.counter.checkpoint_seconds += time.perf_counter() - start
                    self.reads.append(Read(path, key, raw.nbytes, model, source))
                if plan:
                    self.plan.append((path, key, tensor.nbytes if host is None else host.nbytes))
                yield name, tensor
        if copied_from_staged and device.type == "cuda":
            # Pinned copies run behind the host: staged memory may be reused only after them.
            start = time.perf_counter()
            torch.cuda.current_stream(device).synchronize()
            self.counter.staged_seconds += time.perf_counter() - start

    def bytes_read(self, model: str | None = None) -> int:
        return sum(r.nbytes for r in self.reads if model is None or r.model == model)

    def finish(self, plan_dir: Path | None) -> None:
        """End of the job: wait for prepared copies to reach the disk, write the next job's plan, drop staging."""
        for writer in self.committing:
            writer.join()
        self.committing.clear()
        if plan_dir is not None:
            try:
                write_plan(Path(plan_dir), self.plan)
            except OSError as exc:
                log.warning("the next job's staging plan was not written: %s", exc)
        if self.staged is not None:
            self.staged.release()
            self.staged = None


class StoreLoader:
    """ltx-core's ``SafetensorsModelStateDictLoader`` reading through a :class:`WeightStore`.

    ``wanted`` (keys after the SDOps renames) narrows what is read; ``None`` reads what
    the SDOps match, as ltx-core does. ``config`` replaces the files' ``config`` metadata
    (Hugging Face Gemma shards carry none).
    """

    def __init__(
        self, store: WeightStore, *, config: dict[str, Any] | None = None, wanted: frozenset[str] | None = None,
        model: str = "", prepare: bool = False,
    ) -> None:
        self.store = store
        self.config = config
        self.wanted = wanted
        self.model = model
        # Read through the store's prepared cache (the fp8-cast transformer: generator/ltx2/prepared.py).
        self.prepare = prepare

    def only(self, wanted: frozenset[str], model: str, *, prepare: bool = False) -> StoreLoader:
        return StoreLoader(self.store, config=self.config, wanted=wanted, model=model, prepare=prepare)

    def metadata(self, path: str) -> dict[str, Any]:
        if self.config is not None:
            return self.config
        with safetensors.safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        if meta is None or "config" not in meta:
            return {}
        config: dict[str, Any] = json.loads(meta["config"])
        return config

    def load(self, path: str | list[str], sd_ops: SDOps | None = None, device: torch.device | None = None) -> StateDict:
        device = device or torch.device("cpu")
        wanted = self.wanted

        def select(key: str, shape: Callable[[], tuple[int, ...]]) -> str | None:
            name = key if sd_ops is None else sd_ops.apply_to_key(key)
            if name is None or wanted is None or name in wanted:
                return name
            if sd_ops is None:
                return None
            # Key-value operations may rename (the vocoder's prefix strip) or duplicate (Gemma's
            # tied lm_head): run them on a meta tensor of the header's shape, which reads nothing.
            probe = torch.empty(shape(), dtype=torch.bfloat16, device="meta")
            return name if any(new in wanted for new, _ in sd_ops.apply_to_key_value(name, probe)) else None

        shards = path if isinstance(path, list) else [path]
        if self.prepare and self.store.prepared is not None:
            return load_through_cache(self.store, shards, select, sd_ops, device, self.model, wanted)
        sd: dict[str, torch.Tensor] = {}
        size = 0
        dtypes: set[torch.dtype] = set()
        for shard in shards:
            for name, value in self.store.tensors(shard, select, device, self.model):
                pairs = sd_ops.apply_to_key_value(name, value) if sd_ops is not None else [(name, value)]
                for key, item in pairs:
                    size += item.nbytes
                    dtypes.add(item.dtype)
                    sd[key] = item
        return StateDict(sd=sd, device=device, size=size, dtype=dtypes)


def _lora_keys(weight_keys: frozenset[str] | set[str]) -> frozenset[str]:
    """The LoRA keys (after the LoRA's SDOps) that target one of these weights."""
    prefixes = [key.removesuffix(".weight") for key in weight_keys if key.endswith(".weight")]
    return frozenset(f"{p}.lora_{side}.weight" for p in prefixes for side in "AB")


class UsedKeysBuilder(SingleGPUModelBuilder[Any]):
    """ltx-core's ``SingleGPUModelBuilder.build`` with the reads narrowed to the keys its model holds.

    The same steps in the same order (config, meta model and module ops, state dict,
    LoRA fusion, assign); the one change is the loader: it reads only the keys of the meta
    model's state dict, and for LoRAs only those that target one of its weights. Any other
    loader (the benchmark's random weights) builds exactly as ltx-core does.
    """

    @classmethod
    def of(cls, builder: SingleGPUModelBuilder[Any]) -> UsedKeysBuilder:
        return cls(**{f.name: getattr(builder, f.name) for f in fields(builder)})

    def build(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        if not isinstance(self.model_loader, StoreLoader):
            return super().build(device=device, dtype=dtype)
        device = torch.device("cuda") if device is None else device
        config = self.model_config()
        meta_model = self.meta_model(config, self.module_ops)
        model_name = type(meta_model).__name__
        kept = frozenset(meta_model.state_dict().keys())
        model_paths = list(self.model_path) if isinstance(self.model_path, tuple) else [self.model_path]
        narrowed = self.model_loader.only(kept, model_name, prepare=self.model_loader.prepare)
        model_state_dict = _narrowed(self, narrowed).load_sd(
            model_paths, sd_ops=self.model_sd_ops, registry=self.registry, device=device
        )

        lora_strengths = [lora.strength for lora in self.loras]
        if not lora_strengths or (min(lora_strengths) == 0 and max(lora_strengths) == 0):
            sd = model_state_dict.sd
            if dtype is not None:
                sd = {key: value.to(dtype=dtype) for key, value in model_state_dict.sd.items()}
            meta_model.load_state_dict(sd, strict=False, assign=True)
            return self._return_model(meta_model, device)

        lora_builder = _narrowed(self, self.model_loader.only(_lora_keys(kept), f"{model_name} LoRA"))
        lora_state_dicts = [
            lora_builder.load_sd([lora.path], sd_ops=lora.sd_ops, registry=self.registry, device=self.lora_load_device)
            for lora in self.loras
        ]
        lora_sd_and_strengths = [
            LoraStateDictWithStrength(sd, strength)
            for sd, strength in zip(lora_state_dicts, lora_strengths, strict=True)
        ]
        final_sd = apply_loras(
            model_sd=model_state_dict,
            lora_sd_and_strengths=lora_sd_and_strengths,
            dtype=dtype,
            destination_sd=model_state_dict if isinstance(self.registry, DummyRegistry) else None,
        )
        meta_model.load_state_dict(final_sd.sd, strict=False, assign=True)
        return self._return_model(meta_model, device)


def _narrowed(builder: SingleGPUModelBuilder[Any], loader: StoreLoader) -> SingleGPUModelBuilder[Any]:
    # ``load_sd`` reads through ``self.model_loader``; a plain copy keeps the registry logic as is.
    return SingleGPUModelBuilder(
        **{f.name: getattr(builder, f.name) for f in fields(builder)} | {"model_loader": loader}
    )


def fuse_loras_in_place(
    model: torch.nn.Module,
    builder: SingleGPUModelBuilder[Any],
    loras: tuple[LoraPathStrengthAndSDOps, ...],
    dtype: torch.dtype | None,
) -> torch.nn.Module:
    """Fuse ``loras`` into a built model's own weights, as a fresh build with those LoRAs would.

    ``builder`` is the one that built ``model`` (its loader reads the LoRA files) and
    ``dtype`` what that build passed to ltx-core (``None`` for the fp8-cast transformer).
    Each weight goes through ltx-core's ``apply_loras`` alone, with the value a fresh
    build would hand it: fp8-cast weights are the same fp8 tensors (the downcast runs
    before fusion there too), bf16 weights are the file's; a float32 ledger's weights are
    the file's bf16 values widened, so they go back to bf16 exactly first (ltx-core fuses
    only into bf16 or fp8). Same inputs, same function, same device: the same bits, and
    only the LoRA is read.
    """
    params = dict(model.named_parameters())
    targets = _lora_keys(set(params))
    loader = builder.model_loader
    lora_sds: list[LoraStateDictWithStrength] = []
    for lora in loras:
        if isinstance(loader, StoreLoader):
            state = loader.only(targets, f"{type(model).__name__} LoRA").load(
                [lora.path], sd_ops=lora.sd_ops, device=builder.lora_load_device
            )
        else:
            state = loader.load([lora.path], sd_ops=lora.sd_ops, device=builder.lora_load_device)
        lora_sds.append(LoraStateDictWithStrength(state, lora.strength))
    if all(item.strength == 0 for item in lora_sds):
        return model
    with torch.no_grad():
        for key, param in params.items():
            prefix = key.removesuffix(".weight")
            if not key.endswith(".weight") or not any(f"{prefix}.lora_A.weight" in s.state_dict.sd for s in lora_sds):
                continue
            weight = param.detach()
            if weight.dtype not in (torch.bfloat16, *FP8_DTYPES):
                weight = weight.to(torch.bfloat16)
            one = StateDict(sd={key: weight}, device=weight.device, size=weight.nbytes, dtype={weight.dtype})
            fused = apply_loras(model_sd=one, lora_sd_and_strengths=lora_sds, dtype=dtype).sd[key]
            param.copy_(fused)
            del fused, one, weight
    return model
