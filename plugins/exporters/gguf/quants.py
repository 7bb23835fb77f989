"""The GGUF quant types the exporter offers, and which tool makes each."""

from __future__ import annotations

__all__ = ["PYTHON_QUANTS", "LLAMA_CPP_QUANTS", "ALL_QUANTS", "quant_bits"]

#: Quant types written here in pure Python: name -> (GGMLQuantizationType name, LlamaFileType name).
PYTHON_QUANTS: dict[str, tuple[str, str]] = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
#: Quant types made by llama.cpp's quantizer from the F16 file: name -> llama_cpp ftype constant.
LLAMA_CPP_QUANTS: dict[str, str] = {
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
ALL_QUANTS: tuple[str, ...] = (*PYTHON_QUANTS, *LLAMA_CPP_QUANTS)

#: Approximate bits per weight, for the disk preflight (llama.cpp's own figures, rounded up).
_BITS = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q2_k": 3.4, "q3_k_m": 4.0, "q4_k_m": 5.0, "q5_k_m": 5.7, "q6_k": 6.6}


def quant_bits(quant: str) -> float:
    """Approximate bits per weight of ``quant`` (for size estimates)."""
    return _BITS[quant]
