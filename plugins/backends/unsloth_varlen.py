"""Packed (padding-free) attention for the Unsloth backend: torch's varlen flash kernel on torch 2.11.

Unsloth feeds packed batches (one row of many documents, ``packed_seq_lengths``) to
``torch.nn.attention.varlen.varlen_attn`` only when that function takes ``enable_gqa``
(torch >= 2.12). On torch 2.11 it has the kernel but not the argument, and without
flash-attn or a loadable xformers Unsloth falls back to one SDPA call per run of equal
document lengths. Chat-length documents are all of different lengths, so that is one SDPA
launch per document per layer and pass, and the GPU waits on the host: a packed 8 x 2048
step of an 8B QLoRA model took 5.7 s instead of 1.44 s for fixed-length rows, with the GPU
busy 1.8 s of it (see docs/benchmarks.md, "Packed and padded chat data").

:func:`enable_varlen_gqa` gives Unsloth's dispatcher a ``varlen_attn`` that takes
``enable_gqa`` (the kernel itself handles fewer key/value heads; only the flag is missing).
Everything else stays Unsloth's: which batches take varlen, the cu_seqlens with the padding
tail, the int32 guard. It touches one private name,
``unsloth.utils.attention_dispatch._TORCH_VARLEN_ATTN``, so it only acts on the Unsloth
versions it was checked against (:data:`CHECKED_UNSLOTH`) and only while that name is None;
``tests/gpu/test_packing_cuda.py`` checks the result against each document run alone.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["CHECKED_UNSLOTH", "enable_varlen_gqa", "varlen_with_gqa"]

#: Unsloth releases whose ``attention_dispatch`` reads ``_TORCH_VARLEN_ATTN`` as this module expects.
CHECKED_UNSLOTH = ("2026.10.7",)


def varlen_with_gqa(varlen_attn: Callable[..., Any]) -> Callable[..., Any]:
    """``varlen_attn`` with an ``enable_gqa`` keyword: (T, H, D) queries over (T, H_kv, D) keys/values.

    torch 2.11's flash kernel already reads query head h from key/value head h // (H / H_kv)
    (as SDPA's ``enable_gqa`` does); its Python signature only lacks the flag. Measured on an
    H200, 8 x 2048 chat-length tokens, 32/8 heads: 2.62 ms forward+backward with K/V as they
    are, 2.89 ms with the heads repeated, equal outputs (docs/benchmarks.md).
    """

    def attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, enable_gqa: bool = False, **kwargs):
        heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads != heads and (not enable_gqa or heads % kv_heads):
            raise ValueError(f"{heads} query heads over {kv_heads} key/value heads needs enable_gqa=True "
                             f"and a whole number of query heads per key/value head")
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)

    attention.__wrapped__ = varlen_attn  # type: ignore[attr-defined]
    return attention


def enable_varlen_gqa() -> str | None:
    """Route Unsloth's packed attention through torch's varlen kernel where Unsloth would loop over segments.

    Call after ``import unsloth``. Returns a one-line description of what was changed, or None
    when nothing needed changing or this Unsloth/torch is not one it applies to.
    """
    import inspect
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch >= 2.12 takes enable_gqa and Unsloth uses it directly; older builds lack the window.
    if "enable_gqa" in params or "window_size" not in params:
        return None
    if not torch.cuda.is_available() or not torch.backends.cuda.is_flash_attention_available():
        return None
    try:
        unsloth_version = version("unsloth")
    except PackageNotFoundError:
        return None
    if unsloth_version not in CHECKED_UNSLOTH:
        return None
    from unsloth.utils import attention_dispatch

    if getattr(attention_dispatch, "_TORCH_VARLEN_ATTN", False) is not None:
        return None  # Unsloth found a kernel itself, or its dispatcher changed shape
    attention_dispatch._TORCH_VARLEN_ATTN = varlen_with_gqa(varlen_attn)
    return (f"packed batches use torch {torch.__version__.split('+')[0]}'s varlen flash attention "
            f"instead of Unsloth {unsloth_version}'s per-segment SDPA loop")
