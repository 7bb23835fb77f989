"""The ``merged_16bit`` and ``merged_4bit`` exporters: the LoRA adapter merged into the base weights.

``merged_16bit`` always merges into 16-bit (or, on CPU, float32) base weights and saves in
16 bits. When training loaded the base in 4 bits (``model.method=qlora`` on CUDA) the base
is reloaded unquantized for the merge; a base *stored* quantized is dequantized first (CUDA).
It never merges into a quantized base: rounding the LoRA delta into 4-bit weights would
silently lose most of it.

``merged_4bit`` quantizes that merged 16-bit model to bitsandbytes NF4 and saves it
(safetensors, loadable with ``from_pretrained`` on CUDA). bitsandbytes 4-bit needs CUDA.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, EvalModel, ExportResult, Exporter, HubCard
from sft.core.rundir import dir_size, staged_dir

from .merging import merging_for

__all__ = ["Merged16Options", "Merged4Options", "Merged16Exporter", "Merged4Exporter", "register_exporters"]


@dataclass
class Merged16Options:
    dtype: str = opt("auto", "Saved dtype. auto: the base model's own 16-bit dtype, else bfloat16.",
                     ["auto", "bfloat16", "float16"])


@dataclass
class Merged4Options:
    quant_type: str = opt("nf4", "bitsandbytes 4-bit data type.", ["nf4", "fp4"])
    double_quant: bool = opt(True, "Quantize the quantization constants too (bnb_4bit_use_double_quant).")


def _transformers_usage(repo_id: str, note: str) -> str:
    return "\n".join([
        note, "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
        '                                       return_dict=True, return_tensors="pt").to(model.device)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))", "```"])


def _verify_logits(context: ExportContext) -> dict[str, Any]:
    """The merged folder reloaded with plain transformers vs base + adapter (PEFT, unmerged), on the verify prompt."""
    import torch

    merging = merging_for(context)
    ids = context.tokenizer(context.verify_prompt(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model = merging.merged_reference_model()
        got = model(input_ids=ids.to(model.device)).logits[0].float().cpu()
    reference = merging.unmerged_logits(ids)
    diff = (got - reference).abs()
    rel = float(diff.norm() / reference.norm().clamp_min(1e-12))
    top1 = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    # 16-bit storage rounds each weight by up to 2^-8 (bf16) relative; 2% relative logit
    # error leaves room for that across layers while catching a missing or doubled delta.
    summary = f"logits vs base+adapter: relative error {rel:.4f}, top-1 agreement {top1:.2%}"
    if rel >= 0.02:
        raise SftError(f"merged model verification failed: {summary} (expected relative error < 0.02)")
    return {"ok": True, "summary": summary, "relative_error": rel, "max_abs_diff": float(diff.max()),
            "top1_agreement": top1}


class Merged16Exporter(Exporter):
    name = "merged_16bit"
    version = "1"
    description = "LoRA merged into the 16-bit base weights (HF safetensors); a 4-bit QLoRA base is reloaded in 16-bit first"
    options = Merged16Options
    hub_suffix = ""  # the model itself: the repo named by publish.hub.repo_id

    def eval_models(self, context: ExportContext) -> list[EvalModel]:
        folder = context.run_dir.export_dir(self.name)
        if not (folder / "config.json").is_file():
            return []
        from sft.engine.evaluate import score_hf_folder

        trust = bool(context.config.model.trust_remote_code)
        return [EvalModel(self.name, str(folder), lambda tasks, limit: score_hf_folder(folder, tasks, limit, trust))]

    def hub_card(self, context: ExportContext, result: ExportResult, repo_id: str, user: str) -> HubCard:
        dtype = result.details.get("dtype", "16-bit")
        note = (f"The adapter merged into the base weights, saved in {dtype}; generation_config.json stops at the "
                "chat template's end-of-turn token.")
        return HubCard(library_name="transformers", tags=["transformers", "safetensors"],
                       usage=_transformers_usage(repo_id, note))

    def preflight(self, context: ExportContext, options: Merged16Options | None = None) -> list[str]:
        merging = merging_for(context)
        problems = merging.merge_problems()
        if (problem := context.disk_problem(merging.merged_bytes(), "the merged_16bit export")):
            problems.append(problem)
        return problems

    def export(self, context: ExportContext, options: Merged16Options | None = None) -> ExportResult:
        options = options or Merged16Options()
        start = time.perf_counter()
        merging = merging_for(context)
        dtype = merging.resolve_merge_dtype(options.dtype)
        final = context.output_dir(self.name)
        # Written elsewhere first and moved into place: an earlier merged export stays intact
        # until the new one is complete.
        merged = merging.merged_model_dir(dtype)
        details: dict[str, Any] = {"dtype": dtype, **merging.merge_details(merged)}
        if context.trained_in_4bit:
            details["note"] = "training used a 4-bit base (qlora); the merge reloaded the base in 16-bit"
        if context.verifying:
            # Raises before an earlier merged export (if any) is replaced.
            details["verify"] = _verify_logits(context)
        details.update(merging.adopt_merged(final, dtype))
        details["bytes"] = dir_size(final)
        details["seconds"] = round(time.perf_counter() - start, 2)
        return ExportResult(self.name, ok=True, paths=[str(final)], details=details)


class Merged4Exporter(Exporter):
    name = "merged_4bit"
    version = "1"
    description = "LoRA merged in 16-bit, then quantized to bitsandbytes 4-bit (NF4) safetensors; CUDA only"
    options = Merged4Options
    hub_suffix = "-bnb-4bit"  # Unsloth's name for bitsandbytes 4-bit repos

    def hub_card(self, context: ExportContext, result: ExportResult, repo_id: str, user: str) -> HubCard:
        quant = result.details.get("quant_type", "nf4")
        note = f"The merged model quantized to bitsandbytes 4-bit ({quant}); loading it needs a CUDA GPU and bitsandbytes."
        return HubCard(library_name="transformers", tags=["transformers", "4-bit", "bitsandbytes"],
                       metadata={"quantized_by": user}, usage=_transformers_usage(repo_id, note))

    def unsupported_reason(self, env: Any, options: Any = None) -> str | None:
        if not env.cuda:
            return ("merged_4bit needs a CUDA GPU: bitsandbytes quantizes to 4 bits only on CUDA. On this machine "
                    "use merged_16bit, or gguf with export.gguf.quants=[q4_k_m] for a 4-bit file that runs on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            return "merged_4bit needs bitsandbytes: pip install bitsandbytes"
        return None

    def preflight(self, context: ExportContext, options: Merged4Options | None = None) -> list[str]:
        merging = merging_for(context)
        problems = merging.merge_problems()
        # The merged 16-bit intermediate plus the 4-bit result (about a quarter of it).
        if (problem := context.disk_problem(merging.merged_bytes() * 5 // 4, "the merged_4bit export")):
            problems.append(problem)
        return problems

    def export(self, context: ExportContext, options: Merged4Options | None = None) -> ExportResult:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        options = options or Merged4Options()
        start = time.perf_counter()
        merged = merging_for(context).merged_model_dir()
        compute = torch.bfloat16 if context.env.bf16 else torch.float16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
                                   bnb_4bit_use_double_quant=options.double_quant, bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(str(merged), quantization_config=quant, device_map={"": 0},
                                                     trust_remote_code=bool(context.config.model.trust_remote_code))
        final = context.output_dir(self.name)
        with staged_dir(final) as partial:
            model.save_pretrained(str(partial))
            context.save_tokenizer(partial)
        details = {"quant_type": options.quant_type, "double_quant": options.double_quant,
                   "bytes": dir_size(final), "seconds": round(time.perf_counter() - start, 2)}
        return ExportResult(self.name, ok=True, paths=[str(final)], details=details)


@hookimpl
def register_exporters(register):
    register(Merged16Exporter())
    register(Merged4Exporter())
