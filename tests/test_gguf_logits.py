"""A q8_0 GGUF computes what the trained model computes: logits from llama.cpp against transformers.

The export's own verification record compares greedy tokens; this test does not read it. It
loads the q8_0 file in llama.cpp (in a child process, as sft does: llama.cpp stays out of the
torch process), takes the logits at every position of a prompt, and compares them with the
logits of base + adapter computed here by transformers and PEFT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sft.testing import run_sft

LLAMA_LOGITS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama

    path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = Llama(model_path=path, n_ctx=128, logits_all=True, n_threads=1, verbose=False)
    model.eval(ids)
    np.save(out, np.array(model.scores[:len(ids)], dtype=np.float32))
""")


def test_q8_0_logits_match_transformers(tiny_run, tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    run_sft("export", run, "--exporter", "gguf", "export.gguf.quants=[q8_0]", "export.verify=false")
    [gguf] = (run / "exports" / "gguf").glob("*Q8_0.gguf")

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    ids = tokenizer("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am",
                    add_special_tokens=False)["input_ids"]
    out = tmp_path / "llama.npy"
    subprocess.run([sys.executable, "-c", LLAMA_LOGITS, str(gguf), json.dumps(ids), str(out)], check=True,
                   timeout=300)
    got = torch.from_numpy(np.load(out))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if base.get_input_embeddings().num_embeddings < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, :, :got.shape[1]].float()
    assert got.shape == want.shape
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 0.05, f"q8_0 logits differ from transformers' by {relative:.3%}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    # and the check can tell: an unrelated model's logits are far off
    assert ((got - torch.roll(want, 1, dims=0)).norm() / want.norm()).item() > 5 * relative
