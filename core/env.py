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

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"


@functools.lru_cache(maxsize=1)
def current_environment() -> Environment:
    import torch

    if torch.cuda.is_available():
        return Environment(cuda=True, bf16=torch.cuda.is_bf16_supported(), device_name=torch.cuda.get_device_name(0))
    return Environment(cuda=False, bf16=False, device_name="cpu")
