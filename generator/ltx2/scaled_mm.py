"""``generator.quantization: fp8_scaled_mm``: the blocks' Linears multiply in fp8 on the tensor cores.

ltx-core 1.0.0's own ``fp8_scaled_mm`` policy calls TensorRT-LLM ops that do not exist here,
so this is our own Linear. The transformer is built exactly as for ``fp8_cast`` (the same
float8_e4m3fn weights, the same LoRA fusion into them); each fp8 Linear of the blocks is then
swapped for :class:`ScaledMMLinear`, which quantizes its input per row (one scale per token)
and calls ``torch._scaled_mm`` with row-wise scales, where fp8_cast widens the whole weight
to bf16 on every call. The weights keep their names, dtype and values, so stage 2 fuses the
distilled LoRA into them as before. The only new rounding is the activations' (docs/DESIGN.md,
'Native fp8 matmul').
"""

from __future__ import annotations

import torch

from generator.checks import UnsupportedOnDeviceError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
MIN_CAPABILITY = (8, 9)


class ScaledMMUnsupportedError(UnsupportedOnDeviceError):
    """The device has no fp8 tensor cores."""


def check_device(device: torch.device) -> None:
    """Refuse, naming the setting, where ``torch._scaled_mm`` cannot run the blocks' matmuls."""
    if device.type != "cuda":
        raise ScaledMMUnsupportedError(
            "generator.quantization fp8_scaled_mm needs an NVIDIA GPU with fp8 tensor cores "
            "(compute capability 8.9 or newer); this job runs on the CPU. Use fp8_cast or bf16."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ScaledMMUnsupportedError(
            f"generator.quantization fp8_scaled_mm needs compute capability 8.9 or newer (Ada, Hopper, "
            f"Blackwell); the {name} has {capability[0]}.{capability[1]}. Use fp8_cast or bf16."
        )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 values and their per-row float32 scales of a 2-D tensor (``x ~ q * scale``)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class ScaledMMLinear(torch.nn.Linear):
    """A Linear whose float8_e4m3fn weight multiplies fp8 inputs; output in the input's dtype.

    A subclass of ``Linear`` with the same ``weight`` and ``bias`` parameters, so state-dict
    keys, LoRA fusion and the VRAM streaming hooks see the layer they expect.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale_x = quantize_rows(x.reshape(-1, shape[-1]))
        # The weight was cast to fp8 without a scale (fp8_cast's downcast): its scale is one per row.
        ones = torch.ones((1, self.out_features), dtype=torch.float32, device=x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale_x, scale_b=ones, bias=bias, out_dtype=out_dtype)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


def use_scaled_mm(model: torch.nn.Module) -> int:
    """Swap every fp8 ``Linear`` of ``model`` (the transformer blocks' ones) for ScaledMMLinear; how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == FP8:
            # ltx-core's fp8_cast put an upcasting forward on the instance; the class's forward replaces it.
            module.__dict__.pop("forward", None)
            module.__dict__.pop("original_forward", None)
            module.__class__ = ScaledMMLinear
            swapped += 1
    return swapped
