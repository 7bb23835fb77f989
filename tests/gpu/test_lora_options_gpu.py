"""The CUDA path (Unsloth) of the keys of issue 28: DoRA, modules_to_save with an embedding learning rate,
LoRA+ and added tokens, each trained by `sft run` in a subprocess on the small random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sft.testing import write_jsonl

from .support import QUESTION, learnable_rows, sft_run

pytestmark = pytest.mark.gpu


def _run(model: Path, tmp_path: Path, *extra: str, rows: list | None = None) -> tuple[Path, str]:
    data = write_jsonl(tmp_path / "rows.jsonl", rows or learnable_rows(64))
    out = tmp_path / "run"
    proc = sft_run(f"model.name={model}", "model.max_seq_length=128", "lora.r=8", "lora.lora_alpha=16",
                   f"data.dataset={data}", f"training.output_dir={out}", "training.max_steps=12",
                   "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
                   "training.learning_rate=3e-3", "training.warmup_steps=0", "training.save_steps=1000",
                   "training.generation_max_new_tokens=8", f"training.generation_prompt={QUESTION.format('red')}",
                   "loggers.enabled=[]", *extra, log=tmp_path / "run.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["backend"] == "unsloth", summary
    return out, proc.stdout + proc.stderr


def test_unsloth_trains_qlora_dora_with_its_magnitudes(small_llama_dir, tmp_path):
    out, log = _run(small_llama_dir, tmp_path, "model.method=qlora", "lora.use_dora=true", "export.enabled=[]")
    assert "Unsloth's fast LoRA kernels skip DoRA layers" in log
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in tensors), sorted(tensors)[:5]


def test_unsloth_continued_pretraining_recipe_with_embedding_rate_and_loraplus(small_llama_dir, tmp_path):
    out, log = _run(small_llama_dir, tmp_path, "model.method=lora", "lora.modules_to_save=[embed_tokens,lm_head]",
                    "training.embedding_learning_rate=3e-4", "training.loraplus_lr_ratio=16", "export.enabled=[lora]")
    assert "embedding tensor(s) at 0.0003 (training.embedding_learning_rate)" in log
    assert "(training.loraplus_lr_ratio=16)" in log
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lm_head" in k and "lora_" not in k for k in tensors) and any("embed_tokens" in k for k in tensors)
    assert "not in vLLM (vllm#9280)" in log


def test_unsloth_learns_added_tokens(small_llama_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": QUESTION.format(c)}, {"role": "assistant", "content": "<|act|><tool>"}]}
            for c in ["red", "blue", "green", "amber"] * 16]
    out, _ = _run(small_llama_dir, tmp_path, "model.method=lora", "model.add_tokens=['<tool>']",
                  "model.add_special_tokens=['<|act|>']", "export.enabled=[merged_16bit]", "training.max_steps=40",
                  rows=rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["text"].startswith("<|act|><tool>"), summary["generation"]
    assert summary["exports"]["merged_16bit"]["ok"]
