"""The NCCL path on one GPU: ``sft run`` under torchrun with world size 1, on the transformers backend.

A single H200 cannot show scaling (issue 19 needs several GPUs), but it runs everything a rank
does on CUDA: joining an NCCL process group, DDP placement (``device_map={"": 0}``), FSDP2
sharding by decoder layer, the cross-rank NaN guard and token count over NCCL, the
checkpoint that every rank writes and rank 0 commits, and rank 0's adapter save.

QLoRA under FSDP2 must store the 4-bit weights in the compute dtype. With bitsandbytes'
default uint8 it trains with loss 0 and NaN gradients (accelerate#3983). The test asserts
finite, non-zero loss and grad norm at every step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sft.testing import write_jsonl

from .support import learnable_rows

pytestmark = pytest.mark.gpu

STEPS = 12


def _torchrun(out: Path, model: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "sft.cli", "run",
            f"model.name={model}", "model.backend=transformers", "model.dtype=bfloat16", "model.max_seq_length=128",
            "lora.r=8", "lora.lora_alpha=16", f"data.dataset={data}", "data.format=sharegpt",
            "template.name=chatml", f"training.output_dir={out}", f"training.max_steps={STEPS}",
            "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
            "training.learning_rate=1e-3", "training.warmup_steps=2", "training.logging_steps=1",
            f"training.save_steps={STEPS // 2}", "training.generation_max_new_tokens=4", "loggers.enabled=[]",
            "export.enabled=[]", *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        pytest.fail(f"torchrun sft run exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}", pytrace=False)
    return proc


def _check_run(out: Path, strategy: str) -> list[dict]:
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == STEPS
    for r in records:
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0, r
        assert isinstance(r["grad_norm"], float) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    assert summary["distributed"]["strategy"] == strategy and summary["distributed"]["world_size"] == 1
    last = out / "checkpoints" / f"checkpoint-{STEPS}"
    assert (last / "COMPLETE").is_file() and (last / "distributed.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "codes.jsonl", learnable_rows(160))


def test_ddp_lora_under_torchrun_on_nccl(small_llama_dir, data, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(out, small_llama_dir, data, "model.method=lora")
    assert "distributed: 1 process(es), ddp; global batch 8" in proc.stderr
    records = _check_run(out, "ddp")
    assert records[-1]["loss"] < records[0]["loss"]


def test_ddp_qlora_loads_on_the_ranks_own_gpu(small_llama_dir, data, tmp_path):
    out = tmp_path / "qlora"
    _torchrun(out, small_llama_dir, data, "model.method=qlora")
    _check_run(out, "ddp")


def test_fsdp2_qlora_with_storage_in_the_compute_dtype_trains(small_llama_dir, data, tmp_path):
    out = tmp_path / "fsdp2"
    _torchrun(out, small_llama_dir, data, "model.method=qlora", "distributed.strategy=fsdp2")
    records = _check_run(out, "fsdp2")
    assert records[-1]["loss"] < records[0]["loss"]


def test_more_processes_than_gpus_is_refused(small_llama_dir, data, tmp_path):
    import torch

    n = torch.cuda.device_count() + 1
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "run", f"model.name={small_llama_dir}",
                           f"data.dataset={data}", f"training.output_dir={tmp_path / 'run'}", "--nproc", str(n)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"{n} processes need {n} GPUs" in proc.stderr
