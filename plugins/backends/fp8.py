"""``model.method: fp8``: the frozen base held in FP8 and multiplied on Hopper's FP8 tensor cores.

What the backends share for the FP8 base (docs/training.md#fp8-base, docs/benchmarks.md):

- each LoRA-wrapped linear layer's base weight is quantized once, after the adapters are
  attached, to float8 e4m3 with one float32 scale per output row (``weight_scale``, shape
  ``[out, 1]``: the row's absolute maximum over 448); layers whose sides are not multiples of
  16 (what the FP8 matrix product needs) stay in 16 bits, and are counted;
- the forward multiplies with ``torch._scaled_mm``: the activations are quantized per token
  (row) on the fly, their scales and the weight's rows applied in the product's epilogue,
  the result in bf16;
- the backward (input gradient only: the base is frozen) is an FP8 product too: the weight's
  row scales are folded into the output gradient before it is quantized per token, and the
  weight goes in transposed (an FP8 copy per use, a quarter of the cost of dequantizing to bf16);
- the LoRA matrices, norms, attention and the loss stay in bf16.

The Unsloth backend keeps Unsloth's fused LoRA kernels, which already read an e4m3 weight with a
``weight_scale`` (their forward runs on FP8 tensor cores, their backward dequantizes to bf16);
``SFT_FP8_KERNELS=sft`` in the environment routes its layers through this module's product instead
(PEFT's unfused LoRA, FP8 forward and backward) for comparison. The transformers backend always
uses this module's product.

Nothing here imports torch at module level; the kernels are built on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FP8_MAX", "MIN_CAPABILITY", "Fp8Conversion", "convert_lora_base_to_fp8", "fp8_linear",
           "quantize_rows", "quantize_weight", "fp8_kernels_choice"]

#: Largest finite float8 e4m3 (``torch.float8_e4m3fn``) value.
FP8_MAX = 448.0
#: Row-wise scaled FP8 products (``torch._scaled_mm`` with per-row scales) need Hopper (sm_90) or newer.
MIN_CAPABILITY = (9, 0)
#: Both sides of an FP8 product must be multiples of this.
ALIGN = 16


@dataclass
class Fp8Conversion:
    """What :func:`convert_lora_base_to_fp8` did: layers converted, those left in 16 bits, bytes."""

    converted: int = 0
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def describe(self) -> str:
        gib = 1024**3
        text = (f"model.method=fp8: {self.converted} base linear layers in float8 e4m3 with per-row scales "
                f"({self.bytes_before / gib:.2f} GiB -> {self.bytes_after / gib:.2f} GiB)")
        if self.skipped:
            shown = ", ".join(self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
            text += f"; {len(self.skipped)} left in 16 bits (a side not a multiple of {ALIGN}: {shown})"
        return text + "; " + EXPERIMENTAL

#: Said with every FP8 conversion (run with SFT_FP8_UNGATED=1) until the quality gate (tests/gpu/test_fp8_gpu.py)
#: passes on a Hopper GPU.
EXPERIMENTAL = ("experimental: it failed its quality gate against bf16 LoRA on an H100 "
                "(docs/benchmarks.md#fp8-base-issue-29)")


def fp8_kernels_choice() -> str:
    """``unsloth`` (Unsloth's fused kernels, the default) or ``sft`` (this module's product), from ``SFT_FP8_KERNELS``."""
    import os

    value = os.environ.get("SFT_FP8_KERNELS", "unsloth").strip().lower()
    return value if value in ("unsloth", "sft") else "unsloth"


@functools.lru_cache(maxsize=1)
def _triton_quantizer() -> Any:
    """The fused per-row quantizer for CUDA tensors (imports triton)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows_kernel(x_ptr, col_ptr, q_ptr, s_ptr, K, stride_x, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL:
            x = x * tl.load(col_ptr + offs, mask=mask, other=0.0)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    def quantize_rows_cuda(x: Any, col: Any = None) -> tuple[Any, Any]:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, k = x.shape
        q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        if rows:
            block = triton.next_power_of_2(k)
            warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
            _quant_rows_kernel[(rows,)](x, col if col is not None else x, q, scale, k, x.stride(0),
                                        HAS_COL=col is not None, BLOCK=block, num_warps=warps)
        return q, scale

    return quantize_rows_cuda


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """Build the quantizers and the autograd function once (imports torch; triton on first CUDA use)."""
    import torch

    def quantize_rows_reference(x: Any, col: Any = None) -> tuple[Any, Any]:
        """What the Triton kernel computes, in torch ops (CPU tensors, and the GPU test's reference)."""
        x = x.float()
        if col is not None:
            x = x * col.float()
        scale = torch.clamp(x.abs().amax(dim=1, keepdim=True) / FP8_MAX, min=1e-12)
        return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

    def quantize_rows(x: Any, col: Any = None) -> tuple[Any, Any]:
        """Quantize a 2-D tensor per row to e4m3: (q, scale[rows, 1] float32), x ~ q * scale.

        ``col`` (float32, one per column) multiplies the columns first (fused on CUDA).
        """
        if x.is_cuda:
            return _triton_quantizer()(x, col)
        return quantize_rows_reference(x, col)

    class Fp8Matmul(torch.autograd.Function):
        """y = x @ (q * scale).T for a frozen e4m3 weight ``q`` [out, in] with row scales ``scale`` [out, 1]."""

        @staticmethod
        def forward(ctx, x, weight, weight_scale):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            xq, xs = quantize_rows(x2)
            out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1),
                                   out_dtype=x.dtype, use_fast_accum=True)
            ctx.save_for_backward(weight, weight_scale)
            ctx.shape = shape
            return out.view(*shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            weight, weight_scale = ctx.saved_tensors
            g2 = grad.reshape(-1, grad.shape[-1])
            # dX = dY @ (q * s) = (dY * s^T) @ q: fold the row scales into dY, then one FP8 product.
            gq, gs = quantize_rows(g2, weight_scale.view(-1))
            weight_t = weight.t().contiguous()  # [in, out]; its .t() is the column-major operand
            ones = torch.ones((1, weight.shape[1]), dtype=torch.float32, device=grad.device)
            dx = torch._scaled_mm(gq, weight_t.t(), scale_a=gs, scale_b=ones, out_dtype=grad.dtype,
                                  use_fast_accum=False)
            return dx.view(*ctx.shape), None, None

    class Fp8Linear(torch.nn.Module):
        """A frozen linear layer whose weight is e4m3 with per-row float32 scales.

        ``weight`` (a Parameter that never trains) and ``weight_scale`` are what Unsloth's fused
        LoRA kernels read for an FP8 base; ``forward`` is :class:`Fp8Matmul`.
        """

        def __init__(self, linear: Any) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            q, s = quantize_weight(linear.weight.data)
            self.weight = torch.nn.Parameter(q, requires_grad=False)
            self.register_buffer("weight_scale", s, persistent=False)
            self.bias = linear.bias  # kept in its own dtype (None for Llama-style models)

        def forward(self, x):
            if self.weight.dtype != torch.float8_e4m3fn:
                raise RuntimeError(f"an FP8 base layer's weight became {self.weight.dtype} (was the model cast "
                                   "with .to(dtype)?); model.method=fp8 keeps it in float8_e4m3fn")
            out = Fp8Matmul.apply(x, self.weight, self.weight_scale)  # in x's dtype
            return out + self.bias if self.bias is not None else out

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn, per-row scales"

    def quantize_weight(w: Any) -> tuple[Any, Any]:
        """(e4m3 weight [out, in], float32 scale [out, 1]) with w ~ q * scale, one scale per output row."""
        amax = w.abs().amax(dim=1, keepdim=True).float()
        scale = torch.clamp(amax / FP8_MAX, min=1e-12)
        q = (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, scale

    return type("Fp8Kernels", (), {"quantize_rows": staticmethod(quantize_rows),
                                   "quantize_rows_reference": staticmethod(quantize_rows_reference), "Fp8Matmul": Fp8Matmul,
                                   "Fp8Linear": Fp8Linear, "quantize_weight": staticmethod(quantize_weight)})


def quantize_rows(x: Any, col: Any = None) -> tuple[Any, Any]:
    """Per-row e4m3 quantization of a 2-D CUDA tensor (a fused Triton kernel): ``(q, scale[rows, 1])``."""
    return _kernels().quantize_rows(x, col)


def quantize_weight(w: Any) -> tuple[Any, Any]:
    """Per-output-row e4m3 quantization of a weight: ``(q [out, in], scale [out, 1] float32)``."""
    return _kernels().quantize_weight(w)


def fp8_linear(x: Any, weight: Any, weight_scale: Any) -> Any:
    """``x @ (weight * weight_scale).T`` on FP8 tensor cores, differentiable in ``x``."""
    return _kernels().Fp8Matmul.apply(x, weight, weight_scale)


def convert_lora_base_to_fp8(model: Any) -> Fp8Conversion:
    """Replace the base ``nn.Linear`` of every LoRA layer of ``model`` with an FP8 one (in place).

    Called after the adapters are attached, so PEFT created them beside a 16-bit layer (in its
    dtype); the 16-bit weights are freed layer by layer.
    """
    import torch

    kernels = _kernels()
    report = Fp8Conversion()
    for name, module in list(model.named_modules()):
        base = module._modules.get("base_layer") if hasattr(module, "lora_A") else None
        if base is None or not isinstance(base, torch.nn.Linear) or isinstance(base, kernels.Fp8Linear):
            continue
        if base.in_features % ALIGN or base.out_features % ALIGN:
            report.skipped.append(name)
            continue
        report.bytes_before += base.weight.numel() * base.weight.element_size()
        fp8 = kernels.Fp8Linear(base)
        report.bytes_after += fp8.weight.numel() + fp8.weight_scale.numel() * 4
        module.base_layer = fp8
        report.converted += 1
        del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def use_sft_kernels_under_unsloth(model: Any) -> int:
    """Put PEFT's forwards back where Unsloth installed a fused LoRA kernel, so that every base
    product is :class:`Fp8Linear`'s (FP8 forward and input gradient). Returns the projections changed.

    The same switch as Unsloth's own for FSDP (``_decline_fused_lora_for_fsdp``): ``apply_qkv`` /
    ``apply_o`` back to Unsloth's unfused versions, a fused MLP ``forward`` (or ``_unsloth_forward``)
    back to its class's.
    """
    from unsloth.models import llama as unsloth_llama

    fused_mlps = getattr(unsloth_llama, "_FUSED_LORA_MLPS", ())
    changed = 0
    for module in model.modules():
        if getattr(module, "apply_qkv", None) is unsloth_llama.apply_lora_qkv:
            module.apply_qkv = unsloth_llama.original_apply_qkv
            changed += 1
        if getattr(module, "apply_o", None) is unsloth_llama.apply_lora_o:
            module.apply_o = unsloth_llama.original_apply_o
            changed += 1
        for name in ("forward", "_unsloth_forward"):
            func = getattr(module.__dict__.get(name), "__func__", None)
            if getattr(func, "func", func) not in fused_mlps:
                continue
            if name == "forward":
                delattr(module, "forward")
            else:
                module._unsloth_forward = module.__class__.forward
            changed += 1
    return changed
