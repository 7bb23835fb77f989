"""Where a packed and a padded QLoRA step spend their time (issue 14), in one GPU process.

    python bench/packing_profile.py --model-dir DIR --tokenizer DIR [--phases a,b,...]

1. Attention alone: forward+backward of one layer's causal attention over 8 rows x 2048
   tokens of chat-length documents (32 query heads, 8 KV heads, dim 128, bf16), per path,
   with each path's largest difference from the per-document reference.
2. One Unsloth QLoRA model (the 8B shape of bench/train_throughput.py), trained by TRL's
   SFTTrainer in phases that differ only in how batches are built and which attention runs;
   batch 8, no accumulation. Each phase prints its real (non-pad) tokens/s over the timed
   steps, their step times (a rising series means recompiles or growing caches), pad share
   and peak memory; some phases profile one more step with torch.profiler and print the
   kernels that took the most GPU time, grouped (attention, matmul, dequant, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import GIB, TARGETS, chat_conversations, chatml_text, create_model  # noqa: E402

SEQ = 2048


def say(*args: Any) -> None:
    print(*args, flush=True)


# -- attention alone ------------------------------------------------------------------------
def doc_lengths(tokenizer: Any, rows: int, seq: int, seed: int = 0) -> list[list[int]]:
    """Documents of the chat workload packed first-fit into ``rows`` rows of exactly ``seq`` tokens."""
    lengths = [min(seq, len(tokenizer(chatml_text(c["conversations"]))["input_ids"]))
               for c in chat_conversations(rows * 12, seed)]
    out, row = [], []
    for n in lengths:
        if sum(row) + n > seq:
            if sum(row) < seq:
                row.append(seq - sum(row))  # the rest of the row: one more (short) document
            out.append(row)
            row = []
            if len(out) == rows:
                break
        row.append(n)
    return out


def attention_bench(tokenizer: Any) -> None:
    import torch
    import torch.nn.functional as F

    rows = doc_lengths(tokenizer, 8, SEQ)
    flat = [n for r in rows for n in r]
    say(f"attention: 8 x {SEQ} tokens, {len(flat)} documents, mean {sum(flat) / len(flat):.0f} tokens")
    B, H, HKV, D = 8, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q0 = torch.randn(B, H, SEQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k0 = torch.randn(B, HKV, SEQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v0 = torch.randn(B, HKV, SEQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(B, SEQ, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.tensor(flat, device="cuda", dtype=torch.int32)
    cu = torch.zeros(len(flat) + 1, device="cuda", dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    max_len = int(lengths.max())
    doc = torch.repeat_interleave(torch.arange(len(flat), device="cuda"), lengths).view(B, SEQ)

    def flat_(x):  # (B, h, S, D) -> (1, h, B*S, D)
        return x.transpose(0, 1).reshape(1, x.shape[1], B * SEQ, D)

    def per_doc(q, k, v):  # reference: each document alone
        outs = []
        for x in range(len(flat)):
            s, e = int(cu[x]), int(cu[x + 1])
            fq, fk, fv = flat_(q)[:, :, s:e], flat_(k)[:, :, s:e], flat_(v)[:, :, s:e]
            outs.append(F.scaled_dot_product_attention(fq, fk, fv, is_causal=True, enable_gqa=True))
        return torch.cat(outs, 2)[0].transpose(0, 1).reshape(B, SEQ, H, D)

    def full_causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & torch.ones(SEQ, SEQ, device="cuda", dtype=torch.bool).tril()

    def dense_mask(q, k, v):  # K/V repeated: with a mask and enable_gqa only the math kernel runs
        k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    from unsloth.utils import attention_dispatch as ad

    def unsloth_segments(q, k, v):
        out = ad._sdpa_packed_segments(flat_(q), flat_(k), flat_(v), tuple(flat), n_groups=H // HKV,
                                       is_causal=True, sliding_window=None, sdpa_kwargs={})
        return out[0].view(B, SEQ, H, D)

    from torch.nn.attention.varlen import varlen_attn

    from sft.plugins.backends.unsloth_varlen import varlen_with_gqa

    gqa_varlen = varlen_with_gqa(varlen_attn)

    def tnd(x):  # (B, h, S, D) -> (B*S, h, D)
        return x.transpose(1, 2).reshape(B * SEQ, x.shape[1], D)

    def varlen_native(q, k, v):
        return varlen_attn(tnd(q), tnd(k), tnd(v), cu, cu, max_len, max_len, window_size=(-1, 0)).view(B, SEQ, H, D)

    def varlen_expanded(q, k, v):
        return gqa_varlen(tnd(q), tnd(k), tnd(v), cu, cu, max_len, max_len, window_size=(-1, 0),
                          enable_gqa=True).view(B, SEQ, H, D)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def doc_causal(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)

    block = create_block_mask(doc_causal, B, None, SEQ, SEQ, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_doc(q, k, v):
        return flex(q, k, v, block_mask=block, enable_gqa=True).transpose(1, 2)

    paths = [("full causal SDPA, no document mask (a bound, not correct)", full_causal),
             ("Unsloth per-segment SDPA loop (its torch 2.11 path)", unsloth_segments),
             ("SDPA with a dense block-diagonal mask", dense_mask),
             ("torch varlen, K/V given with 8 heads", varlen_native),
             ("torch varlen, K/V heads repeated (sft's patch)", varlen_expanded),
             ("FlexAttention document block mask, compiled", flex_doc)]
    with torch.no_grad():
        ref = per_doc(q0, k0, v0).float()
    results = []
    for name, fn in paths:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        try:
            out = fn(q, k, v)
            diff = (out.float() - ref).abs().max().item()
            for _ in range(3):
                fn(q, k, v).backward(dout)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn(q, k, v).backward(dout)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            results.append({"path": name, "ms": round(ms, 2), "max_abs_diff_vs_per_document": diff})
            say(f"  {name}: {ms:.2f} ms fwd+bwd, max |diff| vs per-document {diff:.3g}")
        except Exception as exc:  # noqa: BLE001 - a path this torch lacks is a result too
            results.append({"path": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            say(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
    say("ATTENTION " + json.dumps(results))


# -- training phases ------------------------------------------------------------------------
KERNEL_GROUPS = (  # first match wins: host<->device copies before the other copies
    ("offload copies (host<->device)", ("memcpy htod", "memcpy dtoh", "memcpy hto", "memcpy dto")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "softmax")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas")),
    ("optimizer (8-bit AdamW)", ("optimizer", "adam", "kpreconditionoptimizer")),
    ("dequant (NF4)", ("dequant", "kdequantize", "bnb")),
    ("cross-entropy", ("cross_entropy", "crossentropy", "logsumexp", "nll")),
    ("norm/rope/swiglu (Triton)", ("rms", "rope", "swiglu", "geglu", "layernorm", "triton")),
    ("copy/cat/index", ("copy", "cat", "index", "gather", "scatter", "fill", "memcpy", "memset")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled")),
)


def profile_summary(prof: Any, wall_s: float) -> dict[str, Any]:
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
              and str(e.device_type).endswith("CUDA")]
    def t(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    events.sort(key=t, reverse=True)
    total = sum(t(e) for e in events) / 1e6
    groups: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + t(e) / 1e6
    top = [{"kernel": e.key[:90], "ms": round(t(e) / 1e3, 1), "calls": e.count} for e in events[:12]]
    return {"wall_s": round(wall_s, 3), "gpu_busy_s": round(total, 3),
            "groups_s": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}, "top": top}


def run_phase(a, model, tokenizer, name: str, dataset, *, packing: bool, padding_free: bool | None,
              grouped: bool = False, varlen: bool = False, pad_to: int | None = None,
              warmup: int = 2, timed: int = 4, profile: bool = False) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth.utils import attention_dispatch as ad

    from sft.plugins.backends.unsloth_varlen import varlen_with_gqa

    if varlen:
        from torch.nn.attention.varlen import varlen_attn

        ad._TORCH_VARLEN_ATTN = varlen_with_gqa(varlen_attn)
    else:
        ad._TORCH_VARLEN_ATTN = None
    steps = warmup + timed + (1 if profile else 0)
    extra: dict[str, Any] = {}
    if padding_free is not None:
        extra["padding_free"] = padding_free
    if grouped:
        extra["train_sampling_strategy"] = "group_by_length"
    if pad_to:
        extra["pad_to_multiple_of"] = pad_to
    args = SFTConfig(
        output_dir=str(a.work / f"phase-{name}"), per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=5, weight_decay=0.01,
        optim="adamw_8bit", bf16=True, logging_steps=1, save_strategy="no", report_to="none", seed=3407,
        max_length=SEQ, packing=packing, dataset_num_proc=1, **extra)
    times: dict[int, float] = {}
    prof_box: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if profile and state.global_step + 1 == steps:
                torch.cuda.synchronize()
                prof_box["p"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                prof_box["p"].start()
                prof_box["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if "p" in prof_box and "wall" not in prof_box:
                torch.cuda.synchronize()
                prof_box["wall"] = time.perf_counter() - prof_box["t"]
                prof_box["p"].stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                torch.cuda.synchronize()
                times[state.global_step] = time.perf_counter()

    tick = time.perf_counter()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args,
                         callbacks=[Clock()])
    setup_s = time.perf_counter() - tick
    counts: list[tuple[int, int]] = []  # (real tokens, slots) per micro-batch
    collator = trainer.data_collator
    inner = collator.torch_call

    def counting(examples):
        batch = inner(examples)
        slots = batch["input_ids"].numel()
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        elif "packed_seq_lengths" in batch:
            real = int(batch["packed_seq_lengths"].sum())
        else:
            real = slots
        counts.append((real, slots))
        return batch

    collator.torch_call = counting
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    last = warmup + timed
    secs = [round(times[s + 1] - times[s], 3) for s in range(warmup, last)]
    real = sum(c[0] for c in counts[warmup:last])
    slots = sum(c[1] for c in counts[warmup:last])
    result = {"phase": name, "tokens_per_s": round(real / sum(secs), 1), "step_s": secs,
              "real_tokens_per_step": real // timed, "pad_share": round(1 - real / slots, 4),
              "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2), "trainer_setup_s": round(setup_s, 1),
              "backend": ad.select_attention_backend(True)}
    if "p" in prof_box:
        result["profile"] = profile_summary(prof_box["p"], prof_box["wall"])
    say("PHASE " + json.dumps(result))
    del trainer
    torch.cuda.empty_cache()
    return result


def loss_check(model, tokenizer, dataset) -> None:
    """The same packed batch through Unsloth's per-segment loop and through the varlen patch."""
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth.utils import attention_dispatch as ad
    from torch.nn.attention.varlen import varlen_attn

    from sft.plugins.backends.unsloth_varlen import varlen_with_gqa

    args = SFTConfig(output_dir="/tmp/sft-bench/loss-check", per_device_train_batch_size=8, max_length=SEQ,
                     packing=True, report_to="none", dataset_num_proc=1, bf16=True)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    losses = {}
    for name, fn in (("segments", None), ("varlen", varlen_with_gqa(varlen_attn))):
        ad._TORCH_VARLEN_ATTN = fn
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            losses[name] = float(model(**batch, use_cache=False).loss)
    ad._TORCH_VARLEN_ATTN = None
    say("LOSSCHECK " + json.dumps({**losses, "documents": int(batch["packed_seq_lengths"].numel()),
                                   "tokens": int(batch["input_ids"].numel())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sft-bench/llama-3.1-8b-shape"))
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-bench"))
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--phases", default="all")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if not (a.model_dir / "config.json").exists():
        create_model(a.model_dir, a.tokenizer)
    tick = time.perf_counter()
    import unsloth  # noqa: F401
    say(f"import unsloth: {time.perf_counter() - tick:.1f}s")
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset

    tick = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(str(a.model_dir), max_seq_length=SEQ, load_in_4bit=True,
                                                         dtype=None, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=True)
    say(f"load + LoRA: {time.perf_counter() - tick:.1f}s")
    attention_bench(tokenizer)

    convos = chat_conversations(3000, seed=0)
    ids = [tokenizer(chatml_text(c["conversations"]), add_special_tokens=False)["input_ids"][:SEQ] for c in convos]
    lens = [len(x) for x in ids]
    say(f"chat data: {len(ids)} rows, mean {sum(lens) / len(lens):.0f} tokens, max {max(lens)}, "
        f"{sum(n == SEQ for n in lens)} truncated")
    chat = Dataset.from_dict({"input_ids": ids})
    from train_throughput import token_rows

    fixed = Dataset.from_dict({"input_ids": token_rows(tokenizer, 8 * 8, SEQ)})
    loss_check(model, tokenizer, chat)
    phases = {  # most telling first: a call cut short at its limit keeps these
        "fixed": dict(dataset=fixed, packing=False, padding_free=False, profile=True),
        "packed-stock": dict(dataset=chat, packing=True, padding_free=None, timed=3, profile=True),
        "packed-varlen": dict(dataset=chat, packing=True, padding_free=None, varlen=True, timed=8, profile=True),
        "padded-grouped": dict(dataset=chat, packing=False, padding_free=False, grouped=True, timed=6, profile=True),
        "padded-random": dict(dataset=chat, packing=False, padding_free=False),
        "padfree-stock": dict(dataset=chat, packing=False, padding_free=None, timed=3),
        "packed-varlen-static": dict(dataset=chat, packing=True, padding_free=None, varlen=True, timed=6,
                                     pad_to=8 * SEQ),
        "padfree-varlen": dict(dataset=chat, packing=False, padding_free=None, varlen=True, timed=6),
    }
    chosen = list(phases) if a.phases == "all" else a.phases.split(",")
    for name in chosen:
        try:
            run_phase(a, model, tokenizer, name, **phases[name])
        except Exception as exc:  # noqa: BLE001 - later phases still run
            import traceback

            traceback.print_exc()
            say("PHASE " + json.dumps({"phase": name, "error": f"{type(exc).__name__}: {exc}"[:300]}))


if __name__ == "__main__":
    main()
