"""The GPU path end to end: QLoRA on Unsloth learns, every export is written, reloads and answers.

One run (module fixture) trains a small random Llama with ``model.backend=unsloth`` and
``model.method=qlora`` on a synthetic set it can learn (eight fixed question -> code pairs)
and writes the lora, merged_16bit, merged_4bit and gguf (q8_0 + q4_k_m) exports. Each test
then reloads one export in the library users would load it with and asks a trained question.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.testing import write_jsonl

from .support import CODES, QUESTION, learnable_rows, sft_run

pytestmark = pytest.mark.gpu

STEPS = 80
EXPORTS = ("lora", "merged_16bit", "merged_4bit", "gguf")


@pytest.fixture(scope="module")
def gpu_run(small_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `sft run` on the GPU: QLoRA on Unsloth, then every export (with verification)."""
    work = tmp_path_factory.mktemp("gpu-run")
    data = write_jsonl(work / "codes.jsonl", learnable_rows())
    out = work / "run"
    sft_run(
        f"model.name={small_llama_dir}", "model.backend=unsloth", "model.method=qlora", "model.max_seq_length=128",
        "lora.r=16", "lora.lora_alpha=32", f"data.dataset={data}", "data.format=sharegpt", "template.name=chatml",
        f"training.output_dir={out}", f"training.max_steps={STEPS}", "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=1", "training.learning_rate=3e-3", "training.warmup_steps=5",
        "training.logging_steps=1", "training.save_steps=1000", "training.generation_max_new_tokens=12",
        f"training.generation_prompt={QUESTION.format('red')}", "loggers.enabled=[]",
        f"export.enabled=[{','.join(EXPORTS)}]", "export.gguf.quants=[q8_0,q4_k_m]",
        log=work / "sft-run.log")
    return out


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def chat_prompt(tokenizer: Any, color: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(color)}],
                                         tokenize=False, add_generation_prompt=True)


def test_qlora_on_unsloth_loss_falls(gpu_run: Path) -> None:
    losses = [r["loss"] for r in map(json.loads, (gpu_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.25 * first, f"loss went from {first:.3f} to {last:.3f}"
    config = (gpu_run / "config.yaml").read_text()
    assert "backend: unsloth" in config and "method: qlora" in config


def test_every_export_written(gpu_run: Path) -> None:
    exports = gpu_run / "exports"
    assert (exports / "lora" / "adapter_model.safetensors").is_file()
    assert list((exports / "merged_16bit").glob("*.safetensors"))
    merged4 = json.loads((exports / "merged_4bit" / "config.json").read_text())
    assert merged4["quantization_config"]["load_in_4bit"] is True
    ggufs = sorted(p.name for p in (exports / "gguf").glob("*.gguf"))
    assert len(ggufs) == 2 and any("Q8_0" in g for g in ggufs) and any("Q4_K_M" in g for g in ggufs), ggufs
    # Each exporter reported success, the gguf one after llama.cpp matched the merged model's
    # greedy tokens (export.verify is on by default).
    exports_summary = summary(gpu_run)["exports"]
    for name in EXPORTS:
        assert exports_summary[name]["ok"], (name, exports_summary[name]["error"])
    verified = exports_summary["gguf"]["details"]["quants"]
    assert all(verified[q]["verify"]["ok"] for q in ("q8_0", "q4_k_m")), verified


def _generate_hf(model: Any, tokenizer: Any, color: str) -> str:
    import torch

    ids = tokenizer(chat_prompt(tokenizer, color), return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _load_hf(run: Path, export: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = run / "exports" / export
    tokenizer = AutoTokenizer.from_pretrained(path)
    if export == "lora":
        from peft import PeftModel

        adapter = json.loads((path / "adapter_config.json").read_text())
        # The adapter was trained against the 4-bit base: reload it the same way.
        base = AutoModelForCausalLM.from_pretrained(
            adapter["base_model_name_or_path"], device_map={"": 0}, dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16))
        return PeftModel.from_pretrained(base, path).eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, dtype=torch.bfloat16).eval(), tokenizer


@pytest.mark.parametrize("export", ["lora", "merged_16bit", "merged_4bit"])
def test_hf_export_reloads_and_answers(gpu_run: Path, export: str) -> None:
    model, tokenizer = _load_hf(gpu_run, export)
    answers = {c: _generate_hf(model, tokenizer, c) for c in ("red", "violet", "indigo")}
    for color, text in answers.items():
        assert CODES[color] in text, answers


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_gguf_export_reloads_and_answers(gpu_run: Path, quant: str) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    (path,) = (gpu_run / "exports" / "gguf").glob(f"*-{quant}.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gpu_run / "exports" / "lora")
    llm = Llama(model_path=str(path), n_ctx=256, n_gpu_layers=0, seed=0, verbose=False)
    answers = {}
    for color in ("red", "violet", "indigo"):
        out = llm(chat_prompt(tokenizer, color), max_tokens=12, temperature=0.0, stop=["<|im_end|>"])
        answers[color] = out["choices"][0]["text"]
    # q8_0 is near-lossless: it must answer like the trained model. q4_k_m on a 4-layer,
    # 256-wide model loses more; it must still write the learned answer's form.
    for color, text in answers.items():
        assert (CODES[color] in text) if quant == "Q8_0" else text.startswith("The code for"), answers
