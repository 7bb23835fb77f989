"""Training backends: choosing one, and the settings every backend reads the same way.

``model.backend: auto`` picks the available backend with the highest ``priority`` (Unsloth
on CUDA, else plain transformers); a named backend that cannot run here is a config error
that says why. Nothing here imports torch at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from .env import Environment
    from .interfaces import TrainingBackend
    from .plugins import PluginManager

__all__ = ["select_backend", "lora_settings", "resolve_dtype", "notice"]


def notice(message: str) -> None:
    """A one-line notice on stderr (a fallback or a choice the user did not make)."""
    import sys

    print(f"[sft] {message}", file=sys.stderr)


def select_backend(cfg: Any, pm: "PluginManager", env: "Environment") -> "TrainingBackend":
    """The backend ``cfg.model.backend`` names, or the best available one for ``auto``."""
    from .config import plugin_options

    registry = pm.registry("backend")
    name = cfg.model.backend
    if name != "auto":
        backend = pm.get("backend", name, "model.backend")
        reason = backend.unsupported_reason(env, plugin_options(cfg, "backend", name, pm))
        if reason:
            raise ConfigError([ConfigProblem("model.backend", f"backend '{name}' cannot run here: {reason}")])
        return backend
    reasons = []
    for backend in sorted(registry.values(), key=lambda b: -b.priority):
        reason = backend.unsupported_reason(env, plugin_options(cfg, "backend", backend.name, pm))
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise ConfigError([ConfigProblem(
        "model.backend", "no training backend can run here" + (f" ({'; '.join(reasons)})" if reasons else
                                                              " (none is registered)"))])


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


def resolve_dtype(cfg: Any, env: "Environment") -> Any:
    """The torch dtype for ``model.dtype``: auto is bf16 (or fp16) on CUDA, fp32 on CPU."""
    import torch

    name = cfg.model.dtype
    if name == "auto":
        if not env.cuda:
            return torch.float32
        return torch.bfloat16 if env.bf16 else torch.float16
    return getattr(torch, name)
