"""Two trainings in one process (a notebook, or the bench's shared setups): the second starts
from the GPU memory the first started from, and bitsandbytes keeps none of the first model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft.testing import write_jsonl

from .support import learnable_rows

pytestmark = pytest.mark.gpu

SCRIPT = """
import gc, json, sys
import torch
from sft.engine.configuration import load_config
from sft.engine.run import run_training

overrides, out = json.loads(sys.argv[1]), sys.argv[2]
allocated = []
for i in range(2):
    run_training(load_config(None, overrides + [f"training.output_dir={out}/run{i}"]))
    gc.collect()
    torch.cuda.empty_cache()
    allocated.append(torch.cuda.memory_allocated())
import bitsandbytes
held = bitsandbytes.optim.GlobalOptimManager.get_instance().module_weight_config_triple
print("RESULT " + json.dumps({"allocated": allocated, "held": len(held)}))
"""


def test_a_second_training_in_one_process_starts_clean(small_llama_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "codes.jsonl", learnable_rows(32))
    overrides = [
        f"model.name={small_llama_dir}", "model.backend=unsloth", "model.method=qlora", "model.max_seq_length=128",
        f"data.dataset={data}", "training.max_steps=2", "training.per_device_train_batch_size=4",
        "training.optim=adamw_8bit", "training.save_steps=1000", "training.generation_max_new_tokens=2",
        "loggers.enabled=[]", "export.enabled=[]"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides), str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    # The 8-bit optimizer's embedding override was registered (adamw_8bit) and released.
    assert result["held"] == 0
    first, second = result["allocated"]
    # The small Llama's embedding alone is 49152 x 256 bf16 = 24 MiB: a kept model would show.
    assert second - first < 4 * 2**20, result
