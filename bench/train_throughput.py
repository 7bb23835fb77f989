"""QLoRA training throughput: `sft run` (Unsloth backend) against raw Unsloth and plain transformers.

One command measures every setup on the same workload and prints one table::

    python bench/train_throughput.py --tokenizer DIR            # all setups
    python bench/train_throughput.py --setups sft,unsloth       # a subset

The workload (issue 7): the Llama-3.1-8B shape (hidden 4096, intermediate 14336, 32 layers,
32 heads, 8 KV heads, vocab 128256, untied), random-init in bf16 on the GPU and saved with
safetensors; QLoRA r=16 on all 7 linear projections, rsLoRA, adamw_8bit; batches of
8 x 2048 tokens, one optimizer step per batch, gradient checkpointing on.

Setups, each in its own subprocess so peaks don't mix and Unsloth's patches can't reach
the transformers baseline:

- ``sft``: ``sft.engine.run.run_training`` with ``model.backend=unsloth`` (``training.memory=default``);
- ``sft-auto``: the same with ``training.memory=auto``;
- ``unsloth``: a plain Unsloth + TRL script with the same settings;
- ``hf``: transformers + peft + bitsandbytes (NF4, sdpa attention, gradient checkpointing);
- ``long-sft@L`` / ``long-unsloth@L``: one row of ``L`` tokens a step (batch 1, memory=default,
  1 warm-up step and 2 measured), ``sft run`` or the raw script: run several L, each in its own
  process (``--setups long-sft@32768,long-unsloth@32768,...``), for the longest that trains;
  ``long-sft-tiled@L`` / ``long-unsloth-tiled@L``: the same with Unsloth's tiled MLP
  (``training.memory=long`` / ``unsloth_tiled_mlp=True``);
- ``sft-lora`` / ``sft-fp8`` / ``sft-fp8-sft``: ``sft run`` with ``model.method=lora`` (16-bit base) /
  ``fp8`` (the FP8 base on Unsloth's fused kernels) / ``fp8`` with ``SFT_FP8_KERNELS=sft``;
- ``curve``: raw Unsloth with ``checkpoint_skip_layers = k`` for each ``--curve`` value, one
  process, k changed between segments (each segment: 1 warm-up step, then ``--curve-steps``).

The chat workload (issue 14): ``--chat-rows`` ShareGPT conversations from
:func:`chat_conversations` (seeded; 1-3 turns, a system prompt on 30% of the rows, ~370
tokens each), batch 8 x ``--chat-accumulation`` 2, ``max_seq_length`` 2048, the recipe of
the Unsloth Llama-3.1 conversational notebook:

- ``chat-packed`` / ``chat-packed-auto``: ``sft run`` with ``training.packing=auto`` (which
  packs this data) at memory=default / auto;
- ``chat-padded`` / ``chat-padded-auto``: ``training.packing=false`` (length-grouped padding,
  micro-batches merged); ``chat-padded-separate``: the same at memory=default with
  ``training.merge_micro_batches=false``;
- ``unsloth-notebook``: the notebook's own script on the same conversations as ChatML text,
  TRL's SFTTrainer with ``packing=True``.

For these, tokens/s counts non-pad tokens (the run's own ``tokens``, or the collated batches'
for the raw script) and the table gives each ratio to the fixed-length rows at the same
memory mode (``sft`` / ``sft-auto``) and to the raw notebook script.

tokens/s = batch x seq_len x measured steps / their wall time, taken at each logging step
after ``torch.cuda.synchronize()``, from the end of warm-up step ``--warmup`` on. Peak is
``torch.cuda.max_memory_allocated()`` over the whole subprocess (load and probe included);
curve peaks are per segment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
RESULT_TAG = "BENCH_RESULT "
SETUP_TAG = "BENCH_SETUP "
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


# -- workload -------------------------------------------------------------------------------
def create_model(model_dir: Path, tokenizer_dir: str) -> None:
    """Random-init the 8B shape in bf16 directly on the GPU and save it (safetensors) with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**LLAMA_8B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(model_dir)
    print(f"created {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params) "
          f"in {time.perf_counter() - start:.0f}s", flush=True)


def workload_text(seq_len: int) -> str:
    """Plain words, about 4 tokens a word with the SmolLM2 tokenizer: well over ``seq_len``
    tokens, so every row is truncated to exactly ``seq_len`` (the sft run's summary checks it)."""
    return " ".join(f"item{i % 211} is {i * 7919 % 1000} units," for i in range(seq_len))


def token_rows(tokenizer: Any, rows: int, seq_len: int) -> list[list[int]]:
    """``rows`` sequences of exactly ``seq_len`` tokens, each a different window of the workload text."""
    ids = tokenizer(workload_text(seq_len * 2), add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * seq_len
    return [ids[(r * 37) % (len(ids) - seq_len):][:seq_len] for r in range(rows)]


def chat_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` ShareGPT conversations shaped like real chat data, the same for a given ``seed``.

    1 to 3 user/assistant turns (half of the rows one turn), a system prompt on 30% of the rows,
    log-normal message lengths (user ~40 words, assistant ~150, long tails): about 370 tokens a
    conversation with the SmolLM2 tokenizer and ChatML, a few over 2048 (truncated).
    """
    import random

    rng = random.Random(seed)

    def words(median: float, sigma: float) -> str:
        count = max(1, min(1500, int(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(CHAT_WORDS) for _ in range(count)) + "."

    rows = []
    for _ in range(n):
        convo = []
        if rng.random() < 0.3:
            convo.append({"from": "system", "value": words(35, 0.5)})
        for _turn in range(rng.choices((1, 2, 3), weights=(5, 3, 2))[0]):
            convo.append({"from": "human", "value": words(30, 0.8)})
            convo.append({"from": "gpt", "value": words(110, 0.8)})
        rows.append({"conversations": convo})
    return rows


CHAT_WORDS = tuple("""the of and to in is that it for was on are as with his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father head stand own
page should country found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late run while press
close night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science eat
room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain
girl usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order fire
south problem piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less morning ten
simple several vowel toward war lay against pattern slow center love person money serve appear road map rain
rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front teach week final gave
green oh quick develop ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon island foot system busy test
record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss
brought heat snow tire bring yes distant fill east paint language among""".split())


def chatml_text(convo: list[dict[str, str]]) -> str:
    """A ShareGPT conversation as ChatML text, as the Unsloth conversational notebook feeds TRL."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return "".join(f"<|im_start|>{roles[m['from']]}\n{m['value']}<|im_end|>\n" for m in convo)


# -- timing ---------------------------------------------------------------------------------
class StepClock:
    """Wall time at each optimizer step's log, after a CUDA synchronize."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self.health: list[Any] = []  # each log's loss and grad norm

    def healthy(self) -> bool:
        """Every logged loss and grad norm finite and above zero (and at least one logged)."""
        return bool(self.health) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.health)

    def tick(self, step: int) -> None:
        import torch

        torch.cuda.synchronize()
        self.times[int(step)] = time.perf_counter()

    def step_seconds(self, warmup: int) -> list[float]:
        """Each measured step's wall time, for spotting hiccups behind a low mean."""
        steps = sorted(s for s in self.times if s >= warmup)
        return [round(self.times[b] - self.times[a], 4) for a, b in zip(steps, steps[1:])]

    def tokens_per_s(self, warmup: int, tokens_per_step: int) -> tuple[float, int]:
        steps = sorted(s for s in self.times if s >= warmup)
        if len(steps) < 2:
            raise RuntimeError(f"too few timed steps after warm-up: {sorted(self.times)}")
        first, last = steps[0], steps[-1]
        return tokens_per_step * (last - first) / (self.times[last] - self.times[first]), last - first


def trainer_callback(clock: StepClock, on_step_begin=None):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if on_step_begin is not None:
                on_step_begin(state.global_step + 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.tick(state.global_step)
                clock.health += [logs.get("loss"), logs.get("grad_norm")]

    return Clock()


def sft_args(out: str, steps: int, batch: int, seq_len: int, gradient_checkpointing: bool, **extra: Any):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=5, weight_decay=0.01, optim="adamw_8bit",
        bf16=True, logging_steps=1, save_strategy="no", report_to="none", seed=3407, max_length=seq_len,
        packing=False, gradient_checkpointing=gradient_checkpointing, dataset_num_proc=1, **extra)


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / GIB


def host_peak_gib() -> float:
    """The process's peak resident host memory: Unsloth offloads each layer's checkpointed input
    to (pinned) host memory, 256 KiB a token for the 8B shape, which bounds long rows too."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# -- setups ---------------------------------------------------------------------------------
def run_unsloth(a: argparse.Namespace, curve: list[int] | None = None, tiled: bool = False) -> dict[str, Any]:
    """A plain Unsloth notebook: FastLanguageModel + get_peft_model + TRL's SFTTrainer
    (``tiled``: ``unsloth_tiled_mlp=True``, Unsloth's own switch for its tiled MLP)."""
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers and TRL on import

    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(a.model_dir), max_seq_length=a.seq, load_in_4bit=True, dtype=None, local_files_only=True,
        unsloth_tiled_mlp=tiled)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=True)
    clock = StepClock()
    segments: list[tuple[int, int, int]] = []  # (k, first step, last step)
    if curve:
        from unsloth.models._utils import skip_checkpointing
        from unsloth_zoo.block_swap import find_decoder_layers

        def set_skip(k: int) -> None:
            for layer in find_decoder_layers(model):
                layer.__dict__.pop("_unsloth_skip_checkpoint", None)
            skip_checkpointing(model, k)

        # Segment i: a warm-up step w (the global warm-up for the first), then curve_steps
        # timed steps; k is switched and the peak reset as its warm-up step begins.
        w = a.warmup
        for k in curve:
            segments.append((k, w, w + a.curve_steps))
            w += a.curve_steps + 1
        peaks: dict[int, float] = {}

        def on_step_begin(step: int) -> None:
            for i, (k, warm, _end) in enumerate(segments):
                if step == (1 if i == 0 else warm):
                    if i:
                        peaks[segments[i - 1][0]] = peak_gib()
                    set_skip(k)
                    torch.cuda.reset_peak_memory_stats()
        steps = segments[-1][2]
    else:
        on_step_begin = None
        steps = a.warmup + a.steps
    rows = token_rows(tokenizer, steps * a.batch, a.seq)
    dataset = Dataset.from_dict({"input_ids": rows})
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=sft_args(str(a.work / "unsloth-out"), steps, a.batch, a.seq, True),
        callbacks=[trainer_callback(clock, on_step_begin)])
    trainer.train()
    result = {"versions": versions()}
    if not curve:
        tps, n = clock.tokens_per_s(a.warmup, a.batch * a.seq)
        return {**result, "tokens_per_s": tps, "measured_steps": n, "peak_gib": peak_gib(),
                "step_seconds": clock.step_seconds(a.warmup), "healthy": clock.healthy()}
    points = []
    peaks[segments[-1][0]] = peak_gib()
    layers = len(find_decoder_layers(model))
    for k, warm, end in segments:
        sub = StepClock()
        sub.times = {s: t for s, t in clock.times.items() if warm <= s <= end}
        tps, n = sub.tokens_per_s(warm, a.batch * a.seq)
        points.append({"skip": k, "checkpointed": layers - k, "tokens_per_s": tps, "measured_steps": n,
                       "peak_gib": peaks[k]})
    return {**result, "curve": points}


def run_hf(a: argparse.Namespace) -> dict[str, Any]:
    """transformers + peft + bitsandbytes, as the PEFT QLoRA guide does it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             use_rslora=True, bias="none", task_type="CAUSAL_LM"))
    steps = a.warmup + a.steps
    dataset = Dataset.from_dict({"input_ids": token_rows(tokenizer, steps * a.batch, a.seq)})
    clock = StepClock()
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=sft_args(str(a.work / "hf-out"), steps, a.batch, a.seq, True,
                      gradient_checkpointing_kwargs={"use_reentrant": False}),
        callbacks=[trainer_callback(clock)])
    trainer.train()
    tps, n = clock.tokens_per_s(a.warmup, a.batch * a.seq)
    return {"tokens_per_s": tps, "measured_steps": n, "peak_gib": peak_gib(), "versions": versions(),
            "step_seconds": clock.step_seconds(a.warmup)}


def run_sft(a: argparse.Namespace, memory: str, packing: str | None = None, merge: bool = True,
            method: str = "qlora", fp8_kernels: str | None = None) -> dict[str, Any]:
    """`sft run` through the library: the same code path as the CLI, plus a timing logger plugin.

    ``packing`` None: the fixed-length workload (rows of exactly ``--seq`` tokens, batch x 1).
    Otherwise the chat workload (:func:`chat_conversations`, batch x ``--chat-accumulation``)
    with ``training.packing=<packing>``; ``merge``: ``training.merge_micro_batches``;
    ``method``: ``model.method`` (qlora, lora, fp8); ``fp8_kernels``: ``SFT_FP8_KERNELS`` for the fp8 base. tokens/s
    is the run's own count of non-pad tokens
    (``metrics.jsonl``'s ``tokens``) over the measured steps.
    """
    from sft.core import hookimpl
    from sft.engine.configuration import load_config
    from sft.core.interfaces import Logger
    from sft.core.plugins import get_plugin_manager, reset_plugin_manager
    from sft.engine.run import run_training

    # Nothing here imports transformers: `sft run` imports Unsloth first, as a user's process would.
    clock = StepClock()
    tokens: dict[int, int] = {}
    health: dict[str, list] = {"loss": [], "grad_norm": []}
    if method == "fp8":
        os.environ["SFT_FP8_UNGATED"] = "1"  # refused since its quality gate failed; measured here all the same
    if fp8_kernels:
        os.environ["SFT_FP8_KERNELS"] = fp8_kernels
    else:
        os.environ.pop("SFT_FP8_KERNELS", None)

    class BenchClock(Logger):
        """Times each logged optimizer step (the bench's only hook into the run)."""

        name = "bench-clock"
        description = "wall time per logged step, CUDA synchronized"

        def start(self, run, options=None) -> None:
            clock.times.clear()

        def log(self, step, metrics) -> None:
            if "loss" in metrics:
                clock.tick(step)
                tokens[int(step)] = int(metrics["tokens"])
                health["loss"].append(metrics.get("loss"))
                health["grad_norm"].append(metrics.get("grad_norm"))

        def finish(self, summary) -> None:
            pass

    class Plugin:
        @hookimpl
        def register_loggers(self, register):
            register(BenchClock())

    reset_plugin_manager()  # a fresh one per setup: several setups can share a process
    pm = get_plugin_manager()
    pm.register(Plugin(), "bench-clock")
    chat = packing is not None
    steps = a.warmup + a.steps
    accumulation = a.chat_accumulation if chat else 1
    data = a.work / ("sft-chat.jsonl" if chat else "sft-data.jsonl")
    with data.open("w") as f:
        if chat:
            for row in chat_conversations(a.chat_rows, a.chat_seed):
                f.write(json.dumps(row) + "\n")
        else:
            text = workload_text(a.seq)
            for r in range(steps * a.batch):
                convo = [{"from": "human", "value": f"Continue the list ({r})."}, {"from": "gpt", "value": text}]
                f.write(json.dumps({"conversations": convo}) + "\n")
    out = a.work / f"sft-run-{memory}-{packing or 'fixed'}{'' if merge else '-separate'}-{method}{fp8_kernels or ''}"
    shutil.rmtree(out, ignore_errors=True)  # sft run refuses to overwrite a finished run
    overrides = [
        f"model.name={a.model_dir}", "model.backend=unsloth", f"model.method={method}", f"model.max_seq_length={a.seq}",
        "lora.r=16", "lora.lora_alpha=16", "lora.lora_dropout=0.0", "lora.use_rslora=true",
        "lora.use_gradient_checkpointing=auto", f"lora.target_modules=[{','.join(TARGETS)}]",
        f"data.dataset={data}", "data.format=sharegpt", "data.train_on=all",
        f"training.output_dir={out}", f"training.per_device_train_batch_size={a.batch}",
        f"training.gradient_accumulation_steps={accumulation}", f"training.max_steps={steps}",
        "training.optim=adamw_8bit", "training.learning_rate=2e-4", "training.logging_steps=1",
        f"training.save_steps={steps + 100}", f"training.memory={memory}", "training.generation_max_new_tokens=4",
        f"training.packing={packing or 'false'}", f"training.merge_micro_batches={str(merge).lower()}",
        "loggers.enabled=[bench-clock]", "export.enabled=[]",
        # the fixed-length rows are cut to exactly --seq tokens (sft's default drops a row cut inside an answer)
        f"data.on_truncate={'drop' if chat else 'truncate'}",
    ]
    cfg = load_config(None, overrides, pm=pm)
    run_training(cfg)
    summary = json.loads((out / "summary.json").read_text())
    result = {"measured_steps": a.steps, "peak_gib": peak_gib(), "versions": versions(),
              "step_seconds": clock.step_seconds(a.warmup), "train_tokens": summary["tokens"],
              "losses": health["loss"], "grad_norms": health["grad_norm"],
              "healthy": all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                             for v in health["loss"] + health["grad_norm"])}
    warm, last = a.warmup, steps
    result["tokens_per_s"] = (tokens[last] - tokens[warm]) / (clock.times[last] - clock.times[warm])
    result["tokens_per_step"] = (tokens[last] - tokens[warm]) / (last - warm)
    if not chat and summary["tokens"] != steps * a.batch * a.seq:
        raise RuntimeError(f"sft run trained {summary['tokens']} tokens, not {steps} x {a.batch} x {a.seq}")
    return result


def run_unsloth_notebook(a: argparse.Namespace) -> dict[str, Any]:
    """The Unsloth Llama-3.1 conversational notebook's recipe on the chat workload: ChatML text,
    TRL's SFTTrainer with packing=True, batch x ``--chat-accumulation``; nothing of sft's."""
    from unsloth import FastLanguageModel  # first: Unsloth patches transformers and TRL on import

    from datasets import Dataset
    from trl import SFTTrainer

    if a.notebook_steps:  # its steps are long (~15 s): fewer of them, after one warm-up step
        a = argparse.Namespace(**{**vars(a), "warmup": 1, "steps": a.notebook_steps})
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(a.model_dir), max_seq_length=a.seq, load_in_4bit=True, dtype=None, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=True)
    rows = chat_conversations(a.chat_rows, a.chat_seed)
    dataset = Dataset.from_dict({"text": [chatml_text(r["conversations"]) for r in rows]})
    steps = a.warmup + a.steps
    clock = StepClock()
    args = sft_args(str(a.work / "unsloth-notebook-out"), steps, a.batch, a.seq, True, dataset_text_field="text")
    args.packing = True
    args.gradient_accumulation_steps = a.chat_accumulation
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args,
                         callbacks=[trainer_callback(clock)])
    counts: list[int] = []  # non-pad tokens of each micro-batch, in the order they train
    inner = trainer.data_collator.torch_call

    def counting(examples):
        batch = inner(examples)
        if "attention_mask" in batch:
            counts.append(int(batch["attention_mask"].sum()))
        elif "packed_seq_lengths" in batch:
            counts.append(int(batch["packed_seq_lengths"].sum()))
        else:
            counts.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator.torch_call = counting
    trainer.train()
    ga = a.chat_accumulation
    measured = sum(counts[a.warmup * ga:steps * ga])
    seconds = clock.times[steps] - clock.times[a.warmup]
    return {"tokens_per_s": measured / seconds, "tokens_per_step": measured / a.steps, "measured_steps": a.steps,
            "peak_gib": peak_gib(), "versions": versions(), "step_seconds": clock.step_seconds(a.warmup)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"device": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth_zoo", "triton", "sft-forge"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# -- driver ---------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    """Run the setups of ``--worker`` (``a+b+c``: one after another in this process)."""
    if a.worker == "create":
        create_model(a.model_dir, a.tokenizer)
        return
    setups = {
        "sft": lambda: run_sft(a, "default"),
        "sft-auto": lambda: run_sft(a, "auto"),
        "sft-lora": lambda: run_sft(a, "default", method="lora"),
        "sft-fp8": lambda: run_sft(a, "default", method="fp8"),
        "sft-fp8-sft": lambda: run_sft(a, "default", method="fp8", fp8_kernels="sft"),
        "sft-fp8-auto": lambda: run_sft(a, "auto", method="fp8"),
        "chat-packed": lambda: run_sft(a, "default", "auto"),
        "chat-packed-auto": lambda: run_sft(a, "auto", "auto"),
        "chat-padded": lambda: run_sft(a, "default", "false"),
        "chat-padded-auto": lambda: run_sft(a, "auto", "false"),
        "chat-padded-separate": lambda: run_sft(a, "default", "false", merge=False),
        "unsloth-notebook": lambda: run_unsloth_notebook(a),
        "unsloth": lambda: run_unsloth(a),
        "hf": lambda: run_hf(a),
        "curve": lambda: run_unsloth(a, curve=[int(k) for k in a.curve.split(",")]),
    }
    for setup in a.worker.split("+"):
        print(SETUP_TAG + setup, flush=True)
        if "+" in a.worker:
            _release_gpu()
        try:
            if "@" in setup:  # long context: long-sft@32768 / long-unsloth@32768, batch 1, one such row a step
                which, length = setup.split("@")
                long = argparse.Namespace(**{**vars(a), "seq": int(length), "batch": 1, "warmup": 1, "steps": a.long_steps})
                runs = {"long-sft": lambda: run_sft(long, "default"), "long-sft-tiled": lambda: run_sft(long, "long"),
                        "long-unsloth": lambda: run_unsloth(long), "long-unsloth-tiled": lambda: run_unsloth(long, tiled=True)}
                result = {"seq": int(length), **runs[which](), "host_peak_gib": host_peak_gib()}
            else:
                result = setups[setup]()
        except Exception as exc:  # noqa: BLE001 - the next setup of a shared process still runs
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        print(RESULT_TAG + json.dumps({"setup": setup, **result}), flush=True)


def _release_gpu() -> None:
    """Between setups of one process: free the last run's CUDA memory and restart the peak."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


LABELS = {
    "sft": "sft run (unsloth, memory=default)",
    "unsloth": "raw Unsloth (gc=\"unsloth\")",
    "hf": "transformers+peft+bnb (sdpa, gc)",
    "sft-auto": "sft run (unsloth, memory=auto)",
    "sft-lora": "sft run (unsloth, bf16 LoRA, 16-bit base)",
    "sft-fp8": "sft run (unsloth, model.method=fp8, Unsloth's fused kernels)",
    "sft-fp8-sft": "sft run (unsloth, model.method=fp8, SFT_FP8_KERNELS=sft)",
    "sft-fp8-auto": "sft run (unsloth, model.method=fp8, memory=auto)",
}


def flops_per_token(seq: int) -> float:
    """Matrix FLOPs a token costs in a checkpointed LoRA step of the 8B shape at ``seq`` tokens a row.

    The decoder's linear layers 3 x 2N (forward, recomputed forward, input gradient; the base is
    frozen), the output head 2 x 2 x vocab x hidden (forward, input gradient), causal attention
    4 x (2 x 2 x seq/2 x hidden) a layer (QK^T and PV; forward, recompute, and a backward of twice
    the forward). LoRA's own products (r=16) add under 1%. The table prints the achieved rate
    against the card's measured ceilings (``--ceilings``).
    """
    h, i, layers, kv, vocab = 4096, 14336, 32, 1024, 128256
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    attention = layers * 4 * (2 * 2 * (seq / 2) * h)
    return 3 * 2 * linear + 2 * 2 * vocab * h + attention


def table(results: dict[str, dict[str, Any]], seq: int = 2048) -> str:
    ref = results.get("unsloth", {})
    ceilings = results.get("ceilings", {})
    bf16_peak, fp8_peak = ceilings.get("bf16_tflops_8192"), ceilings.get("fp8_rowwise_tflops_8192")
    lines = ["| setup | tokens/s | x raw Unsloth | peak GiB | x raw Unsloth | TFLOP/s | % bf16 ceiling | % fp8 ceiling | "
             "loss, grad norm finite > 0 |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for setup in ("sft", "unsloth", "hf", "sft-auto", "sft-lora", "sft-fp8", "sft-fp8-sft", "sft-fp8-auto"):
        r = results.get(setup)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {LABELS[setup]} | failed: {r['error']} | | | | | | | |")
            continue
        tps = f"{r['tokens_per_s']:,.0f}"
        mem = f"{r['peak_gib']:.2f}"
        rt = f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}" if "tokens_per_s" in ref else "-"
        rm = f"{r['peak_gib'] / ref['peak_gib']:.3f}" if "peak_gib" in ref else "-"
        tflops = r["tokens_per_s"] * flops_per_token(seq) / 1e12
        pb = f"{100 * tflops / bf16_peak:.0f}%" if bf16_peak else "-"
        pf = f"{100 * tflops / fp8_peak:.0f}%" if fp8_peak else "-"
        ok = {True: "yes", False: "NO"}.get(r.get("healthy"), "-")
        lines.append(f"| {LABELS[setup]} | {tps} | {rt} | {mem} | {rm} | {tflops:.0f} | {pb} | {pf} | {ok} |")
    curve = results.get("curve", {}).get("curve")
    if curve:
        lines += ["", "| layers checkpointed (of 32) | skip k | tokens/s | peak GiB |", "|---:|---:|---:|---:|"]
        for p in curve:
            lines.append(f"| {p['checkpointed']} | {p['skip']} | {p['tokens_per_s']:,.0f} | {p['peak_gib']:.2f} |")
    plan = results.get("sft-auto", {}).get("memory_plan")
    if plan:
        lines += ["", f"sft run, {plan}"]
    if any(s in results for s in CHAT_LABELS):
        lines += ["", chat_table(results)]
    if any("@" in s for s in results):
        lines += ["", long_table(results, bf16_peak)]
    return "\n".join(lines)


def long_table(results: dict[str, dict[str, Any]], bf16_peak: float | None = None) -> str:
    """Long context (issue 29): each length tried at batch 1; the achieved matrix rate (attention
    grows with the row, :func:`flops_per_token`); the longest that trained."""
    lines = ["| setup | sequence | tokens/s | TFLOP/s | % bf16 ceiling | peak GiB | host peak GiB | result |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    longest: dict[str, int] = {}
    for setup, r in results.items():
        if "@" not in setup:
            continue
        which, length = setup.split("@")
        if "error" in r:
            lines.append(f"| {which} | {int(length):,} | | | | | | failed: {r['error'][:80]} |")
            continue
        longest[which] = max(longest.get(which, 0), int(length))
        host = f"{r['host_peak_gib']:.1f}" if "host_peak_gib" in r else "-"
        tflops = r["tokens_per_s"] * flops_per_token(int(length)) / 1e12
        share = f"{100 * tflops / bf16_peak:.0f}%" if bf16_peak else "-"
        lines.append(f"| {which} | {int(length):,} | {r['tokens_per_s']:,.0f} | {tflops:.0f} | {share} | "
                     f"{r['peak_gib']:.2f} | {host} | trained |")
    lines += ["", "longest trained: " + ", ".join(f"{k} {v:,}" for k, v in sorted(longest.items()))]
    return "\n".join(lines)


CHAT_LABELS = {
    "chat-packed": ("sft run, chat data, packing=auto, memory=default", "sft"),
    "chat-padded": ("sft run, chat data, packing=false, memory=default", "sft"),
    "chat-packed-auto": ("sft run, chat data, packing=auto, memory=auto", "sft-auto"),
    "chat-padded-auto": ("sft run, chat data, packing=false, memory=auto", "sft-auto"),
    "chat-padded-separate": ("sft run, chat data, packing=false, merge_micro_batches=false, memory=default", "sft"),
    "unsloth-notebook": ("raw Unsloth notebook script (TRL packing=True, ChatML text)", "sft"),
}


def chat_table(results: dict[str, dict[str, Any]]) -> str:
    """Chat workload: non-pad tokens/s, and its ratio to fixed-length rows at the same memory mode
    (``sft`` / ``sft-auto``) and to the raw Unsloth notebook script on the same data."""
    raw = results.get("unsloth-notebook", {}).get("tokens_per_s")
    lines = ["| setup | non-pad tokens/s | x fixed-length (same memory) | x raw Unsloth notebook | peak GiB | "
             "real tokens/step |", "|---|---:|---:|---:|---:|---:|"]
    for setup in ("sft", "sft-auto", *CHAT_LABELS):
        r = results.get(setup)
        if r is None:
            continue
        label, ref_setup = CHAT_LABELS.get(setup, (LABELS.get(setup, setup) + ", fixed 8 x 2048", setup))
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | |")
            continue
        ref = results.get(ref_setup, {}).get("tokens_per_s")
        to_fixed = f"{r['tokens_per_s'] / ref:.3f}" if ref else "-"
        to_raw = f"{r['tokens_per_s'] / raw:.2f}" if raw else "-"
        lines.append(f"| {label} | {r['tokens_per_s']:,.0f} | {to_fixed} | {to_raw} | {r['peak_gib']:.2f} |"
                     f" {r.get('tokens_per_step', 0):,.0f} |")
    return "\n".join(lines)


def _sections(output: str) -> dict[str, str]:
    """A worker's output split by setup (its ``SETUP_TAG`` lines); what came before goes to the first."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []  # the process start, before the first tag, belongs to the first setup
    for line in output.splitlines():
        if line.startswith(SETUP_TAG):
            name = line[len(SETUP_TAG):].strip()
            sections[name] = current if not sections else []
            current = sections[name]
        else:
            current.append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


#: What a setup's result keeps from its run log: key -> a text of the line (the last one wins).
RUN_LOG_CHOICES = {"memory_plan": "memory=auto:", "packing": "training.packing:",
                   "merging": "micro-batches ran as"}


def _result(setup: str, output: str) -> dict[str, Any]:
    """The setup's result line, with the run log's choices (:data:`RUN_LOG_CHOICES`); or its error."""
    found = [line[len(RESULT_TAG):] for line in output.splitlines() if line.startswith(RESULT_TAG)]
    if not found:
        tail = [l for l in output.splitlines() if l.strip()]
        print("\n".join(tail[-40:]), flush=True)
        return {"error": (tail[-1] if tail else "not reached")[:200]}
    result = json.loads(found[-1])
    for key, marker in RUN_LOG_CHOICES.items():
        chose = [line.split("] ", 1)[-1] for line in output.splitlines() if marker in line]
        if chose:
            result[key] = chose[-1]
    if "error" in result:
        print("\n".join(output.splitlines()[-40:]), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="sft,unsloth,hf,sft-auto,curve",
                   help="Comma-separated; a+b runs a then b in one process (saves its start, imports and CUDA init).")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sft-bench/llama-3.1-8b-shape"))
    p.add_argument("--work", type=Path, default=Path("/tmp/sft-bench"))
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder for the random model (default: embedded SmolLM2).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="Measured steps after warm-up.")
    p.add_argument("--curve", default="0,8,16,24,32", help="checkpoint_skip_layers values for the curve.")
    p.add_argument("--curve-steps", type=int, default=3)
    p.add_argument("--long-steps", type=int, default=2, help="Measured steps of a long-context setup (after 1 warm-up).")
    p.add_argument("--chat-rows", type=int, default=3000, help="Conversations in the chat workload.")
    p.add_argument("--chat-seed", type=int, default=0)
    p.add_argument("--chat-accumulation", type=int, default=2, help="Gradient accumulation of the chat setups.")
    p.add_argument("--notebook-steps", type=int, default=None,
                   help="Measured steps of unsloth-notebook, after one warm-up step (default: --warmup / --steps).")
    p.add_argument("--deadline", type=int, default=None,
                   help="Seconds for all setups: each process gets what is left (a cut one keeps its finished setups).")
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    p.add_argument("--ceilings", type=Path, default=None,
                   help="bench/fp8_matmul.py's --json: the card's measured bf16 and FP8 rates, for the TFLOP/s columns.")
    p.add_argument("--timeout", type=int, default=900, help="Seconds per setup subprocess.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a)
        return
    if a.tokenizer is None:
        from sft.engine.models import embedded_model_dir

        a.tokenizer = str(embedded_model_dir())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, "--model-dir", str(a.model_dir), "--work", str(a.work), "--tokenizer", a.tokenizer,
            "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps),
            "--curve", a.curve, "--curve-steps", str(a.curve_steps), "--long-steps", str(a.long_steps), "--chat-rows", str(a.chat_rows),
            "--chat-seed", str(a.chat_seed), "--chat-accumulation", str(a.chat_accumulation)]
    if a.notebook_steps:
        base += ["--notebook-steps", str(a.notebook_steps)]
    end = time.perf_counter() + a.deadline if a.deadline else None
    if not (a.model_dir / "config.json").exists():
        subprocess.run(base + ["--worker", "create"], env=env, check=True)
    results: dict[str, dict[str, Any]] = {}
    if a.ceilings and a.ceilings.is_file():
        results["ceilings"] = json.loads(a.ceilings.read_text())
    for group in a.setups.split(","):
        start = time.perf_counter()
        print(f"== {group}", flush=True)
        # The log is written as the setups run, so a process cut short still leaves its output.
        log = a.work / f"{group}.log"
        limit = a.timeout if end is None else max(1, min(a.timeout, int(end - time.perf_counter())))
        with log.open("w") as f:
            try:
                subprocess.run(base + ["--worker", group], env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            except subprocess.TimeoutExpired:
                f.write(f"\ntimed out after {limit}s\n")
        sections = _sections(log.read_text(errors="replace"))
        for setup in group.split("+"):
            results[setup] = _result(setup, sections.get(setup, ""))
            shown = {k: v for k, v in results[setup].items() if k != "versions"}
            print(f"   {setup}: {json.dumps(shown)}", flush=True)
        print(f"   {time.perf_counter() - start:.0f}s", flush=True)
        if a.json:  # after every process: a call cut short keeps what it measured
            a.json.write_text(json.dumps(results, indent=2))
    print()
    print(table(results, a.seq))


if __name__ == "__main__":
    main()
