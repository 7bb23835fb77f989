"""A Hugging Face model card for a run: what the ``folder`` publisher writes beside what it publishes.

A card describes a publication, not a format a model is written in, so it is written by the
publisher (as sft's own hub publisher writes each repo's card), not by an exporter: YAML front
matter (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``, ``datasets`` for hub
datasets, ``license``, ``language``) and a body with the dataset, the chat template, the
hyperparameters, the final losses, the token counts and the run's exports. It needs no model,
only the run's config and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional

from sft.core.config import opt

__all__ = ["ModelCardOptions", "render_model_card", "read_front_matter"]

#: Hyperparameters shown in the card, as (config key, label).
HYPERPARAMETERS = (
    ("model.method", "method"),
    ("model.max_seq_length", "max sequence length"),
    ("lora.r", "LoRA r"),
    ("lora.lora_alpha", "LoRA alpha"),
    ("lora.lora_dropout", "LoRA dropout"),
    ("lora.target_modules", "LoRA target modules"),
    ("training.learning_rate", "learning rate"),
    ("training.lr_scheduler_type", "scheduler"),
    ("training.per_device_train_batch_size", "batch size per device"),
    ("training.gradient_accumulation_steps", "gradient accumulation steps"),
    ("training.max_steps", "max steps"),
    ("training.num_train_epochs", "epochs"),
    ("training.warmup_steps", "warmup steps"),
    ("training.weight_decay", "weight decay"),
    ("training.optim", "optimizer"),
    ("training.packing", "packing"),
    ("training.seed", "seed"),
)


@dataclass
class ModelCardOptions:
    license: Optional[str] = opt(None, "The card's license (an SPDX-style Hub id such as apache-2.0); left out when null.")
    language: List[str] = opt([], "Languages of the training data (ISO codes, e.g. [en]).")
    tags: List[str] = opt([], "Extra Hub tags, added to sft, lora and the chat template's name.")


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _is_hub_dataset(name: str) -> bool:
    # A hub id looks like owner/name and is not a local path or the embedded dataset.
    return "/" in name and not name.startswith(("sft:", ".", "/", "~")) and not Path(name).exists() and name.count("/") == 1


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "-" if value is None else str(value)


def render_model_card(config: Mapping[str, Any], summary: Mapping[str, Any], options: ModelCardOptions,
                      run_name: str, trained_in_4bit: bool | None = None) -> str:
    """The model card text: YAML front matter, then Markdown.

    ``trained_in_4bit`` False for a ``qlora`` config means the run fell back to LoRA on a
    16/32-bit base (no CUDA); the card says what actually happened.
    """
    import yaml

    base_model = _get(config, "model.name")
    dataset = str(_get(config, "data.dataset") or "")
    template = _get(config, "template.name")
    method = _get(config, "model.method")
    if method == "qlora" and trained_in_4bit is False:
        method = "lora"  # qlora was asked for, but 4-bit needs CUDA
    front: dict[str, Any] = {"base_model": base_model, "library_name": "peft" if method != "full" else "transformers"}
    if options.license:
        front["license"] = options.license
    if options.language:
        front["language"] = list(options.language)
    if _is_hub_dataset(dataset):
        front["datasets"] = [dataset]
    front["pipeline_tag"] = "text-generation"
    front["tags"] = list(dict.fromkeys(["sft", "lora" if method != "full" else "full-fine-tune", str(template), *options.tags]))

    lines = [f"# {run_name}", "", f"A fine-tune of [`{base_model}`](https://huggingface.co/{base_model}) made with "
             f"`sft` ({method}), in the `{template}` chat format.", ""]
    data = summary.get("dataset") if isinstance(summary.get("dataset"), Mapping) else {}
    lines += ["## Training data", "", f"- dataset: `{dataset}` (format `{data.get('format', _get(config, 'data.format'))}`, "
              f"split `{_get(config, 'data.split')}`)"]
    objective = summary.get("objective") if isinstance(summary.get("objective"), Mapping) else {}
    if objective.get("from_run") or objective.get("name") not in (None, "sft"):
        lines.append(f"- objective: {objective.get('description') or objective.get('name')}")
    for key, label in (("rows", "rows read"), ("train_rows", "training rows"), ("eval_rows", "evaluation rows"),
                       ("train_tokens", "training tokens"), ("trained_tokens", "trained (assistant) tokens"),
                       ("truncated", "truncated rows"), ("fully_masked", "rows with no trained token (dropped)")):
        if data.get(key) is not None:
            lines.append(f"- {label}: {_fmt(data[key])}")
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | `{_fmt(method if key == 'model.method' else _get(config, key))}` |"
              for key, label in HYPERPARAMETERS if _get(config, key) is not None]
    lines += ["", "## Results", ""]
    durations = summary.get("durations") if isinstance(summary.get("durations"), Mapping) else {}
    results = [(label, summary.get(key)) for key, label in (
        ("status", "status"), ("steps", "optimizer steps"), ("epochs", "epochs"), ("train_loss", "final train loss"),
        ("eval_loss", "final eval loss"), ("mean_train_loss", "mean train loss"), ("tokens", "tokens seen"),
        ("tokens_per_second", "tokens/s"), ("backend", "backend"), ("device", "device"))]
    results.append(("training time (s)", durations.get("train")))
    results = [(label, value) for label, value in results if value is not None]
    lines += [f"- {label}: {_fmt(value)}" for label, value in results] or ["- (no summary.json: the run did not finish)"]
    exports = summary.get("exports") or {}
    if exports:
        lines += ["", "## Exports", "", "| exporter | ok | files |", "|---|---|---|"]
        for name, result in exports.items():
            if not isinstance(result, Mapping):
                continue
            files = ", ".join(f"`{Path(p).name}`" for p in result.get("paths", [])) or "-"
            lines.append(f"| {name} | {'yes' if result.get('ok') else 'no'} | {files} |")
    lines += ["", "## Usage", "", "With `sft`, from the run directory:", "", "```bash",
              f"sft generate runs/{run_name} \"Who are you?\"", "```", "",
              "With PEFT, from this folder (the tokenizer carries the chat template):", "", "```python",
              "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
              "path = \"lora\"  # the folder beside this card holding adapter_model.safetensors",
              "model = AutoPeftModelForCausalLM.from_pretrained(path)",
              "tokenizer = AutoTokenizer.from_pretrained(path)",
              "inputs = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Who are you?\"}],",
              "    add_generation_prompt=True, return_dict=True, return_tensors=\"pt\")",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))", "```", ""]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{header}\n---\n\n" + "\n".join(lines)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (what the Hub parses)."""
    import yaml

    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError("no YAML front matter (--- ... ---) at the top")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}
