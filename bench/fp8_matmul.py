"""The card's matrix ceilings and the FP8 base product at the 8B shape (issue 29), one table.

    python bench/fp8_matmul.py [--tokens 16384] [--json out.json]

1. Ceilings: an 8192^3 bf16 product (``torch.mm``) and an 8192^3 e4m3 product with per-row
   scales (``torch._scaled_mm``), random data, median of 20 after warm-up (Triton's do_bench).
2. Per projection of the Llama-3.1-8B shape at ``--tokens`` tokens a pass: the bf16 product
   (forward, and the input gradient), and :mod:`sft.plugins.backends.fp8`'s (the activation's
   per-token quantization included; the backward's transposed weight copy and scale folding
   included), with their relative error against float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    import torch
    from triton.testing import do_bench

    from sft.plugins.backends.fp8 import _kernels

    k = _kernels()
    bench = lambda fn: do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731  (ms)
    torch.manual_seed(0)
    n = 8192
    a16, b16 = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16_tflops = 2 * n**3 / bench(lambda: torch.mm(a16, b16)) / 1e9
    a8, sa = k.quantize_rows(a16)
    b8, sb = k.quantize_rows(b16)
    fp8_tflops = 2 * n**3 / bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.view(1, -1),
                                                            out_dtype=torch.bfloat16, use_fast_accum=True)) / 1e9
    del a16, b16, a8, b8
    rows = []
    t = a.tokens
    for name, (kin, kout) in SHAPES.items():
        lin = torch.nn.Linear(kin, kout, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=kin ** -0.5)
        w = lin.weight.detach()
        x = torch.randn(t, kin, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(t, kout, device="cuda", dtype=torch.bfloat16)
        layer = k.Fp8Linear(lin)
        q, s = layer.weight, layer.weight_scale
        flop = 2 * t * kin * kout
        r = {"projection": name, "tokens": t, "in": kin, "out": kout,
             "bf16_fwd_ms": bench(lambda: torch.mm(x, w.t())),
             "bf16_dx_ms": bench(lambda: torch.mm(g, w)),
             "quant_act_ms": bench(lambda: k.quantize_rows(x)),
             "fp8_fwd_ms": bench(lambda: k.Fp8Matmul.forward(_Ctx(), x, q, s)),
             "dequant_bf16_ms": bench(lambda: q.to(torch.bfloat16) * s.to(torch.bfloat16))}

        def fp8_dx():
            ctx = _Ctx()
            ctx.saved_tensors = (q, s)
            ctx.shape = x.shape
            return k.Fp8Matmul.backward(ctx, g)[0]

        r["fp8_dx_ms"] = bench(fp8_dx)
        ref = x.float() @ w.float().t()
        r["fp8_fwd_rel_err"] = float((k.Fp8Matmul.forward(_Ctx(), x, q, s).float() - ref).norm() / ref.norm())
        ref_dx = g.float() @ w.float()
        r["fp8_dx_rel_err"] = float((fp8_dx().float() - ref_dx).norm() / ref_dx.norm())
        for key in ("bf16_fwd", "bf16_dx", "fp8_fwd", "fp8_dx"):
            r[key + "_tflops"] = flop / r[key + "_ms"] / 1e9
        rows.append(r)
        del lin, layer, x, g, w
        torch.cuda.empty_cache()

    # One checkpointed LoRA pass of the 32-layer 8B shape does forward, recompute and input gradient.
    def per_pass(fwd: str, dx: str) -> float:
        return 32 * sum(PER_LAYER[r["projection"]] * (2 * r[fwd] + r[dx]) for r in rows) / 1e3

    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "bf16_tflops_8192": bf16_tflops, "fp8_rowwise_tflops_8192": fp8_tflops, "rows": rows,
               "base_products_per_pass_s": {"bf16": per_pass("bf16_fwd_ms", "bf16_dx_ms"),
                                            "fp8_fwd_bf16_dequant_bwd": 32 * sum(PER_LAYER[r["projection"]] * (
                                                2 * r["fp8_fwd_ms"] + r["bf16_dx_ms"] + r["dequant_bf16_ms"])
                                                for r in rows) / 1e3,
                                            "fp8": per_pass("fp8_fwd_ms", "fp8_dx_ms")}}
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    print(f"{summary['device']}, torch {torch.__version__}: bf16 {bf16_tflops:.0f} TFLOP/s, "
          f"e4m3 rowwise {fp8_tflops:.0f} TFLOP/s (8192^3)")
    print("| projection | bf16 fwd ms | fp8 fwd ms (quant) | bf16 dX ms | fp8 dX ms | dequant ms | fp8 fwd/dX rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['projection']} {r['in']}->{r['out']} | {r['bf16_fwd_ms']:.3f} | {r['fp8_fwd_ms']:.3f} "
              f"({r['quant_act_ms']:.3f}) | {r['bf16_dx_ms']:.3f} | {r['fp8_dx_ms']:.3f} | {r['dequant_bf16_ms']:.3f} | "
              f"{r['fp8_fwd_rel_err']:.4f} / {r['fp8_dx_rel_err']:.4f} |")
    print("base products of one checkpointed pass (s):", json.dumps(summary["base_products_per_pass_s"]))


class _Ctx:
    """Stands in for autograd's context when the Function's halves are timed alone."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


if __name__ == "__main__":
    main()
