"""``model.method: fp8`` without FP8 hardware: refused before anything runs, naming the GPU or its absence.

The FP8 product itself needs a Hopper GPU; ``tests/gpu/test_fp8_gpu.py`` checks it and the
quality gate there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sft.core.config import load_config
from sft.core.env import Environment
from sft.core.errors import ConfigError
from sft.engine.backends import check_method_hardware
from sft.testing import make_plugin_manager

PM = make_plugin_manager()
CPU = Environment(cuda=False, bf16=False, device_name="cpu")


def test_fp8_is_a_method_and_needs_compute_capability_9() -> None:
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
        check_method_hardware(cfg, Environment(cuda=True, bf16=True, device_name="gpu", capability=capability))
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
