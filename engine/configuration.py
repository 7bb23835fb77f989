"""Loading a run's config: YAML, flags and ``key=value`` overrides onto the schema, every problem at once.

The schema (the typed dataclasses, each plugin's options node, :func:`sft.core.config.opt`) is
the core's, what a plugin sees; how a config is read and checked is the engine's:

- :func:`load_config` builds a config from, in increasing precedence, the dataclass defaults,
  a preset, a YAML file, the CLI's shortcut flags (``--template chatml`` ...) and ``key=value``
  overrides, and reports *every* problem in one :class:`ConfigError` (exit 2): unknown keys and
  plugin names with a did-you-mean, values of the wrong type, outside a field's ``choices`` or
  bounds, and combinations that cannot train (:func:`sft.engine.lora_init.check_lora`, added tokens);
- the flat keys people bring from other tools (``learning_rate=``, ``lora_r=``, ``load_in_4bit=``)
  resolve to their dotted key, with a notice;
- old keys are read under their new names (a publisher's ``moved_from``), and a publisher whose
  ``enabled_by`` option is set is turned on.

It imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import FloatNode, StringNode

from sft.core.config import (PLUGIN_NAME_KEYS, DataConfig, build_schema, describe_range, is_plain_name, iter_schema_fields)
from sft.core.errors import ConfigError, ConfigProblem, did_you_mean
from sft.core.presets import PRESETS, preset_values

if TYPE_CHECKING:
    from sft.core.plugins import PluginManager

__all__ = ["load_config", "load_run_config", "given_on_command_line", "confirmed_overrides", "read_yaml", "deep_merge",
           "KEY_ALIASES", "VALUE_ALIASES"]


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([ConfigProblem("", f"config file not found: {path}")])
    try:
        loaded = OmegaConf.load(p)
    except Exception as exc:  # noqa: BLE001 - yaml errors carry the line in their message
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError([ConfigProblem("", f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError([ConfigProblem("", f"{path}: the top level must be a mapping of sections")])
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def _parse_overrides(overrides: Iterable[str], texts: dict[str, tuple[str, Any]] | None = None
                     ) -> tuple[dict, list[ConfigProblem]]:
    """``key=value`` strings as nested values (YAML-typed); ``texts`` collects each key's text and typed value."""
    problems: list[ConfigProblem] = []
    good: list[str] = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            problems.append(ConfigProblem(item, "an override must look like key=value"))
        else:
            good.append(item)
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist(good)) if good else {}
    except OmegaConfBaseException as exc:
        problems.append(ConfigProblem("", f"cannot parse overrides: {exc}"))
        parsed = {}
    if texts is not None and parsed:
        for item in good:
            key, _, text = item.partition("=")
            node: Any = parsed
            for part in key.strip().split("."):
                node = node.get(part) if isinstance(node, dict) else None
            texts[key.strip()] = (text, node)
    return parsed, problems  # type: ignore[return-value]


def _as_written(child: Any, value: Any, written: tuple[str, Any] | None) -> Any:
    """A text key given on the command line keeps its text: YAML 1.1 reads ``0123`` as 83 and ``yes``/``on`` as true.

    Only while ``value`` is still what that text parsed to (a later source may have replaced it);
    ``true``/``false`` stay booleans (the choice keys spell them so), ``null`` stays None.
    """
    if written is None or value is None or written[1] != value:
        return value
    text = written[0]
    takes_text = isinstance(child, StringNode) or (isinstance(child, ListConfig) and isinstance(value, list) and
                                                   getattr(child._metadata, "element_type", None) is str)
    if not takes_text or (isinstance(value, bool) and text.strip().lower() in ("true", "false")):
        return value
    return yaml.load(text, Loader=yaml.BaseLoader)  # every scalar as the text it is


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base`` section by section (``extra`` wins), as config layers stack."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe_type(node: Any) -> str:
    try:
        t = node._metadata.ref_type
        name = getattr(t, "__name__", None) or str(t).replace("typing.", "")
    except AttributeError:
        name = "value"
    return name


#: Names users bring from other tools (Unsloth notebooks, Axolotl, argparse scripts) -> our key.
KEY_ALIASES = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type",
    "warmup": "warmup_steps",
    "max_seq_len": "max_seq_length",
    "sequence_len": "max_seq_length",
    "chat_template": "name",
    "optimizer": "optim",
    "output": "output_dir",
    "new_special_tokens": "add_special_tokens",
    "lora_plus_ratio": "loraplus_lr_ratio",
}


#: Keys of other tools whose *value* translates too: flat key -> (our key, value -> our value).
VALUE_ALIASES = {
    "load_in_4bit": ("model.method", lambda v: "qlora" if v in (True, "true", "True") else "lora"),
}


def _leaf_keys(schema: DictConfig) -> list[str]:
    return [key for key, _f, _v in iter_schema_fields(schema)]


def _flat_key_target(key: str, leaves: Sequence[str]) -> str | None:
    """The one dotted key a flat key from another tool means (``learning_rate`` ->
    ``training.learning_rate``, ``lora_r`` -> ``lora.r``), or None when none or several match."""
    matches = [leaf for leaf in leaves if leaf.rsplit(".", 1)[-1] == key]
    section, _, rest = key.partition("_")
    if rest and f"{section}.{rest}" in leaves:
        matches.append(f"{section}.{rest}")
    matches = list(dict.fromkeys(matches))
    return matches[0] if len(matches) == 1 else None


def _resolve_flat_keys(schema: DictConfig, raw: dict) -> dict:
    """Move top-level keys people type from other tools (``learning_rate=``, ``lora_r=``,
    ``load_in_4bit=``) to their dotted key, with a notice; anything else is left for
    :func:`_apply` to report."""
    from sft.core.notices import notice

    leaves = _leaf_keys(schema)
    out: dict = {}
    moved: list[dict] = []
    for key, value in raw.items():
        if key in schema or isinstance(value, dict):
            out[key] = value
            continue
        given = value
        if key in VALUE_ALIASES:
            target, translate = VALUE_ALIASES[key]
            value = translate(value)
        else:
            target = _flat_key_target(str(key), leaves)
        if target is None:
            out[key] = value
            continue
        notice(f"{key}={given} read as {target}={value} (write that to silence this notice)")
        nested: dict = {}
        node = nested
        *parents, leaf = target.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        moved.append(nested)
    for nested in moved:
        out = deep_merge(out, nested)
    return out


def _suggest_top_level(key: str, schema: DictConfig) -> str:
    """A did-you-mean for an unknown top-level key: an alias's dotted key (``lr`` ->
    ``training.learning_rate``) before a section name that merely looks alike."""
    alias = KEY_ALIASES.get(str(key))
    if alias is not None:
        target = _flat_key_target(alias, _leaf_keys(schema))
        if target is not None:
            return f" (did you mean '{target}'?)"
    return did_you_mean(key, schema.keys())


def _suggest_key(key: str, keys: Iterable[str]) -> str:
    keys = list(keys)
    alias = KEY_ALIASES.get(str(key))
    if alias in keys:
        return f" (did you mean '{alias}'?)"
    return did_you_mean(key, keys)


def _apply(schema: DictConfig, raw: dict, prefix: str, problems: list[ConfigProblem],
           texts: dict[str, tuple[str, Any]] | None = None) -> None:
    """Assign ``raw`` onto ``schema`` key by key so that every bad key or value is reported.

    ``texts``: the command line's ``key=value`` texts (:func:`_parse_overrides`)."""
    texts = texts or {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in schema:
            hint = _suggest_key(key, schema.keys()) if prefix else _suggest_top_level(key, schema)
            problems.append(ConfigProblem(path, f"unknown key{hint}"))
            continue
        child = schema._get_node(key)
        # An Optional[dict] field holding None reports NoneType: it takes a plain value (null or a dict).
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None, type(None)):
            if not isinstance(value, dict):
                problems.append(ConfigProblem(path, f"expected a mapping of options, got {value!r}"))
            else:
                _apply(child, value, path + ".", problems, texts)
            continue
        element = getattr(child._metadata, "element_type", None) if isinstance(child, ListConfig) else None
        if dataclasses.is_dataclass(element) and isinstance(value, list):
            # A list of sections (data.datasets): each item is checked key by key like a section.
            items = []
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    problems.append(ConfigProblem(f"{path}[{i}]", f"expected a mapping of keys, got {item!r}"))
                    continue
                node = OmegaConf.structured(element)
                _apply(node, item, f"{path}[{i}].", problems)
                items.append(node)
            schema[key] = items
            continue
        value = _as_written(child, value, texts.get(path))
        if isinstance(child, FloatNode) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `num_train_epochs=3` is a float field given as an int, as users write it
        if isinstance(child, StringNode) and isinstance(value, bool):
            value = "true" if value else "false"  # `packing: true` in YAML, not OmegaConf's 'True'
        try:
            schema[key] = value
        except OmegaConfBaseException:
            problems.append(ConfigProblem(path, f"expected {_describe_type(child)}, got {value!r}"))


def _check_choices(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    for key, f, value in iter_schema_fields(cfg):
        choices = f.metadata.get("choices") if f.metadata else None
        if not choices or value is None:
            continue
        values = list(value) if isinstance(value, (list, ListConfig)) else [value]
        for v in values:
            if v not in choices:
                problems.append(ConfigProblem(key, f"'{v}' is not one of {', '.join(map(str, choices))}{did_you_mean(v, choices)}"))


def _in_range(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
            and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def _check_ranges(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    """Numbers within their field's bounds, and names that are names (a path would escape runs/ or exports/)."""
    for key, f, value in iter_schema_fields(cfg):
        meta = f.metadata or {}
        bounds = meta.get("range")
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(ConfigProblem(key, f"must be a finite number, got {value!r}"))
        elif bounds and isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, bounds):
            problems.append(ConfigProblem(key, f"must be {describe_range(bounds)}, got {value!r}"))
        if meta.get("name") and value is not None and not is_plain_name(str(value)):
            problems.append(ConfigProblem(key, f"must be a name, not a path (no '/', '\\' or '..'), got {str(value)!r}"
                                               f"{_folder_hint(cfg, key)}"))


def _folder_hint(cfg: DictConfig, key: str) -> str:
    """Where the folder is chosen, when the name's own section has such a key (``training.output_dir``
    for ``training.run_name``); nothing for a name whose section has none (``export.gguf.name``)."""
    section = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, section) if section else cfg
    folders = sorted(k for k in (node.keys() if isinstance(node, DictConfig) else []) if str(k).endswith("_dir"))
    return f"; the folder is set by {section}.{folders[0]}" if folders else ""


def _check_plugin_names(cfg: DictConfig, pm: "PluginManager", problems: list[ConfigProblem]) -> None:
    for key, kind, is_list, extra in PLUGIN_NAME_KEYS:
        value = OmegaConf.select(cfg, key)
        names = list(value) if is_list else [value]
        available = list(pm.registry(kind)) + list(extra)
        for name in names:
            if name not in available:
                failed = [p for p in pm.failures() if name in p.name]
                hint = f"; plugin '{failed[0].name}' failed to load: {failed[0].error}" if failed else ""
                problems.append(ConfigProblem(
                    key, f"unknown {kind.replace('_', ' ')} '{name}'{did_you_mean(name, available)}; "
                         f"available: {', '.join(sorted(available)) or 'none'}{hint}"))
        if is_list and len(set(names)) != len(names):
            problems.append(ConfigProblem(key, f"lists a plugin twice: {list(names)}"))
    formats = list(pm.registry("dataset_format")) + ["auto"]
    for i, source in enumerate(cfg.data.datasets):
        if source.format not in formats:
            problems.append(ConfigProblem(f"data.datasets[{i}].format", f"unknown dataset format '{source.format}'"
                                          f"{did_you_mean(source.format, formats)}; available: {', '.join(sorted(formats))}"))


#: The most a mixed source's rows may be repeated (``data.datasets[i].weight``).
MAX_SOURCE_WEIGHT = 1000


def _check_consistency(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    t, d = cfg.training, cfg.data
    if t.max_steps == 0 or (t.max_steps < 0 and t.num_train_epochs <= 0):
        problems.append(ConfigProblem("training.max_steps", "train for at least one step: set max_steps > 0 or num_train_epochs > 0"))
    if d.test_size > 1 and d.test_size != int(d.test_size):
        problems.append(ConfigProblem("data.test_size", f"a fraction of the rows must be < 1 and a number of rows a "
                                                        f"whole number, got {d.test_size}"))
    if t.eval_strategy in ("steps", "epoch") and d.test_size == 0 and d.eval_split is None:
        problems.append(ConfigProblem("training.eval_strategy", f"'{t.eval_strategy}' needs an eval set: set data.test_size or data.eval_split"))
    if cfg.distributed.num_processes < 1:
        problems.append(ConfigProblem("distributed.num_processes", f"must be at least 1, got {cfg.distributed.num_processes}"))
    for i, source in enumerate(d.datasets):
        if not str(source.path).strip():
            problems.append(ConfigProblem(f"data.datasets[{i}].path", "is empty"))
        if not math.isfinite(source.weight) or not 0 < source.weight <= MAX_SOURCE_WEIGHT:
            # NaN passes every comparison, and a huge weight lists each row that many times in memory.
            problems.append(ConfigProblem(f"data.datasets[{i}].weight", f"must be a number > 0 and <= "
                                                                        f"{MAX_SOURCE_WEIGHT:g}, got {source.weight}"))
    replaced = [key for key, default in (("dataset", DataConfig.dataset), ("format", DataConfig.format),
                                          ("split", DataConfig.split)) if d.datasets and d[key] != default]
    for key in replaced:  # --dataset on the command line would otherwise lose to the YAML's data.datasets unread
        problems.append(ConfigProblem(f"data.{key}", f"is replaced by data.datasets, which is given too: give each "
                                                     f"source its own {'path' if key == 'dataset' else key} there, "
                                                     f"or leave data.datasets out"))
    if d.datasets and d.eval_split is not None:
        problems.append(ConfigProblem("data.eval_split", "is for data.dataset; with data.datasets hold out rows with data.test_size"))
    _check_lora(cfg, problems)
    _check_new_tokens(cfg.model, problems)


#: ``lora.init_lora_weights`` values PEFT has and sft passes on (besides ``pissa_niter_N``).
LORA_INITS = ("true", "false", "gaussian", "pissa", "olora", "loftq")
#: Values PEFT has that need what sft does not do yet, with the reason they are refused.
LORA_INITS_REFUSED = {
    "eva": "EVA initialises the adapters from a pass over the training data (PEFT's initialize_lora_eva_weights), "
           "which sft does not run yet",
    "corda": "CorDA initialises the adapters from covariance statistics collected over data, which sft does not collect",
}
#: Inits that decompose the base weights themselves, so they need them in 16 bits.
DECOMPOSING_INITS = ("pissa", "olora")


def lora_init_kind(value: str) -> str:
    """``pissa_niter_16`` -> ``pissa``; any other value as it is."""
    return "pissa" if value.startswith("pissa_niter_") else value


def _check_lora(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    """The lora keys with PEFT's meaning: values PEFT accepts, and combinations that cannot train."""
    lora, method = cfg.lora, cfg.model.method
    init = str(lora.init_lora_weights)
    niter = init.removeprefix("pissa_niter_")
    if init in LORA_INITS_REFUSED:
        problems.append(ConfigProblem("lora.init_lora_weights", f"'{init}' is not supported: {LORA_INITS_REFUSED[init]}; "
                                                                f"use true, gaussian, pissa, olora or loftq"))
        return
    if init not in LORA_INITS and not (niter != init and niter.isdigit() and int(niter) > 0):
        choices = (*LORA_INITS, "pissa_niter_N")
        problems.append(ConfigProblem("lora.init_lora_weights", f"'{init}' is not one of {', '.join(choices)}"
                                                                f"{did_you_mean(init, choices)}"))
        return
    kind = lora_init_kind(init)
    if method == "full":
        set_keys = [key for key, on in (("lora.use_dora", lora.use_dora), ("lora.init_lora_weights", init != "true"),
                                        ("lora.modules_to_save", len(lora.modules_to_save)),
                                        ("lora.target_parameters", len(lora.target_parameters)),
                                        ("lora.layers_to_transform", len(lora.layers_to_transform)),
                                        ("lora.rank_pattern", len(lora.rank_pattern)),
                                        ("lora.alpha_pattern", len(lora.alpha_pattern)),
                                        ("training.loraplus_lr_ratio", cfg.training.loraplus_lr_ratio is not None))
                    if on]
        for key in set_keys:
            problems.append(ConfigProblem(key, "applies to LoRA, and model.method=full trains every weight without an "
                                               "adapter; use model.method=lora or qlora, or drop the key"))
        return
    if method == "qlora" and kind in DECOMPOSING_INITS:
        problems.append(ConfigProblem("lora.init_lora_weights", f"{init} decomposes the 16-bit base weights (SVD/QR) "
                                                                f"and PEFT cannot do it on a 4-bit QLoRA base; use model.method=lora"))
    if lora.use_dora and kind in DECOMPOSING_INITS:
        problems.append(ConfigProblem("lora.use_dora", f"with lora.init_lora_weights={init}: the trained adapter is "
                                                       f"converted to a plain LoRA for the original base, which PEFT "
                                                       f"cannot do for DoRA's magnitude vectors; choose one of the two"))
    loftq = kind == "loftq" or lora.loftq_config is not None
    if loftq and method == "qlora":
        problems.append(ConfigProblem("lora.loftq_config" if lora.loftq_config is not None else "lora.init_lora_weights",
                                      "LoftQ quantizes the 16-bit base itself while initialising the adapter and "
                                      "cannot start from a 4-bit QLoRA base; use model.method=lora"))
    if lora.loftq_config is not None and init not in ("true", "loftq"):
        problems.append(ConfigProblem("lora.loftq_config", f"is LoftQ's initialisation, but lora.init_lora_weights={init}; "
                                                           f"set lora.init_lora_weights=loftq or drop lora.loftq_config"))
    if lora.layers_pattern is not None and not lora.layers_to_transform:
        problems.append(ConfigProblem("lora.layers_pattern", "names the module list lora.layers_to_transform counts in; "
                                                             "set lora.layers_to_transform too, or drop it"))
    for i, layer in enumerate(lora.layers_to_transform):
        if layer < 0:
            problems.append(ConfigProblem(f"lora.layers_to_transform[{i}]", f"a layer index must be >= 0, got {layer}"))
    for key in ("rank_pattern", "alpha_pattern"):
        for name, value in lora[key].items():
            if value <= 0:
                problems.append(ConfigProblem(f"lora.{key}.{name}", f"must be > 0, got {value}"))
    for key in ("modules_to_save", "target_parameters"):
        names = [str(n) for n in lora[key]]
        for i, name in enumerate(names):
            if not name.strip():
                problems.append(ConfigProblem(f"lora.{key}[{i}]", "is empty"))
        if len(set(names)) != len(names):
            problems.append(ConfigProblem(f"lora.{key}", f"lists a name twice: {names}"))
    overlap = set(map(str, lora.modules_to_save)) & set(map(str, lora.target_modules))
    if overlap:
        problems.append(ConfigProblem("lora.modules_to_save", f"{', '.join(sorted(overlap))} also in lora.target_modules: "
                                                              f"a module is either adapted (LoRA) or trained whole, not both"))


def _check_new_tokens(model: DictConfig, problems: list[ConfigProblem]) -> None:
    """Added tokens: not empty, none twice, and a description for each when they start from one."""
    tokens = [str(t) for t in [*model.add_tokens, *model.add_special_tokens]]
    for key in ("add_tokens", "add_special_tokens"):
        for i, token in enumerate(model[key]):
            if not str(token):
                problems.append(ConfigProblem(f"model.{key}[{i}]", "is empty"))
    twice = sorted({t for t in tokens if tokens.count(t) > 1})
    if twice:
        problems.append(ConfigProblem("model.add_tokens", f"adds {', '.join(map(repr, twice))} twice "
                                                          f"(across model.add_tokens and model.add_special_tokens)"))
    described = {str(k): str(v) for k, v in model.new_token_descriptions.items()}
    for token in described:
        if token not in tokens:
            problems.append(ConfigProblem(f"model.new_token_descriptions.{token}",
                                          f"describes a token that model.add_tokens and model.add_special_tokens do not add"
                                          f"{did_you_mean(token, tokens)}"))
        elif not described[token].strip():
            problems.append(ConfigProblem(f"model.new_token_descriptions.{token}", "is empty"))
    if model.new_token_init == "description":
        missing = [t for t in tokens if t not in described]
        if missing:
            problems.append(ConfigProblem("model.new_token_init", f"description needs model.new_token_descriptions for "
                                                                  f"every added token; missing: {', '.join(map(repr, missing))}"))
        if not tokens:
            problems.append(ConfigProblem("model.new_token_init", "description: model.add_tokens and "
                                                                  "model.add_special_tokens add no token"))
    elif described:
        problems.append(ConfigProblem("model.new_token_descriptions", "is read only with model.new_token_init=description"))


def load_config(
    path: str | None = None,
    overrides: Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    pm: "PluginManager | None" = None,
    from_run: "Callable[[dict, list[ConfigProblem]], dict] | None" = None,
) -> DictConfig:
    """Build and validate a config, raising one :class:`ConfigError` that lists every problem.

    Args:
        path: optional YAML file.
        overrides: ``key=value`` strings (OmegaConf dotlist syntax; lists as ``[a,b]``).
        flags: dotted key -> value from the CLI shortcut flags; applied before ``overrides``.
        pm: plugin manager whose registry supplies plugin names and options (default: the global one).
        from_run: reads ``model.from_run``'s finished run beneath the values given (the front
            door passes :func:`sft.engine.continuation.continued_run`): ``raw`` (the nested values
            given) and the problems list in, ``raw`` with that run's values beneath out. None (a
            run's own ``config.yaml``, which holds them already) leaves ``model.from_run`` a record.
    """
    if pm is None:
        from sft.core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    problems: list[ConfigProblem] = []
    raw: dict = _read_yaml(path) if path else {}
    for key, value in (flags or {}).items():
        parsed, _ = _parse_overrides([f"{key}=x"])  # builds the nesting for a dotted key
        node = parsed
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
        raw = deep_merge(raw, parsed)
    texts: dict[str, tuple[str, Any]] = {}
    parsed, parse_problems = _parse_overrides(overrides, texts)
    problems += parse_problems
    raw = deep_merge(raw, parsed)

    schema = build_schema(pm)
    raw = _resolve_flat_keys(schema, raw)
    given = raw
    preset = raw.get("preset")
    if isinstance(preset, str) and preset in PRESETS:
        raw = deep_merge(preset_values(preset), raw)  # beneath everything the user set
    raw = _publishers_of(raw, pm)
    if from_run is not None:
        raw = from_run(raw, problems)
    _apply(schema, raw, "", problems, texts)
    _check_resolvers(schema, problems)
    from .data.cache import CACHE_OFF

    if schema.data.cache_dir is not None and str(schema.data.cache_dir).lower() in CACHE_OFF:
        schema.data.cache_dir = "off"  # as the docs spell it, not the 'false' YAML made of `off`
    _check_choices(schema, problems)
    _check_ranges(schema, problems)
    _check_plugin_names(schema, pm, problems)
    _check_consistency(schema, problems)
    if problems:
        raise ConfigError(problems, source=_where(path, problems, [*texts, *(flags or {})]))
    _notice_unused_options(schema, given, pm)
    return schema


def _where(path: str | None, problems: Sequence[ConfigProblem], given: Sequence[str]) -> str | None:
    """Where the problems are: the YAML file, the command line (keys given as flags or key=value), or both."""
    on_line = [any(g == p.key or g.startswith(p.key + ".") for g in given) for p in problems]
    if path is None or not any(on_line):
        return path
    return "the command line" if all(on_line) else f"{path} and the command line"


def _notice_unused_options(cfg: DictConfig, given: dict, pm: "PluginManager") -> None:
    """Say which options given for a plugin this run does not use do nothing (a YAML may keep them for
    other runs, so it is a notice): ``export.gguf.quants`` without gguf in ``export.enabled``."""
    from sft.core.interfaces import KINDS
    from sft.core.notices import notice

    for key, kind, is_list, extra in PLUGIN_NAME_KEYS:
        chosen = OmegaConf.select(cfg, key)
        used = set(chosen) if is_list else {chosen}
        if used & set(extra):
            continue  # `auto` picks the plugin when the run starts
        section = KINDS[kind][2]
        for name, obj in sorted(pm.registry(kind).items()):
            options = (given.get(section) or {}).get(name)
            if name in used or obj.options is None or not isinstance(options, dict):
                continue
            defaults = dataclasses.asdict(obj.options() if isinstance(obj.options, type) else obj.options)
            changed = [k for k, v in options.items() if k in defaults and v != defaults[k]]
            if changed:
                notice(f"{', '.join(f'{section}.{name}.{k}' for k in changed)} set, but {kind.replace('_', ' ')} "
                       f"'{name}' is not in {key} ({', '.join(sorted(map(str, used)))}): it does nothing this run")


#: The one-line advice for a resolver in a config (most often ``${oc.env:...}``).
RESOLVER_ADVICE = ("give the value itself: {key}=\"$VAR\" on the command line lets your shell fill it in, and tokens stay "
                   "in their own variables (HF_TOKEN, WANDB_API_KEY), which the libraries read themselves")


def _resolvers_in(value: str) -> list[str]:
    """The resolvers ``value`` calls (``oc.env``, nested ones too, a name built by interpolation as written)."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
    from omegaconf.grammar_parser import parse

    try:
        tree = parse(value, parser_rule="configValue", lexer_mode="DEFAULT_MODE")
    except OmegaConfBaseException:
        return []  # not an interpolation OmegaConf can run: it reads as the text it is
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            found.append(node.resolverName().getText())
        todo += list(node.getChildren()) if hasattr(node, "getChildren") else []
    return found


def _check_resolvers(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    """Interpolations may name other keys (``${training.save_steps}``) and nothing else.

    A resolver (``${oc.env:SECRET}``) would put what it reads into every value that names its key,
    and from there into config.yaml, summary.json, the loggers and the Hub's model card; in a run
    folder someone sent you, it would read *your* environment. So a config calls none."""

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and "${" in value:
            names = _resolvers_in(value)
            if names:
                what = "reads the environment" if any("env" in n for n in names) else f"calls the resolver {names[0]}"
                problems.append(ConfigProblem(key, f"{value!r} {what}, and a config may only name other keys "
                                                   f"(${{section.key}}); {RESOLVER_ADVICE.format(key=key)}"))

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def _publishers_of(raw: dict, pm: "PluginManager") -> dict:
    """Each publisher's options read from the section it declares it ``moved_from`` (with a notice),
    and a publisher whose ``enabled_by`` option is set added to ``publish.enabled``."""
    from sft.core.notices import notice

    for name, publisher in sorted(pm.registry("publisher").items()):
        if publisher.moved_from:
            *parents, leaf = publisher.moved_from.split(".")
            node = raw
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf in node:
                old = node.pop(leaf)
                keys = ", ".join(f"{publisher.moved_from}.{k} as publish.{name}.{k}" for k in old) \
                    if isinstance(old, dict) else f"{publisher.moved_from} as publish.{name}"
                notice(f"read {keys}: the {publisher.moved_from} section moved to publish.{name} "
                       "(write the new keys to silence this notice)")
                raw = deep_merge(raw, {"publish": {name: old}})
        options = (raw.get("publish") or {}).get(name) if isinstance(raw.get("publish"), dict) else None
        if publisher.enabled_by and isinstance(options, dict) and options.get(publisher.enabled_by) is not None:
            enabled = raw["publish"].get("enabled")
            enabled = list(enabled) if isinstance(enabled, list) else []
            if name not in enabled:
                raw["publish"]["enabled"] = [*enabled, name]
    return raw


def given_on_command_line(overrides: Sequence[str], key: str) -> bool:
    """Whether the ``key=value`` ``overrides`` set the dotted ``key`` (a section given whole counts
    only when it holds ``key``)."""
    node: Any = _parse_overrides(overrides)[0]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_run_config(path: str | Path, overrides: Sequence[str] = (), flags: dict[str, Any] | None = None,
                    pm: "PluginManager | None" = None, trust_remote_code: bool = False,
                    loads_model: bool = True) -> DictConfig:
    """A run folder's saved ``config.yaml`` plus ``overrides``, validated like any config, for the
    commands that work on a finished run (``sft export``, ``publish``, ``generate``, ``chat``, ``eval``).

    That folder may come from someone else, so its config is data and chooses nothing that acts
    on your behalf without your word on the command line:

    - ``model.trust_remote_code: true`` (Python files of the model run as it loads) is refused
      unless ``trust_remote_code`` (``--trust-remote-code``) or ``model.trust_remote_code=true``
      is given, for a command that ``loads_model``;
    - a publisher's :attr:`~sft.core.interfaces.Publisher.confirmed_options` (the hub's
      ``private``, ``force``) keep their safe value, with a notice, unless an override sets them.
    """
    from sft.core.errors import SftError
    from sft.core.notices import notice

    if pm is None:
        from sft.core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    saved = read_yaml(str(path)).get("data") or {}
    if saved.get("datasets"):
        # A mixed run saved before data.dataset/format/split beside data.datasets were refused: they were
        # unread then, and the run stays usable.
        flags = {"data.dataset": DataConfig.dataset, "data.format": DataConfig.format, "data.split": DataConfig.split,
                 **(flags or {})}
    cfg = load_config(str(path), overrides=overrides, flags=flags, pm=pm)
    if (loads_model and cfg.model.trust_remote_code and not trust_remote_code
            and not given_on_command_line(overrides, "model.trust_remote_code")):
        raise SftError(f"model.trust_remote_code: {path} sets it to true, which runs the model's own Python files "
                       f"(the base model's, or the run's adapter/) as it loads; add --trust-remote-code to this "
                       f"command if you trust that code")
    for name, publisher in sorted(pm.registry("publisher").items()):
        for option, (safe, flag) in publisher.confirmed_options.items():
            key = f"publish.{name}.{option}"
            moved = f"{publisher.moved_from}.{option}" if publisher.moved_from else None
            value = OmegaConf.select(cfg, key)
            if value == safe or given_on_command_line(overrides, key) or (moved and given_on_command_line(overrides, moved)):
                continue
            notice(f"{key}={_yaml_word(value)} comes from {path}, which cannot choose it for you: using "
                   f"{_yaml_word(safe)}; to confirm it add {key}={_yaml_word(value)} ({flag})")
            OmegaConf.update(cfg, key, safe)
    return cfg


def confirmed_overrides(cfg: DictConfig, pm: "PluginManager") -> list[str]:
    """The ``key=value`` overrides that restate ``cfg``'s publisher options a run's config cannot
    choose alone: how ``sft run`` hands its own config's choice to the ``sft export`` it starts."""
    out = []
    for name, publisher in sorted(pm.registry("publisher").items()):
        for option, (safe, _flag) in publisher.confirmed_options.items():
            value = OmegaConf.select(cfg, f"publish.{name}.{option}")
            if value != safe:
                out.append(f"publish.{name}.{option}={_yaml_word(value)}")
    return out


def _yaml_word(value: Any) -> str:
    return OmegaConf.to_yaml({"v": value}).split(":", 1)[1].strip()


def read_yaml(path: str) -> dict:
    """A config file as a plain dict, before validation (a :class:`ConfigError` when unreadable)."""
    return _read_yaml(path)
