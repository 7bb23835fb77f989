"""Training backends: choosing one, and the dtype that training and every backend agree on.

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

__all__ = ["select_backend", "resolve_dtype"]


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


def resolve_dtype(cfg: Any, env: "Environment") -> Any:
    """The torch dtype for ``model.dtype``: auto is bf16 (or fp16) on CUDA, fp32 on CPU."""
    import torch

    name = cfg.model.dtype
    if name == "auto":
        if not env.cuda:
            return torch.float32
        return torch.bfloat16 if env.bf16 else torch.float16
    return getattr(torch, name)
