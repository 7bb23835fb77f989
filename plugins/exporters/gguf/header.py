"""Reading a GGUF file's header (metadata and tensor types) without parsing its arrays."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from sft.core.errors import SftError

__all__ = ["read_gguf_header", "gguf_tensor_types"]


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(metadata, tensor types)`` of a little-endian GGUF, read straight from its header.

    Metadata arrays are returned as their length (``{"array": n}``), so a 100k-token
    vocabulary is skipped, not parsed: ``gguf.GGUFReader`` builds every array element and
    takes seconds on one. Tensor types are ggml type names (``Q4_K``, ``Q5_0`` ...).
    """
    import gguf

    def scalar(f: Any, vtype: int) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string(f: Any) -> str:
        return f.read(scalar(f, 10)).decode("utf-8", errors="replace")

    def skip(f: Any, vtype: int, count: int) -> None:
        if vtype == 8:
            for _ in range(count):
                f.seek(scalar(f, 10), 1)
        elif vtype == 9:
            for _ in range(count):
                inner, n = scalar(f, 4), scalar(f, 10)
                skip(f, inner, n)
        else:
            f.seek(struct.calcsize(_SCALAR_FORMATS[vtype]) * count, 1)

    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SftError(f"{path}: not a GGUF file")
        scalar(f, 4)  # version
        n_tensors, n_kv = scalar(f, 10), scalar(f, 10)
        for _ in range(n_kv):
            key = string(f)
            vtype = scalar(f, 4)
            if vtype == 8:
                metadata[key] = string(f)
            elif vtype == 9:
                inner, n = scalar(f, 4), scalar(f, 10)
                skip(f, inner, n)
                metadata[key] = {"array": n}
            else:
                metadata[key] = scalar(f, vtype)
        for _ in range(n_tensors):
            name = string(f)
            n_dims = scalar(f, 4)
            f.seek(8 * n_dims, 1)
            types[name] = gguf.GGMLQuantizationType(scalar(f, 4)).name
            scalar(f, 10)  # offset
    return metadata, types


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name (``Q4_K``, ``Q5_0`` ...), read from the file header."""
    return read_gguf_header(path)[1]
