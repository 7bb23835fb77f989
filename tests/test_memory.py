"""The arithmetic of ``training.memory=auto`` and which backends take each policy (the probe and
the tiled MLP themselves run in tests/gpu)."""

from __future__ import annotations

import pytest

from sft.plugins.backends.memory import GIB, CheckpointPlan, choose_skip
from sft.testing import run_sft, tiny_overrides


@pytest.mark.parametrize(
    "layers,base,per_layer,budget,expected",
    [
        # The H100 measurement of issue 7: 8.7 GiB fully checkpointed, 1.8 GiB a layer, 70 GiB budget.
        (32, int(8.7 * GIB), int(1.8 * GIB), 70 * GIB, 32),
        (32, int(8.7 * GIB), int(1.8 * GIB), 40 * GIB, 17),
        (32, int(8.7 * GIB), int(1.8 * GIB), 10 * GIB, 0),
        (32, 9 * GIB, 2 * GIB, 8 * GIB, 0),  # the base step alone is over the budget
        (32, 9 * GIB, 0, 20 * GIB, 32),  # nothing to save: keep every layer
        (0, 0, GIB, GIB, 0),
    ],
)
def test_choose_skip(layers: int, base: int, per_layer: int, budget: int, expected: int) -> None:
    skip = choose_skip(layers, base, per_layer, budget)
    assert skip == expected
    if 0 < skip < layers:
        assert base + skip * per_layer <= budget < base + (skip + 1) * per_layer


def test_plan_describes_itself() -> None:
    plan = CheckpointPlan(layers=32, skip=24, budget_bytes=70 * GIB, base_peak_bytes=9 * GIB,
                          per_layer_bytes=2 * GIB, planned_peak_bytes=57 * GIB)
    assert plan.describe() == ("memory=auto: 8 of 32 layers checkpointed (budget 70.0 GiB, base 9.0 GiB, "
                               "2.0 GiB/layer, step peak 57.0 GiB)")
    assert plan.to_json()["skip"] == 24


@pytest.mark.parametrize("memory", ["auto", "long"])
def test_memory_policies_are_unsloths_and_refused_elsewhere(memory, tiny_model_dir, tmp_path, sft_plugin_manager):
    args = [*tiny_overrides(tmp_path / "run", tiny_model_dir), f"training.memory={memory}"]
    result = run_sft("validate", *args, "model.backend=transformers", check=False)
    assert result.exit_code == 2, result.output
    assert (f"training.memory: {memory}: plans Unsloth's checkpointing or tiled MLP, which this backend does not "
            "have; use model.backend=unsloth (CUDA) or training.memory=default (backend 'transformers')") in result.output
    # `sft validate` asks the named backend even where it cannot run: Unsloth takes both.
    result = run_sft("validate", *args, "model.backend=unsloth", check=False)
    assert "training.memory" not in result.output, result.output
