"""``model.method: fp8`` on a Hopper GPU: the FP8 product against bf16, and the quality gate.

1. :class:`Fp8Linear`'s forward and input gradient against float32 references on random data,
   at the 8B shape's projection sizes and a small one (bf16 operands land near 3e-3 relative
   error; e4m3 with per-row scales near 3e-2).
2. The quality gate (issue 29): ``sft run`` trains the same learnable chat data twice on
   Unsloth, bf16 LoRA (``model.method=lora``) and the FP8 base (``model.method=fp8``), for 220
   steps logged every 10 (and bf16 LoRA once more with other LoRA initial weights, the noise
   floor the gap is reported against); the FP8 run's loss must stay within 2% of the bf16 run's at every
   logged step, and its adapter, on the bf16 base as users deploy it, must answer the eight
   questions at least as well as the bf16 run's. Two models: the small random Llama of the
   other GPU tests, and a random-init model of SmolLM2-135M's shape (30 layers, hidden 576,
   9 heads, 3 KV heads). ``FP8_GATE_DIR``, when set, receives both curves as JSON.

Without a GPU of compute capability 9.0 they are skipped (``sft validate`` refuses the method
there; ``tests/test_fp8.py`` checks that on CPU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sft.engine.metrics import read_metrics
from sft.testing import make_tiny_llama, write_jsonl

from .support import CODES, QUESTION, learnable_rows, sft_run

pytestmark = pytest.mark.gpu

STEPS = 220
LOG_EVERY = 10
#: The issue's bound: the FP8 run's logged loss within 2% of the bf16 run's at every logged step.
GATE = 0.02

#: SmolLM2-135M-Instruct's shape (its config.json), random-init: a small model of a real shape.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.05)


def _fp8_gpu() -> bool:
    from sft.core.env import current_environment

    return current_environment().fp8


needs_fp8 = pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU with FP8 tensor cores (compute capability 9.0+)")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_fp8
@pytest.mark.parametrize("tokens,k,n", [(4096, 4096, 14336), (4096, 14336, 4096), (4096, 4096, 1024), (300, 256, 768)])
def test_fp8_linear_matches_float32(tokens: int, k: int, n: int) -> None:
    import torch

    from sft.plugins.backends.fp8 import _kernels

    torch.manual_seed(tokens + k + n)
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=k ** -0.5)
    w = linear.weight.detach().float().clone()
    layer = _kernels().Fp8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (n, 1)
    x = torch.randn(2, tokens // 2, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, tokens // 2, n)
    ref = x.detach().float() @ w.t()
    grad = torch.randn_like(y)
    y.backward(grad)
    ref_dx = grad.float() @ w
    fwd, bwd = _rel(y, ref), _rel(x.grad, ref_dx)
    print(f"{tokens}x{k} @ {k}x{n}: forward rel err {fwd:.4f}, input gradient rel err {bwd:.4f}")
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert fwd < 0.06 and bwd < 0.06, (fwd, bwd)
    assert layer.weight.grad is None  # the base stays frozen
    # The fused Triton quantizer computes what its torch reference does (with and without column scales).
    rows = x.detach().reshape(-1, k)
    for col in (None, layer.weight_scale.view(-1)[:k].contiguous() if n >= k else None):
        q, s = _kernels().quantize_rows(rows, col)
        q_ref, s_ref = _kernels().quantize_rows_reference(rows, col)
        assert torch.allclose(s, s_ref, rtol=1e-6, atol=0)
        assert (q.float() != q_ref.float()).float().mean() < 1e-3


def _train(model: Path, data: Path, out: Path, method: str, seed: int = 3407) -> list[dict]:
    sft_run(
        f"model.name={model}", "model.backend=unsloth", f"model.method={method}", "model.max_seq_length=128",
        "lora.r=16", "lora.lora_alpha=32", f"data.dataset={data}", "template.name=chatml",
        f"training.output_dir={out}", f"training.max_steps={STEPS}", "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=1", "training.learning_rate=1e-3", "training.warmup_steps=10",
        f"training.logging_steps={LOG_EVERY}", f"training.save_steps={STEPS + 100}", "training.seed=3407", f"lora.random_state={seed}",
        "training.generation_max_new_tokens=4", "loggers.enabled=[]", "export.enabled=[]",
        log=out.with_suffix(".log"))
    return [r for r in read_metrics(out) if "loss" in r]


def _answers(model: Path, adapter: Path) -> int:
    """How many of the eight questions the adapter, on the bf16 base, answers with its code (greedy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda()
    if base.get_input_embeddings().num_embeddings < len(tokenizer):
        base.resize_token_embeddings(len(tokenizer))
    lm = PeftModel.from_pretrained(base, adapter).eval()
    right = 0
    for color, code in CODES.items():
        ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(color)}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.cuda() for k, v in ids.items()}
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=16, do_sample=False)
        right += code in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    del lm, base
    torch.cuda.empty_cache()
    return right


@needs_fp8
@pytest.mark.parametrize("shape", ["small-llama", "smollm2-shape"])
def test_fp8_base_trains_like_bf16_lora(shape: str, small_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SFT_FP8_UNGATED", "1")  # the gate measures the method its last result refuses
    if shape == "small-llama":
        model = small_llama_dir
    else:
        model = make_tiny_llama(tmp_path / "smollm2-shape", tokenizer_dir=os.environ.get("SFT_TOKENIZER_DIR") or None,
                                seed=0, **SMOLLM2_SHAPE)
    data = write_jsonl(tmp_path / "codes.jsonl", learnable_rows(STEPS * 8))
    bf16 = _train(model, data, tmp_path / "lora", "lora")
    fp8 = _train(model, data, tmp_path / "fp8", "fp8")
    # The noise floor: bf16 LoRA again with other LoRA initial weights (what the 2% must be read against).
    reseeded = _train(model, data, tmp_path / "lora-reseeded", "lora", seed=1234)
    log = (tmp_path / "fp8.log").read_text()
    assert "base linear layers in float8 e4m3" in log, log[-3000:]
    steps = [r["step"] for r in bf16]
    a, b = [r["loss"] for r in fp8], [r["loss"] for r in bf16]
    gaps = [abs(x - y) / y for x, y in zip(a, b)]
    floor = [abs(r["loss"] - y) / y for r, y in zip(reseeded, b)]
    answers = {"lora": _answers(model, tmp_path / "lora" / "adapter"), "fp8": _answers(model, tmp_path / "fp8" / "adapter")}
    curves = {"shape": shape, "steps": steps, "bf16_lora": b, "fp8": a, "relative_gap": gaps, "answers": answers,
              "bf16_lora_reseeded": [r["loss"] for r in reseeded], "reseeded_relative_gap": floor,
              "grad_norm": {"bf16_lora": [r.get("grad_norm") for r in bf16], "fp8": [r.get("grad_norm") for r in fp8]}}
    print(json.dumps(curves))
    if os.environ.get("FP8_GATE_DIR"):
        Path(os.environ["FP8_GATE_DIR"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["FP8_GATE_DIR"]) / f"gate-{shape}.json").write_text(json.dumps(curves, indent=1))
    # Every LOG_EVERY steps, and the first step (logging_first_step), on both runs.
    assert steps == [r["step"] for r in fp8] and len(steps) == STEPS // LOG_EVERY + 1, (steps, [r["step"] for r in fp8])
    assert all(x == x and 0 < x < 100 for x in a), a  # finite, non-zero
    assert all(g is None or 0 < g < 1e4 for g in curves["grad_norm"]["fp8"])
    assert max(gaps) <= GATE, (f"FP8 loss left the 2% band: max {max(gaps):.3%} at step {steps[gaps.index(max(gaps))]} "
                               f"(bf16 LoRA reseeded against bf16 LoRA: max {max(floor):.3%})")
    assert answers["fp8"] >= answers["lora"], answers
