"""What the bundled training backends share: the ``lora`` config section as PEFT and Unsloth name it."""

from __future__ import annotations

from typing import Any

__all__ = ["lora_settings", "load_trainable_adapter"]


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


def load_trainable_adapter(model: Any, adapter_dir: Any) -> Any:
    """A finished run's PEFT adapter on ``model``, trainable (what ``model.from_run`` continues).

    The adapter keeps everything it was trained with (its rank, targets and any trained token
    rows), so training goes on from exactly that model. PEFT names it ``default``: the
    preference trainers' reference copy of it (TRL's ``ref`` adapter) is made from that one.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
