"""Presets: named training recipes that sit underneath a config.

The schema in :mod:`sft.core.config` has one set of defaults, those documented in
docs/configuration.md and meant for a real dataset. A recipe tuned for one model and one
dataset is a *preset*: ``preset: NAME`` (in the YAML or as ``preset=NAME``) applies its
values beneath the YAML, the CLI flags and the ``key=value`` overrides, and it stays visible
in the run's ``config.yaml``, ``summary.json`` and the run log.

``sft run`` (and :func:`sft.train`) with neither a config file nor a dataset selects the
``embedded`` preset: the embedded model (``sft:smollm2``) on the embedded data
(``sft:identity``) with the recipe that teaches it its new name in about a minute on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["Preset", "PRESETS", "EMBEDDED_PRESET", "implied_preset", "preset_values", "describe_preset"]


@dataclass(frozen=True)
class Preset:
    description: str
    #: dotted key -> value, applied beneath everything the user sets.
    values: Mapping[str, Any]


EMBEDDED_PRESET = "embedded"

PRESETS: dict[str, Preset] = {
    EMBEDDED_PRESET: Preset(
        "the embedded default: 60 short rows teach the 135M model its new name in about a minute on a 2-core CPU",
        {
            "training.num_train_epochs": 4.0,
            "training.learning_rate": 1e-3,
            "training.per_device_train_batch_size": 8,
            "training.gradient_accumulation_steps": 1,
            "training.warmup_steps": 3,
            "training.lr_scheduler_type": "linear",
            "training.save_steps": 10,
        },
    ),
}


def implied_preset(path: str | None, overrides: Iterable[str], flags: Mapping[str, Any] | None) -> str | None:
    """The preset a run gets without asking: ``embedded`` when there is no config file, no
    dataset and no preset among the flags and overrides; else None."""
    keys = {str(o).split("=", 1)[0].strip() for o in overrides} | set(flags or {})
    if path or keys & {"data.dataset", "preset", "data.datasets"}:
        return None
    return EMBEDDED_PRESET


def preset_values(name: str) -> dict[str, Any]:
    """The nested mapping of preset ``name``'s values (KeyError for an unknown one)."""
    nested: dict[str, Any] = {}
    for key, value in PRESETS[name].values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def describe_preset(name: str, cfg: Any = None) -> str:
    """One line for the run log: the preset, what it is for and the values in force."""
    from omegaconf import OmegaConf

    preset = PRESETS[name]
    shown = []
    for key, value in preset.values.items():
        actual = OmegaConf.select(cfg, key) if cfg is not None else value
        shown.append(f"{key.split('.')[-1]}={actual:g}" if isinstance(actual, float) else f"{key.split('.')[-1]}={actual}")
    return (f"preset '{name}' ({preset.description}): {', '.join(shown)}; "
            f"your YAML, flags and key=value override it")
