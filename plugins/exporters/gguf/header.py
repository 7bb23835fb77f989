"""Reading a GGUF file's header (metadata and tensor types) without parsing its arrays.

The walk itself, with every count bounded by the file's size, is the engine's
(:func:`sft.engine.model_files.read_gguf_header`): sft reads received GGUFs with it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.core.errors import SftError
from sft.engine.model_files import read_gguf_header as _read_header

__all__ = ["read_gguf_header", "gguf_tensor_types"]


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(metadata, tensor types)`` of a little-endian GGUF, read straight from its header.

    Metadata arrays are returned as their length (``{"array": n}``), so a 100k-token
    vocabulary is skipped, not parsed: ``gguf.GGUFReader`` builds every array element and
    takes seconds on one. Tensor types are ggml type names (``Q4_K``, ``Q5_0`` ...).
    """
    import gguf

    metadata, tensors = _read_header(path)
    types: dict[str, str] = {}
    for name, (type_id, _shape) in tensors.items():
        try:
            types[name] = gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            raise SftError(f"{path}: tensor {name!r} has an unknown ggml type {type_id}") from None
    return metadata, types


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name (``Q4_K``, ``Q5_0`` ...), read from the file header."""
    return read_gguf_header(path)[1]
