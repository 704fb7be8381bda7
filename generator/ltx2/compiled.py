"""``generator.compile_blocks``: the transformer blocks through one ``torch.compile``d function.

All 48 blocks have the same code and shapes, so one compiled function serves them all:
``torch.compile`` treats a module's parameters as inputs (inline_inbuilt_nn_modules). The
first graph is static; once the token count or batch changes (stage 2) the compiler makes
those dimensions dynamic, so stage 2 and every later size share that graph. The
fp8-cast upcast (``weight.to(bf16)`` in every Linear) is traced into the graph, where
inductor fuses it into the matmul's operand load instead of writing a bf16 copy of every
weight per call. ltx-core's fp8-cast puts a closure on each Linear instance; the compiler
would guard on each closure and recompile per layer, so the compiled path swaps those
Linears for :class:`Fp8CastLinear`, a class with the same arithmetic.

With ``generator.cuda_graphs`` the same function is compiled with inductor's CUDA graphs
(``triton.cudagraphs``, the "reduce-overhead" mode): each block's kernels are recorded once its
shapes have been seen and replayed as one launch after that. All blocks share the function, so
each block is its own node of the CUDA-graph tree, keyed by its weights' addresses (resident
weights stay where they are; a streamed block lands in one of a few slots, so it is recorded at
most once per slot; not measured under a budget); every
transformer forward starts a new step of the tree (``cudagraph_mark_step_begin``), so the
previous forward's outputs may be overwritten, and nothing outside the forward keeps them.

The wrapper replaces ``block.forward`` only: ``block(...)`` still runs the module's hooks
first, so a hook-based wrapper such as VRAM streaming's (moving a block's weights in before
it runs) composes with it. The compile cache lives under the data dir
(``TORCHINDUCTOR_CACHE_DIR``), so the next job, a fresh process, loads the compiled
kernels instead of compiling again (docs/DESIGN.md, 'Compiled blocks').
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ltx_core.guidance.perturbations import (
    BatchedPerturbationConfig,
    Perturbation,
    PerturbationConfig,
    PerturbationType,
)
from ltx_core.model.transformer import attention as ltx_attention
from ltx_core.model.transformer.transformer import BasicAVTransformerBlock

from generator.checks import UnsupportedOnDeviceError
from generator.ltx2.scaled_mm import FP8, use_scaled_mm

log = logging.getLogger(__name__)

_COMPILED: dict[bool, Any] = {}  # by cuda_graphs
# torch.compile's backend; the CPU test traces with aot_eager (inductor's C++ build of a
# whole block takes longer than the test suite may spend).
BACKEND = "inductor"


class Fp8CastLinear(torch.nn.Linear):
    """ltx-core's fp8-cast Linear (weight and bias widened to the input's dtype per call) as a class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


class CudaGraphsUnsupportedError(UnsupportedOnDeviceError):
    """CUDA graphs asked for where there is no CUDA device."""


def check_cuda_graphs(device: torch.device) -> None:
    """Refuse, naming the setting, where the compiled blocks cannot be replayed as CUDA graphs."""
    if device.type != "cuda":
        raise CudaGraphsUnsupportedError(
            "generator.cuda_graphs needs an NVIDIA GPU; this job runs on the CPU. Set cuda_graphs: false."
        )


def warm_imports() -> None:
    """Import what the first compile would (about 1.1 s on a CPU core, 39 MiB): a standby does it
    while it waits, so a compiled job does not. Nothing here touches CUDA."""
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401


def use_cache_dir(cache_dir: Path) -> None:
    """Point inductor's and triton's caches under ``cache_dir`` (before anything compiles)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")


def _run_block(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(block).forward(block, *args, **kwargs)


def block_perturbations(
    perturbations: BatchedPerturbationConfig | None, idx: int
) -> BatchedPerturbationConfig | None:
    """``perturbations`` as block ``idx`` sees them, written so that no answer depends on the index.

    A block asks the config "is sample i perturbed in block ``self.idx``?" and branches on the
    answer, so the compiler guards on the index and traces every block apart (48 graphs for a
    guided step, past the compiler's limit). Each sample's perturbations that apply to this
    block, with ``blocks=None`` (every block), give the block the same answers, and blocks with
    the same answers share one graph.
    """
    if perturbations is None:
        return None
    return BatchedPerturbationConfig([
        PerturbationConfig([Perturbation(kind, None) for kind in PerturbationType if sample.is_perturbed(kind, idx)])
        for sample in perturbations.perturbations
    ])


# What every compiled block's ``idx`` reads. The block asks for its index only to look up its
# perturbations, which ``block_perturbations`` has already resolved for every block; one value
# for all spares the graph torch 2.11 traces for block 0 alone (it specialises on an int the
# first time, ``block.idx == 0``, then recompiles with it unspecialised: a fourth graph per job on
# the H200, reproduced on the CPU with torch 2.11).
COMPILED_BLOCK_INDEX = 0


def _block_forward(compiled: Any, block: torch.nn.Module) -> Any:
    idx = int(block.idx)  # type: ignore[arg-type]
    block._ltxbot_idx = idx  # type: ignore[assignment]
    block.idx = COMPILED_BLOCK_INDEX  # type: ignore[assignment]

    def forward(video: Any, audio: Any, perturbations: BatchedPerturbationConfig | None = None) -> Any:
        return compiled(block, video, audio, block_perturbations(perturbations, idx))

    return forward


def compiled_block_function(cuda_graphs: bool = False) -> Any:
    """The one compiled function every block runs through (made once per process and ``cuda_graphs``)."""
    if cuda_graphs not in _COMPILED:
        # Each block is the same code on other parameters: without this, 48 blocks pass the
        # default limit of 8 graphs per function and the rest silently run eagerly.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # torch 2.11 guards on ``block.idx`` when it is read, even where no answer depends on it
        # (``block_perturbations``): 28 recompiles, one per block, on the H200. Every compiled
        # block reads ``COMPILED_BLOCK_INDEX``; unspecialised besides, in case a block is not ours.
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        # The block's float constants are the same every call; traced as symbols, torch 2.11 gave
        # up on them after the compile and traced each graph a second time (H200 log, 2026-12-03).
        torch._dynamo.config.specialize_float = True
        # Static first, then dynamic in the dimensions seen to change (automatic dynamic: the token
        # counts and the batch between stage 1 and stage 2). ``dynamic=True`` also made the hidden
        # sizes and head counts symbols: tracing one block took 26 s on the H200 and 50 s against
        # 4.8 s here on the CPU, and a warm job spent 109 s in its first step.
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"triton.cudagraphs": True} if cuda_graphs else None
        )
        _COMPILED[cuda_graphs] = torch.compile(_run_block, dynamic=None, backend=BACKEND, options=options)
    return _COMPILED[cuda_graphs]


def _new_cuda_graph_step(module: torch.nn.Module, args: Any) -> None:
    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]


def resolved_attention(function: Any) -> Any:
    """The callable ``AttentionFunction`` member ``function`` dispatches to (itself if not a member).

    torch 2.11's compiler cannot trace a call on an Enum member, so every attention broke
    the block's graph in pieces (68 breaks and 61 recompiles before stage 1's first step on
    the H200); the class it dispatches to is plain code and traces, with the same kernel.
    """
    members = ltx_attention.AttentionFunction
    if not isinstance(function, members):
        return function
    if function is members.XFORMERS or (
        function is members.DEFAULT and ltx_attention.memory_efficient_attention is not None
    ):
        return ltx_attention.XFormersAttention()
    if function is members.FLASH_ATTENTION_3:
        return ltx_attention.FlashAttention3()
    return ltx_attention.PytorchAttention()


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, BasicAVTransformerBlock)]


def compile_transformer_blocks(
    model: torch.nn.Module, cache_dir: Path | None = None, *, cuda_graphs: bool = False
) -> int:
    """Route every transformer block of ``model`` through the compiled function; how many blocks."""
    if cache_dir is not None:
        use_cache_dir(cache_dir)
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == FP8:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("original_forward", None)
            module.__class__ = Fp8CastLinear
    for module in model.modules():
        if isinstance(module, ltx_attention.Attention):
            module.attention_function = resolved_attention(module.attention_function)
    compiled = compiled_block_function(cuda_graphs)
    blocks = _blocks(model)
    for block in blocks:
        if getattr(block, "_ltxbot_compiled", False):
            continue
        block.forward = _block_forward(compiled, block)
        block._ltxbot_compiled = True  # type: ignore[assignment]
    if cuda_graphs and not getattr(model, "_ltxbot_graph_steps", False):
        model.register_forward_pre_hook(_new_cuda_graph_step)
        model._ltxbot_graph_steps = True  # type: ignore[assignment]
    log.info("compiled transformer blocks: %d through one function%s", len(blocks),
             ", replayed as CUDA graphs" if cuda_graphs else "")
    return len(blocks)


def prepare_transformer(
    transformer: Any, *, scaled_mm: bool = False, compile_blocks: bool = False, cache_dir: Path | None = None,
    cuda_graphs: bool = False,
) -> Any:
    """A freshly built transformer with the job's speed settings applied (fp8 matmul, then compile)."""
    if scaled_mm:
        log.info("fp8 scaled-mm Linears: %d", use_scaled_mm(transformer))
    if compile_blocks:
        compile_transformer_blocks(transformer, cache_dir, cuda_graphs=cuda_graphs)
    return transformer
