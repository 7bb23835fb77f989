"""Packed batches on the Unsloth backend keep documents apart, through torch's varlen kernel (issue 14).

``sft.plugins.backends.unsloth_varlen`` hands Unsloth's dispatcher a ``varlen_attn`` on torch
2.11 (a private name, version-guarded): this checks, in a fresh process (Unsloth patches
transformers process-wide), that the patch applies to this Unsloth, that a packed row really
goes through it, and that every document's logits equal those of the document run alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = r"""
import json, sys
import unsloth  # noqa: F401  (first, as the backend does)
import torch
from unsloth import FastLanguageModel
from unsloth.utils import attention_dispatch as ad
from sft.plugins.backends.unsloth_varlen import enable_varlen_gqa

changed = enable_varlen_gqa()
calls = []
kernel = ad._TORCH_VARLEN_ATTN
if kernel is not None:
    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return kernel(*args, **kwargs)
    ad._TORCH_VARLEN_ATTN = counted
model, _ = FastLanguageModel.from_pretrained(sys.argv[1], max_seq_length=512, load_in_4bit=False,
                                             dtype=torch.bfloat16, local_files_only=True)
model.eval()
torch.manual_seed(0)
lengths = [37, 120, 5, 81, 64]
docs = [torch.randint(10, 4000, (n,), device="cuda") for n in lengths]
ids = torch.cat(docs)[None]
positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
with torch.no_grad():
    packed = model(input_ids=ids, position_ids=positions, use_cache=False,
                   packed_seq_lengths=torch.tensor(lengths, dtype=torch.int32)).logits[0].float()
    alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0].float() for d in docs])
    # The same row without the document boundaries: what a missing mask would give.
    crossed = model(input_ids=ids, use_cache=False).logits[0].float()
print("RESULT " + json.dumps({"changed": changed, "varlen_calls": len(calls),
                              "max_diff": (packed - alone).abs().max().item(),
                              "crossed_diff": (crossed - alone).abs().max().item(),
                              "scale": alone.abs().max().item()}))
"""


def test_packed_rows_take_varlen_and_match_documents_alone(small_llama_dir):
    import torch

    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12):
        pytest.skip("torch >= 2.12: Unsloth calls varlen_attn with enable_gqa itself")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(small_llama_dir)], capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["changed"], result  # the Unsloth/torch pair this patch is for
    assert result["varlen_calls"] >= 4, result  # every layer's packed attention went through it
    assert result["max_diff"] <= 0.02 * result["scale"], result  # bf16: equal up to rounding
    assert result["crossed_diff"] > 10 * max(result["max_diff"], 1e-3), result  # the boundaries matter
