"""What the bundled training backends share: the ``lora`` config section as PEFT and Unsloth name it."""

from __future__ import annotations

from typing import Any

__all__ = ["lora_settings"]


def lora_settings(cfg: Any) -> dict[str, Any]:
    """The LoRA settings from the ``lora`` section, as PEFT and Unsloth name them.

    ``target_modules: [all-linear]`` stays the string ``"all-linear"`` (PEFT's own shortcut);
    a backend that lacks it expands it itself.
    """
    lora = cfg.lora
    targets = [str(t) for t in lora.target_modules]
    loftq = lora.loftq_config
    if loftq is not None and not isinstance(loftq, dict):
        from omegaconf import OmegaConf

        loftq = OmegaConf.to_container(loftq)
    return {
        "r": int(lora.r),
        "lora_alpha": int(lora.lora_alpha),
        "lora_dropout": float(lora.lora_dropout),
        "target_modules": "all-linear" if targets == ["all-linear"] else targets,
        "use_rslora": bool(lora.use_rslora),
        "bias": str(lora.bias),
        "loftq_config": dict(loftq) if loftq else None,
    }
