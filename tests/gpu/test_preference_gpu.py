"""Preference objectives on CUDA with the Unsloth backend: an SFT run (QLoRA) continued by DPO,
whose reference is that run's model; ORPO, SimPO and KTO run on the same backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.engine.metrics import read_metrics
from sft.testing import write_jsonl

from .support import CODES, QUESTION, learnable_rows, sft_run

pytestmark = pytest.mark.gpu


def _common(model: Path, out: Path, data: Path, steps: int) -> list[str]:
    return [f"model.name={model}", "model.method=qlora", "model.max_seq_length=128", "lora.r=16", "lora.lora_alpha=32",
            f"data.dataset={data}", "data.test_size=16", f"training.output_dir={out}", f"training.max_steps={steps}",
            "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
            "training.warmup_steps=0", "training.save_steps=1000", "training.generation_max_new_tokens=12",
            f"training.generation_prompt={QUESTION.format('red')}", "loggers.enabled=[]", "export.enabled=[lora]"]


def _pairs(n: int = 240) -> list[dict]:
    colors = list(CODES)
    out = []
    for i in range(n):
        c, other = colors[i % len(colors)], colors[(i + 3) % len(colors)]
        out.append({"prompt": QUESTION.format(c), "chosen": f"The code for {c} is {CODES[c]}.",
                    "rejected": f"The code for {c} is {CODES[other]}."})
    return out


def test_dpo_continues_an_unsloth_sft_run(small_llama_dir: Path, tmp_path: Path) -> None:
    sft_data = write_jsonl(tmp_path / "codes.jsonl", learnable_rows())
    sft_out = tmp_path / "sft"
    sft_run(*_common(small_llama_dir, sft_out, sft_data, 40), "training.learning_rate=3e-3", log=tmp_path / "sft.log")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    dpo_out = tmp_path / "dpo"
    common = [o for o in _common(small_llama_dir, dpo_out, pairs, 20) if not o.startswith("model.name=")]
    proc = sft_run("--objective", "dpo", "--from", str(sft_out), *common, "training.learning_rate=1e-3",
                   "training.eval_steps=20", "training.eval_on_start=true", log=tmp_path / "dpo.log")
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((dpo_out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["backend"] == "unsloth", summary
    assert summary["objective"]["reference"].startswith(str(sft_out))
    records = read_metrics(dpo_out)
    train = [r for r in records if "loss" in r]
    # The reference is the SFT model, the model DPO starts from: no reward difference at the first step.
    assert train[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    evals = [r for r in records if "eval_loss" in r]
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert evals[-1]["eval_rewards/margins"] > 0
    assert (dpo_out / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["exports"]["lora"]["ok"]


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_other_objectives_train_on_unsloth(objective: str, small_llama_dir: Path, tmp_path: Path) -> None:
    rows = _pairs(64)
    if objective == "kto":
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / objective
    sft_run(*_common(small_llama_dir, out, data, 6), f"objective.name={objective}", "training.learning_rate=1e-3",
            log=tmp_path / f"{objective}.log")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["backend"] == "unsloth", summary
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # finite: the NaN guard would have stopped it
