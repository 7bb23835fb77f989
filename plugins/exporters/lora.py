"""The ``lora`` exporter: the PEFT adapter plus the tokenizer carrying the template's chat_template.

Writes ``exports/lora/`` (adapter_config.json, adapter_model.safetensors, tokenizer files),
loadable with ``PeftModel.from_pretrained(base, path)`` and ``AutoTokenizer.from_pretrained(path)``;
``tokenizer.apply_chat_template`` then renders exactly what training rendered.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from sft.core import hookimpl
from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, ExportResult, Exporter, HubCard, Message
from sft.core.notices import notice
from sft.core.rundir import dir_size, staged_dir

from .merging import adapter_beyond_lora

__all__ = ["LoraExporter", "register_exporters"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


class LoraExporter(Exporter):
    name = "lora"
    version = "1"
    description = ("The LoRA adapter and the tokenizer with the template's chat_template (PEFT format); says which "
                   "servers load an adapter that holds more than LoRA matrices (modules_to_save, DoRA, added tokens)")
    hub_suffix = "-lora"

    def hub_card(self, context: ExportContext, result: ExportResult, repo_id: str, user: str) -> HubCard:
        usage = "\n".join([
            "The adapter loads onto its base model with PEFT; the tokenizer carries the chat template it was trained with.",
            "", "```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
            '                                       return_dict=True, return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))", "```"])
        note = (result.details.get("servers") or {}).get("note")
        if note:
            usage += f"\n\n**Where it loads:** {note}"
        return HubCard(library_name="peft", tags=["peft", "lora"], usage=usage)

    def preflight(self, context: ExportContext, options: Any = None) -> list[str]:
        if context.is_full_model:
            return ["the run trained every weight (model.method=full); there is no LoRA adapter. Use merged_16bit"]
        problems = context.tokenizer_problems() + context.adapter_problems()
        size = sum(dir_size(context.adapter_dir / f) for f in ADAPTER_FILES if (context.adapter_dir / f).exists())
        if (problem := context.disk_problem(size + 20_000_000, "the lora export")):
            problems.append(problem)
        return problems

    def export(self, context: ExportContext, options: Any = None) -> ExportResult:
        start = time.perf_counter()
        final = context.output_dir(self.name)
        with staged_dir(final) as partial:
            for f in ADAPTER_FILES:
                if (context.adapter_dir / f).is_file():
                    shutil.copy2(context.adapter_dir / f, partial / f)
            context.save_tokenizer(partial)
            details: dict[str, Any] = {"bytes": dir_size(partial), "template": context.template.name}
            servers = serving_note(partial)
            if servers:
                details["servers"] = servers
                notice(f"lora export: {servers['note']}")
            if context.verifying:
                # Raises before the earlier export (if any) is replaced.
                details["verify"] = _verify(context, partial)
        details["seconds"] = round(time.perf_counter() - start, 2)
        return ExportResult(self.name, ok=True, paths=[str(final)], details=details)


def serving_note(adapter_dir: Path) -> dict[str, Any] | None:
    """Which servers load an adapter that holds more than LoRA matrices, and what to ship instead; None for a plain one.

    vLLM's LoRA loader takes LoRA matrices only (no modules_to_save, vllm#9280; no DoRA), and a
    llama.cpp LoRA GGUF carries LoRA matrices only; PEFT and transformers load everything.
    """
    beyond = adapter_beyond_lora(adapter_dir)
    if not beyond:
        return None
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rows = ""
    if set(config.get("modules_to_save") or ()) & {"embed_tokens", "lm_head"} and not config.get("use_dora"):
        rows = ("; where only a few added tokens' rows had to change, training just those rows (model.add_tokens "
                "without embed_tokens/lm_head in lora.modules_to_save) keeps the adapter a fraction of the size")
    note = (f"this adapter holds {'; '.join(beyond)}: it loads with PEFT/transformers (and Unsloth), but not in vLLM "
            f"(vllm#9280) nor as a llama.cpp LoRA GGUF; serve the merged_16bit export (or its GGUF) there{rows}")
    return {"peft": True, "vllm": False, "llama_cpp_lora": False, "note": note}


def _verify(context: ExportContext, path) -> dict[str, Any]:
    """Reload the exported tokenizer and adapter files: the chat template must render what training rendered."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    sample = [Message("user", "Hello?"), Message("assistant", "Hi there."), Message("user", "Bye?")]
    expected = "".join(seg.text for seg in context.template.render(sample, tok))
    rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in sample], tokenize=False)
    prompt_expected = context.template.generation_prompt(sample, tok)
    prompt_rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in sample],
                                              tokenize=False, add_generation_prompt=True)
    weights = path / "adapter_model.safetensors"
    lora_tensors = 0
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as sf:
            lora_tensors = sum(1 for k in sf.keys() if "lora_" in k)
    ok = False
    if rendered != expected or prompt_rendered != prompt_expected:
        summary = "the exported tokenizer's chat_template renders differently from the training template"
    elif weights.is_file() and lora_tensors == 0:
        summary = "adapter_model.safetensors holds no LoRA tensors"
    else:
        ok = True
        summary = f"chat_template renders like '{context.template.name}'; {lora_tensors} LoRA tensors"
    if not ok:
        raise SftError(f"lora export verification failed: {summary}")
    return {"ok": ok, "summary": summary, "lora_tensors": lora_tensors}


@hookimpl
def register_exporters(register):
    register(LoraExporter())
