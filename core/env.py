"""What hardware this process runs on. Computed lazily: it imports torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["Environment", "current_environment", "quiet_known_warnings"]


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


def quiet_known_warnings() -> None:
    """Hide library warnings a user can do nothing about (called where training or generation starts)."""
    import warnings

    # TRL 1.14 and PEFT read a property transformers 5 deprecated.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
