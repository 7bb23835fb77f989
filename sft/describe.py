"""What the config schema and the plugins say about themselves: keys with their types,
defaults, choices and help, for the reference docs (:mod:`.docgen`) and ``sft plugins NAME``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sft.core.interfaces import KINDS

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.plugins import PluginManager

__all__ = ["ConfigKey", "schema_keys", "plugin_entries", "yaml_value"]


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of the config schema as the reference shows it."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    #: the bounds of a number (``{"ge": 0, "lt": 1}``), or None
    range: dict[str, float] | None = None
    #: a plain name, never a path
    name: bool = False


def _type_name(f: dataclasses.Field) -> str:
    # Config dataclasses use `from __future__ import annotations`, so types are strings already.
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("typing.", "")


def schema_keys(node: "DictConfig", prefix: str = "") -> list[ConfigKey]:
    """Every leaf of a structured config node (the whole schema, or one plugin's options)."""
    from omegaconf import OmegaConf

    from sft.core.config import iter_schema_fields

    keys = []
    for key, f, value in iter_schema_fields(node, prefix):
        default = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        meta = f.metadata or {}
        keys.append(ConfigKey(key, _type_name(f), default, meta.get("help") or "", meta.get("choices"),
                              meta.get("range"), bool(meta.get("name"))))
    return keys


def plugin_entries(pm: "PluginManager", query: str) -> list[dict[str, Any]]:
    """What ``sft plugins NAME`` shows: every registered object named ``query`` (``dolly``, ``gguf``),
    or every object of the plugin (entry point) named ``query`` (``sft_plugin_example.dolly``).

    Each entry: kind, name, config key of its options, description, version, the plugin and
    distribution it comes from, and its options (key, type, default, choices, help)."""
    from omegaconf import OmegaConf

    infos = {p.name: p for p in pm.listing()}
    entries = []
    for kind, (_hook, _iface, section) in KINDS.items():
        for name, obj in sorted(pm.registry(kind).items()):
            owner = pm.owner(kind, name)
            if query not in (name, owner):
                continue
            info = infos.get(owner or "")
            options = schema_keys(OmegaConf.structured(obj.options), f"{section}.{name}.") if obj.options else []
            entries.append({
                "kind": kind,
                "name": name,
                "options_key": f"{section}.{name}" if obj.options is not None else None,
                "description": obj.description,
                "version": obj.version,
                "plugin": owner,
                "distribution": info.distribution if info else None,
                "distribution_version": info.version if info else None,
                "options": [{"key": k.key, "type": k.type, "default": k.default,
                             "choices": list(k.choices) if k.choices else None, "help": k.help} for k in options],
            })
    return entries


def yaml_value(value: Any) -> str:
    """A default as it would be written in YAML, on one line."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("\n...")].strip() if text.endswith("...") else text
