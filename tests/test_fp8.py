"""``model.method: fp8`` without FP8 hardware: refused before anything runs, naming the GPU or its absence.

The FP8 product itself needs a Hopper GPU; ``tests/gpu/test_fp8_gpu.py`` checks it and the
quality gate there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sft.engine.configuration import load_config
from sft.core.env import Environment
from sft.core.errors import ConfigError
from sft.engine.backends import check_method_hardware
from sft.testing import make_plugin_manager

PM = make_plugin_manager()
CPU = Environment(cuda=False, bf16=False, device_name="cpu")


def test_fp8_is_a_method_and_needs_compute_capability_9(monkeypatch) -> None:
    cfg = load_config(None, ["model.method=fp8"], pm=PM)
    assert cfg.model.method == "fp8"
    with pytest.raises(ConfigError) as info:
        check_method_hardware(cfg, CPU)
    assert "model.method" in str(info.value) and "no CUDA GPU" in str(info.value)
    ampere = Environment(cuda=True, bf16=True, device_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    with pytest.raises(ConfigError) as info:
        check_method_hardware(cfg, ampere)
    assert "NVIDIA A100-SXM4-80GB is compute capability 8.0" in str(info.value)
    ada = Environment(cuda=True, bf16=True, device_name="NVIDIA L4", capability=(8, 9))
    with pytest.raises(ConfigError):  # FP8 tensor cores, but no per-row scaled products
        check_method_hardware(cfg, ada)
    for capability in ((9, 0), (10, 0)):
        hopper = Environment(cuda=True, bf16=True, device_name="gpu", capability=capability)
        # Where it could run, the failed quality gate refuses it, saying what was measured ...
        monkeypatch.delenv("SFT_FP8_UNGATED", raising=False)
        with pytest.raises(ConfigError) as info:
            check_method_hardware(cfg, hopper)
        assert "quality gate" in str(info.value) and "30%" in str(info.value)
        monkeypatch.setenv("SFT_FP8_UNGATED", "1")  # ... unless asked for, to measure it again
        check_method_hardware(cfg, hopper)
    for method in ("qlora", "lora", "full"):  # nothing else is checked
        check_method_hardware(load_config(None, [f"model.method={method}"], pm=PM), CPU)


def test_environment_without_capability_has_no_fp8() -> None:
    assert not Environment(cuda=True, bf16=True, device_name="a CUDA GPU").fp8
    assert not CPU.fp8


def test_sft_validate_refuses_fp8_without_a_gpu() -> None:
    from sft.core.env import current_environment

    if current_environment().fp8:
        pytest.skip("this machine has an FP8 GPU")
    result = subprocess.run([sys.executable, "-m", "sft.cli", "validate", "model.method=fp8"],
                            capture_output=True, text=True, env={**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 2, result.stderr
    assert "model.method" in result.stderr and "compute capability 9.0" in result.stderr
    assert "Traceback" not in result.stderr


def _rel(a, b) -> float:
    return float((a.detach().float() - b.float()).norm() / b.float().norm())


def test_fp8_linear_forward_and_input_gradient_match_float32() -> None:
    """The FP8 product's algebra (per-token activation scales, per-row weight scales, the row scales
    folded into the output gradient, the transposed operand) on CPU, where torch._scaled_mm also runs;
    on a GPU the same Function runs with the Triton quantizer (tests/gpu/test_fp8_gpu.py)."""
    import torch

    from sft.plugins.backends.fp8 import _kernels

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    w = linear.weight.detach().clone()
    layer = _kernels().Fp8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (96, 1)
    assert not layer.weight.requires_grad
    x = torch.randn(3, 40, 256, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 40, 96)
    grad = torch.randn_like(y)
    y.backward(grad)
    forward, backward = _rel(y, x.detach() @ w.t()), _rel(x.grad, grad @ w)
    # e4m3 keeps 3 mantissa bits: about 3.5% relative error on random data; bf16 would be ~0.3%.
    assert 0.01 < forward < 0.06 and 0.01 < backward < 0.06, (forward, backward)
    assert layer.weight.grad is None


def test_lora_layers_get_an_fp8_base_and_still_train(tiny_model_dir) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.plugins.backends.fp8 import _kernels, convert_lora_base_to_fp8

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    report = convert_lora_base_to_fp8(model)
    # The tiny Llama: 2 layers x 7 projections, hidden 64, intermediate 128, 2 KV heads of 16 (k/v: 32 outputs).
    assert report.converted == 14 and not report.skipped
    assert report.bytes_after < report.bytes_before / 3  # 1 byte a weight (+ a scale a row) against 4
    assert "14 base linear layers in float8 e4m3" in report.describe()
    fp8 = [m for m in model.modules() if isinstance(m, _kernels().Fp8Linear)]
    assert len(fp8) == 14
    ids = torch.randint(0, 1000, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)  # lora_B starts at zero: lora_A's gradient is zero at first
    assert all(m.weight.grad is None for m in fp8)


def test_transformers_backend_puts_the_fp8_base_under_its_adapters(tiny_model_dir) -> None:
    """The backend's own wiring (load, then prepare_for_training with model.method=fp8); the run
    itself refuses fp8 without a Hopper GPU, so this calls the backend directly."""
    import torch

    from sft.plugins.backends.fp8 import _kernels
    from sft.plugins.backends.transformers import TransformersBackend

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.method=fp8", "lora.r=4"], pm=PM)
    backend = TransformersBackend()
    model, _tokenizer = backend.load(cfg)
    model = backend.prepare_for_training(model, cfg)
    fp8 = [m for m in model.modules() if isinstance(m, _kernels().Fp8Linear)]
    assert len(fp8) == 14 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    assert backend.distributed_reason(cfg, "fsdp2") and "fp8" in backend.distributed_reason(cfg, "fsdp2")
    assert backend.distributed_reason(cfg, "ddp") is None
