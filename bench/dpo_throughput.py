"""DPO throughput: `sft run --objective dpo` (Unsloth backend) against a plain Unsloth + TRL DPO script.

One command, both setups on the same preference pairs, one table with the ratios::

    python bench/dpo_throughput.py --tokenizer DIR

The workload (issue 26): the Llama-3.1-8B shape of ``bench/train_throughput.py`` (random-init,
bf16, saved once), QLoRA r=16 on all 7 linear projections, rsLoRA, adamw_8bit, Unsloth's
offloaded checkpointing; DPO (sigmoid, beta 0.1) with the base as the reference (adapters
disabled), batch ``--batch`` pairs, no accumulation, one epoch over ``--pairs`` pairs. The pairs
are chat-shaped and of every length: the prompt is a conversation of
:func:`train_throughput.chat_conversations` (its last assistant turn removed), chosen is that
turn, rejected a shuffled other answer. Both setups train on every pair once, each in its own
order: the raw script in TRL's (random), ``sft`` in length groups of up to 50 steps' pairs (its
default for pairs), so the 200 pairs of the default are one such group, as in a larger set.

Each setup runs in its own subprocess. tokens/s counts the non-padding tokens of the batches the
model runs (prompt + chosen and prompt + rejected), from the step after ``--warmup`` on: the
run's own ``tokens`` for ``sft``, transformers' ``num_input_tokens_seen`` ("non_padding") for
the raw script. Peak is ``torch.cuda.max_memory_allocated()`` over the subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from train_throughput import (  # noqa: E402
    RESULT_TAG, SETUP_TAG, TARGETS, StepClock, _result, _sections, chat_conversations, create_model, peak_gib, versions,
)


def preference_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` pairs in TRL's conversational preference form, from the chat workload's conversations."""
    rng = random.Random(seed)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    convos = [c["conversations"] for c in chat_conversations(n, seed)]
    answers = [c[-1]["value"] for c in convos]
    pairs = []
    for convo in convos:
        prompt = [{"role": roles[m["from"]], "content": m["value"]} for m in convo[:-1]]
        other = rng.choice(answers)
        rejected = other if other != convo[-1]["value"] else other + " (unsure)"
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": convo[-1]["value"]}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def run_sft(a: argparse.Namespace) -> dict[str, Any]:
    """`sft run --objective dpo` through the library, timed by a logger plugin."""
    from sft.core import hookimpl
    from sft.engine.configuration import load_config
    from sft.core.interfaces import Logger
    from sft.core.plugins import get_plugin_manager
    from sft.engine.run import run_training

    clock = StepClock()
    tokens: dict[int, int] = {}

    class BenchClock(Logger):
        name = "bench-clock"
        description = "wall time per logged step, CUDA synchronized"

        def start(self, run, options=None) -> None:
            clock.times.clear()

        def log(self, step, metrics) -> None:
            if "loss" in metrics:
                clock.tick(step)
                tokens[int(step)] = int(metrics["tokens"])

        def finish(self, summary) -> None:
            pass

    class Plugin:
        @hookimpl
        def register_loggers(self, register):
            register(BenchClock())

    pm = get_plugin_manager()
    pm.register(Plugin(), "bench-clock")
    steps = a.pairs // a.batch
    data = a.work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(a.pairs, a.seed)))
    out = a.work / "sft-dpo"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [
        f"model.name={a.model_dir}", "model.backend=unsloth", "model.method=qlora", f"model.max_seq_length={a.seq}",
        "lora.r=16", "lora.lora_alpha=16", "lora.lora_dropout=0.0", "lora.use_rslora=true",
        f"lora.target_modules=[{','.join(TARGETS)}]", "objective.name=dpo", "objective.dpo.beta=0.1",
        f"data.dataset={data}", "data.format=preference", "data.on_truncate=truncate", "template.name=chatml",
        f"training.output_dir={out}", f"training.per_device_train_batch_size={a.batch}",
        "training.gradient_accumulation_steps=1", f"training.max_steps={steps}", "training.optim=adamw_8bit",
        "training.learning_rate=5e-5", "training.logging_steps=1", f"training.save_steps={steps + 100}",
        "training.generation_max_new_tokens=4", "loggers.enabled=[bench-clock]", "export.enabled=[]",
    ], pm=pm)
    run_training(cfg)
    warm, last = a.warmup, steps
    return {"tokens_per_s": (tokens[last] - tokens[warm]) / (clock.times[last] - clock.times[warm]),
            "tokens_per_step": (tokens[last] - tokens[warm]) / (last - warm), "peak_gib": peak_gib(),
            "step_seconds": clock.step_seconds(warm), "versions": versions()}


def run_unsloth(a: argparse.Namespace) -> dict[str, Any]:
    """What a user writes: FastLanguageModel + get_peft_model + TRL's DPOTrainer on the same pairs."""
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers and TRL on import

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(a.model_dir), max_seq_length=a.seq, load_in_4bit=True, dtype=None, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=True)
    from sft.core.templating import resolve_template
    from sft.engine.configuration import load_config

    # The same ChatML text sft renders, as the tokenizer's chat template.
    tokenizer.chat_template = resolve_template(load_config(None, ["template.name=chatml"])).jinja(tokenizer)
    steps = a.pairs // a.batch
    clock = StepClock()
    seen: dict[int, int] = {}

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.tick(state.global_step)
                seen[state.global_step] = int(state.num_input_tokens_seen)

    trainer = DPOTrainer(
        model=model, ref_model=None, processing_class=tokenizer,
        train_dataset=Dataset.from_list(preference_pairs(a.pairs, a.seed)),
        args=DPOConfig(output_dir=str(a.work / "unsloth-dpo"), per_device_train_batch_size=a.batch,
                       gradient_accumulation_steps=1, max_steps=steps, learning_rate=5e-5, optim="adamw_8bit",
                       bf16=True, logging_steps=1, save_strategy="no", report_to="none", seed=3407,
                       max_length=a.seq, beta=0.1, include_num_input_tokens_seen="non_padding",
                       dataset_num_proc=1),
        callbacks=[Clock()])
    trainer.train()
    warm, last = a.warmup, steps
    return {"tokens_per_s": (seen[last] - seen[warm]) / (clock.times[last] - clock.times[warm]),
            "tokens_per_step": (seen[last] - seen[warm]) / (last - warm), "peak_gib": peak_gib(),
            "step_seconds": clock.step_seconds(warm), "versions": versions()}


def table(results: dict[str, dict[str, Any]]) -> str:
    ref = results.get("unsloth", {})
    lines = ["| setup | tokens/s | x raw Unsloth | peak GiB | x raw Unsloth | tokens/step |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = {"sft": "sft run --objective dpo (unsloth)", "unsloth": "raw Unsloth + TRL DPOTrainer"}
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {labels.get(name, name)} | error: {r['error']} | | | | |")
            continue
        speed = r["tokens_per_s"] / ref["tokens_per_s"] if ref.get("tokens_per_s") else float("nan")
        memory = r["peak_gib"] / ref["peak_gib"] if ref.get("peak_gib") else float("nan")
        lines.append(f"| {labels.get(name, name)} | {r['tokens_per_s']:,.0f} | {speed:.3f} | {r['peak_gib']:.2f} | "
                     f"{memory:.3f} | {r['tokens_per_step']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="sft,unsloth")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sft-bench/llama-3.1-8b-shape"))
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-bench-dpo"))
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder for the random model (default: embedded SmolLM2).")
    p.add_argument("--batch", type=int, default=4, help="Pairs per step.")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=200, help="Pairs: one epoch, --batch a step.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=600, help="Seconds per setup subprocess.")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.worker == "create":
        create_model(a.model_dir, a.tokenizer)
        return
    if a.worker:
        print(SETUP_TAG + a.worker, flush=True)
        try:
            result = {"sft": run_sft, "unsloth": run_unsloth}[a.worker](a)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        print(RESULT_TAG + json.dumps({"setup": a.worker, **result}), flush=True)
        return
    if a.tokenizer is None:
        from sft.engine.models import embedded_model_dir

        a.tokenizer = str(embedded_model_dir())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, "--model-dir", str(a.model_dir), "--work", str(a.work), "--tokenizer",
            a.tokenizer, "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup),
            "--pairs", str(a.pairs), "--seed", str(a.seed)]
    if not (a.model_dir / "config.json").exists():
        subprocess.run(base + ["--worker", "create"], env=env, check=True)
    results: dict[str, dict[str, Any]] = {}
    for setup in a.setups.split(","):
        start = time.perf_counter()
        log = a.work / f"{setup}.log"
        with log.open("w") as f:
            try:
                subprocess.run(base + ["--worker", setup], env=env, stdout=f, stderr=subprocess.STDOUT,
                               timeout=a.timeout)
            except subprocess.TimeoutExpired:
                f.write(f"\ntimed out after {a.timeout}s\n")
        results[setup] = _result(setup, _sections(log.read_text(errors="replace")).get(setup, ""))
        shown = {k: v for k, v in results[setup].items() if k != "versions"}
        print(f"== {setup} ({time.perf_counter() - start:.0f}s): {json.dumps(shown)}", flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
