"""What hardware this process runs on. Computed lazily: it imports torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["Environment", "current_environment"]


@dataclass(frozen=True)
class Environment:
    cuda: bool
    bf16: bool
    device_name: str
    #: The first GPU's CUDA compute capability, e.g. (9, 0) for Hopper; None without CUDA.
    capability: tuple[int, int] | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def fp8(self) -> bool:
        """Whether the GPU multiplies float8 with per-row scales on its tensor cores (Hopper, sm_90, and newer)."""
        return self.cuda and self.capability is not None and tuple(self.capability) >= (9, 0)


@functools.lru_cache(maxsize=1)
def current_environment() -> Environment:
    import torch

    if torch.cuda.is_available():
        return Environment(cuda=True, bf16=torch.cuda.is_bf16_supported(), device_name=torch.cuda.get_device_name(0),
                           capability=tuple(torch.cuda.get_device_capability(0)))
    return Environment(cuda=False, bf16=False, device_name="cpu")
