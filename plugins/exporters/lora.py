"""The ``lora`` exporter: the PEFT adapter plus the tokenizer carrying the template's chat_template.

Writes ``exports/lora/`` (adapter_config.json, adapter_model.safetensors, tokenizer files),
loadable with ``PeftModel.from_pretrained(base, path)`` and ``AutoTokenizer.from_pretrained(path)``;
``tokenizer.apply_chat_template`` then renders exactly what training rendered.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from sft.core import hookimpl
from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, ExportResult, Exporter, HubCard, Message
from sft.core.rundir import dir_size, staged_dir

__all__ = ["LoraExporter", "register_exporters"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


class LoraExporter(Exporter):
    name = "lora"
    version = "1"
    description = "The LoRA adapter and the tokenizer with the template's chat_template (PEFT format)"
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
            if context.verifying:
                # Raises before the earlier export (if any) is replaced.
                details["verify"] = _verify(context, partial)
        details["seconds"] = round(time.perf_counter() - start, 2)
        return ExportResult(self.name, ok=True, paths=[str(final)], details=details)


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
