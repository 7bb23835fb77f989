"""Adapters whose initialisation changes the base weights (PiSSA, OLoRA) saved so they load onto the original base.

``lora.init_lora_weights=pissa`` (or ``olora``) moves the weight's principal part into the
adapter and leaves the residual in the base model being trained; an adapter saved as it is
would only be right on that residual base, which no one else has. PEFT's remedy, used here:
keep the adapter as it started (:func:`remember_initial_adapter`, right after LoRA is attached),
and save the trained one with ``path_initial_model_for_weight_conversion`` (:func:`save_adapter`):
PEFT writes the difference as a plain LoRA of rank 2r that applies to the original weights, so
the merged model, the GGUF and ``PeftModel.from_pretrained(base, adapter)`` are all right.
Checkpoints keep the unconverted adapter, which ``--resume`` loads onto the same decomposition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.core.rundir import remove_inside

__all__ = ["remember_initial_adapter", "save_adapter", "forget_initial_adapter"]

#: Inits whose adapters need the conversion (PEFT's own test: the value starts with one of these).
_CONVERTED = ("pissa", "olora")


def remember_initial_adapter(model: Any, folder: Path) -> Path | None:
    """Save ``model``'s adapter as it starts into ``folder`` when its init needs the conversion; else None.

    The copy says ``init_lora_weights: true``: PEFT refuses an initial adapter that would
    decompose the (already residual) weights a second time when it is loaded. PEFT loads it
    under the folder's name, so that name must be a valid adapter name (no ``.``).
    """
    config = getattr(model, "peft_config", {}).get("default")
    init = getattr(config, "init_lora_weights", True)
    if not isinstance(init, str) or not init.startswith(_CONVERTED):
        return None
    remove_inside(folder.parent, folder)
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init
    return folder


def save_adapter(model: Any, folder: str | Path, initial: Path | None = None, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, **kwargs)``, converted for the original base when ``initial`` is given.

    PEFT warns, while loading the initial adapter for the conversion, that PiSSA adapters should
    be converted: that warning is about the very step being taken, so it is not shown.
    """
    import warnings

    if initial is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(initial)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
        model.save_pretrained(str(folder), **kwargs)


def forget_initial_adapter(initial: Path | None) -> None:
    """Remove the initial adapter once the converted one is written."""
    if initial is not None:
        remove_inside(initial.parent, initial)
