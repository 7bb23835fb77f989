"""Plot the FP8 quality gate's loss curves (``tests/gpu/test_fp8_gpu.py`` with ``FP8_GATE_DIR``).

    python bench/fp8_gate_plot.py GATE_DIR OUT.png

One panel per model: bf16 LoRA's and the FP8 base's logged loss, and their relative gap
against the 2% bound on a second axis.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    gate_dir, out = Path(args[0]), Path(args[1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(gate_dir.glob("gate-*.json"))]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.plot(run["steps"], run["bf16_lora"], label="bf16 LoRA (model.method=lora)")
        ax.plot(run["steps"], run["fp8"], "--", label="FP8 base (model.method=fp8)")
        if run.get("bf16_lora_reseeded"):
            ax.plot(run["steps"], run["bf16_lora_reseeded"], ":", label="bf16 LoRA, other LoRA seed")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean of 10 steps)")
        ax.set_title(f"{run['shape']}: answers {run['answers']['fp8']}/8 fp8, {run['answers']['lora']}/8 bf16")
        gap = ax.twinx()
        gap.plot(run["steps"], [100 * g for g in run["relative_gap"]], ":", color="gray", label="gap %")
        gap.axhline(2.0, color="red", linewidth=0.8)
        gap.set_ylabel("|fp8 - bf16| / bf16, % (red: 2%)")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
