"""Preference objectives trained for real: a third-party objective through the hook, continuing a
finished run (its adapter is the start and the reference), refusals that write nothing, and each
bundled objective learning on real public preference data with the embedded SmolLM2."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sft.core import hookimpl
from sft.core.config import opt
from sft.plugins.objectives.dpo import DPO, DPOOptions
from sft.testing import run_sft, tiny_overrides, train_tiny, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DPO_DEMO = SHARED / "llamafactory_dpo_en_demo.json"
KTO_DEMO = SHARED / "llamafactory_kto_en_demo.json"

#: Short pairs of the shape every objective reads (written by this project's authors).
PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
         for a in range(1, 7) for b in range(1, 3)]


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- a third-party objective ---------------------------------------------------------------------
@dataclass
class IPOOptions:
    tau: float = opt(0.1, "IPO's regularisation (TRL's beta for loss_type=ipo).", gt=0)


class IPO(DPO):
    """A DPO loss variant from another package: IPO under its own name and option."""

    name = "ipo_variant"
    description = "IPO (a DPO variant), as a third-party objective"
    options = IPOOptions

    def build_trainer(self, setup: Any, options: Any = None) -> Any:
        return super().build_trainer(setup, DPOOptions(beta=options.tau, loss_type="ipo"))


class IPOPlugin:
    @hookimpl
    def register_objectives(self, register):
        register(IPO())


def test_hook_register_objectives(sft_plugin_manager, tiny_run, tiny_model_dir, tmp_path: Path):
    """A registered objective trains through the engine: its options validated and used, its
    metrics in metrics.jsonl and summary.json, the finished run's adapter as start and reference."""
    sft_plugin_manager.register(IPOPlugin(), "ipo-plugin")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = train_tiny(tmp_path / "ipo", tiny_model_dir, "objective.name=ipo_variant", "objective.ipo_variant.tau=0.25",
                     f"model.from_run={tiny_run}", dataset=pairs, steps=2)
    first = _records(run)[0]
    # The reference is exactly the model training starts from (the finished run's adapter, frozen):
    # at the first step the rewards are zero and IPO's loss is (1 / (2 tau))^2.
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx((1 / (2 * 0.25)) ** 2, rel=1e-5)
    # ... and that model is the finished run's, not the base: from the base the first step scores otherwise.
    base = train_tiny(tmp_path / "ipo-base", tiny_model_dir, "objective.name=ipo_variant", dataset=pairs, steps=1)
    assert _records(base)[0]["logps/chosen"] != first["logps/chosen"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"]["name"] == "ipo_variant" and summary["objective"]["from_run"] == str(tiny_run)
    assert "rewards/margins" in summary["objective"] and summary["status"] == "ok"
    # Only the trained adapter is saved, not the trainer's frozen reference copy.
    assert not (run / "adapter" / "ref").exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    result = run_sft("validate", *tiny_overrides(tmp_path / "x", tiny_model_dir, pairs), "objective.name=ipo_variant",
                     "objective.ipo_variant.tau=-1", check=False)
    assert result.exit_code == 2 and "objective.ipo_variant.tau: must be > 0" in result.output


def test_a_continued_run_stands_on_its_own(tiny_run, tiny_model_dir, tmp_path: Path):
    """The run that continues another records where it came from and keeps working (exports,
    chat) after that run is gone: its config.yaml already holds what it took from it."""
    source = Path(shutil.copytree(tiny_run, tmp_path / "sft"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = train_tiny(tmp_path / "dpo", tiny_model_dir, "objective.name=dpo", f"model.from_run={source}",
                     "training.loraplus_lr_ratio=16", dataset=pairs, steps=1)
    # The run's optimizer groups reach every objective's trainer (LoRA+: B matrices at 16 x the rate).
    first = _records(run)[0]
    assert first["learning_rate_lora_B"] == pytest.approx(16 * first["learning_rate"])
    objective = json.loads((run / "summary.json").read_text())["objective"]
    assert objective["reference"] == f"{source} (its adapter, frozen)"
    assert objective["description"].endswith("on top of the run `sft` (sft on `sft:identity`)")
    assert "objective.rewards/margins" in run_sft("report", run).output  # sft report shows the objective's metrics
    shutil.rmtree(source)
    run_sft("export", run, "--exporter", "lora")
    assert (run / "exports" / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    ("unfinished", "is not a finished run (its status is interrupted)"),
    ("other base", "model.name: '{other}' differs from '{base}', which {source} was trained with"),
    ("other template", "template.name: 'llama3' differs from 'chatml'"),
])
def test_from_run_refusals_write_nothing(tiny_run, tiny_model_dir, tmp_path: Path, change, message):
    source = Path(shutil.copytree(tiny_run, tmp_path / "sft"))
    if change == "unfinished":
        summary = json.loads((source / "summary.json").read_text())
        (source / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "dpo"
    other = tmp_path / "other-model"
    before = _tree_digest(source)
    args = [a for a in tiny_overrides(out, tiny_model_dir, pairs) if not a.startswith("model.name=")]
    extra = {"unfinished": [], "other base": [f"model.name={other}"], "other template": ["template.name=llama3"]}[change]
    result = run_sft("run", "--objective", "dpo", "--from", source, *args, *extra, check=False)
    assert result.exit_code == 2
    assert message.format(other=other, base=tiny_model_dir, source=source) in result.output
    assert _tree_digest(source) == before and not out.exists()


# -- each bundled objective on SmolLM2 ------------------------------------------------------------
def _short_rows(path: Path, total_chars, limit: int = 1200) -> list[dict[str, Any]]:
    """The rows of a real data file short enough to train on quickly on a CPU (kept as they are)."""
    return [row for row in json.loads(path.read_text()) if total_chars(row) < limit]


def _pair_chars(row: dict[str, Any]) -> int:
    prompt = sum(len(turn["value"]) for turn in row["conversations"])
    return prompt + max(len(row["chosen"]["value"]), len(row["rejected"]["value"]))


def _labelled_chars(row: dict[str, Any]) -> int:
    return sum(len(m["content"]) for m in row["messages"])


#: Held-out rows: enough that a held-out accuracy is not saturated after SFT (ORPO and SimPO start
#: near 0.6 on these 30 pairs, 0.9 on 10) and a mean margin averages over more than noise.
EVAL_ROWS = 30
#: Steps, and so the eval at the end: the two evals (on start and at the end) are most of the time.
STEPS = 16

OBJECTIVES = {
    # objective: (real data file, its rows' length, the longest row kept in characters, options).
    # The pairs up to 1,500 characters (65 of them; 35 left to train on) are cut to 384 tokens.
    "dpo": (DPO_DEMO, _pair_chars, 1500, ["objective.dpo.beta=0.1"]),
    # ORPO's beta weighs its odds-ratio term against the chosen answer's NLL: at the default 0.1 the
    # NLL dominates a short run (the margin barely moved in 12 steps); at 1.0 the preference term counts.
    "orpo": (DPO_DEMO, _pair_chars, 1500, ["objective.orpo.beta=1.0"]),
    "simpo": (DPO_DEMO, _pair_chars, 1500, ["objective.simpo.beta=2.0"]),
    # KTO's KL estimate pairs each prompt with another row of its batch: a batch of 4 and a lower rate
    # keep it from running away on a dozen steps.
    "kto": (KTO_DEMO, _labelled_chars, 1200, ["objective.kto.beta=0.1", "training.learning_rate=1e-4",
                                               "training.per_device_train_batch_size=4"]),
}


@pytest.mark.skipif(not DPO_DEMO.is_file(), reason="../shared/data is not here")
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_each_objective_learns_on_real_preference_data(objective, embedded_default_run, tmp_path: Path):
    """From the finished SFT run of the embedded SmolLM2, a short run on LLaMA-Factory's real
    preference data (its rows short enough for a CPU) raises the held-out reward accuracy above
    where it started and the mean held-out margin above 0 and above where it started (KTO, which
    logs no accuracy: its margin); the adapter exports and answers."""
    source, length, limit, options = OBJECTIVES[objective]
    data = tmp_path / source.name
    data.write_text(json.dumps(_short_rows(source, length, limit)))
    out = tmp_path / objective
    exporters = "[lora,gguf]" if objective == "dpo" else "[lora]"
    run_sft("run", "--objective", objective, "--from", embedded_default_run, "--dataset", data, "--output", out,
            "model.max_seq_length=384", f"data.test_size={EVAL_ROWS}", f"training.max_steps={STEPS}",
            "training.learning_rate=5e-4", "training.warmup_steps=0", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=1", "training.per_device_eval_batch_size=6",
            f"training.eval_steps={STEPS}", "training.eval_on_start=true", "training.save_steps=1000",
            "training.generation_max_new_tokens=8", f"export.enabled={exporters}", "loggers.enabled=[]", *options)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["objective"]["from_run"] == str(embedded_default_run)
    # The pairs still too long at 384 tokens are dropped (6 of the 65; each side of the split loses some).
    dataset = summary["dataset"]
    assert EVAL_ROWS - dataset["truncated_dropped"] <= dataset["eval_rows"] <= EVAL_ROWS, dataset
    evals = [r for r in _records(out) if "eval_loss" in r]
    start, end = evals[0], evals[-1]
    assert (start["step"], end["step"]) == (0, STEPS)
    margin, accuracy = "eval_rewards/margins", "eval_rewards/accuracies"
    # The mean held-out margin ends above 0 and above where it started.
    assert end[margin] > 0 and end[margin] > start[margin], (start, end)
    if objective == "kto":
        # TRL's KTOTrainer logs no accuracy: a row is scored against a KL estimate, not against a rival
        # answer. Its `rewards/margins` is the mean reward of a batch's desirable rows less that of its
        # undesirable rows (trl/trainer/kto_trainer.py, `_compute_loss`), averaged over the eval batches.
        # The reference is the model training starts from: every reward starts at 0.
        assert start[margin] == 0.0 and accuracy not in end, (start, end)
    else:
        # DPO's rewards are log-ratios to the reference, the model training starts from: they and the
        # accuracy start at 0. ORPO's and SimPO's are the policy's own length-normalised log-probabilities,
        # which already favour about 6 in 10 held-out chosen answers after SFT.
        assert end[accuracy] > start[accuracy], (start, end)
        if objective == "dpo":
            assert start[accuracy] == 0.0 and start[margin] == 0.0, start
    assert summary["exports"]["lora"]["ok"]
    if objective == "dpo":
        assert summary["exports"]["gguf"]["ok"], summary["exports"]["gguf"]
    answer = run_sft("generate", out, "--max-new-tokens", "8", "Who are you?")
    assert answer.output.strip()


def test_the_python_api_continues_a_run_it_was_given(tiny_run, tiny_model_dir, tmp_path: Path):
    import sft

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = sft.config(objective="dpo", from_run=sft.load(tiny_run), dataset=str(pairs))
    assert cfg.objective.name == "dpo" and cfg.model.from_run == str(tiny_run)
    # What the run was trained with comes with it: its base, its LoRA shape, its template.
    assert cfg.model.name == str(tiny_model_dir) and cfg.lora.r == 4 and cfg.template.name == "chatml"


# -- batches of pairs ------------------------------------------------------------------------------
@pytest.mark.skipif(not DPO_DEMO.is_file(), reason="../shared/data is not here")
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_pairs_are_batched_in_length_groups(objective, tiny_model_dir, tmp_path: Path):
    """A batch of pairs pads every row to its longest: the trainer each pair objective builds draws
    the real pairs (of every length) in length groups, every pair once an epoch, and pads them
    less than half as much as the random order TRL's trainers draw in, by the batches it collates
    (DPO's chosen+rejected rows; ORPO's, through the CPO trainer's own columns)."""
    import random

    from sft.core.config import plugin_options
    from sft.core.env import current_environment
    from sft.core.plugins import get_plugin_manager
    from sft.core.templating import resolve_template
    from sft.engine.backends import select_backend
    from sft.engine.data import build_datasets
    from sft.engine.models import load_tokenizer
    from sft.engine.packing import row_lengths
    from sft.engine.trainer import RunTrainerSetup, objective_trainer
    from sft.testing import tiny_config

    batch = 4
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, f"objective.name={objective}", "model.max_seq_length=1024",
                      f"training.per_device_train_batch_size={batch}", "data.cache_dir=none", dataset=DPO_DEMO)
    pm, env = get_plugin_manager(), current_environment()
    tokenizer = load_tokenizer(cfg.model)
    resolve_template(cfg, pm, tokenizer)
    data = build_datasets(cfg, pm, tokenizer, quiet=True, row_kind="pair")
    backend = select_backend(cfg, pm, env)
    model = backend.prepare_for_training(backend.load(cfg)[0], cfg)
    chosen = pm.get("objective", objective, "objective.name")
    trainer = objective_trainer(chosen, RunTrainerSetup(cfg, model, tokenizer, data, env, tmp_path / "checkpoints", [],
                                                        backend), plugin_options(cfg, "objective", objective, pm))

    lengths = row_lengths(trainer.train_dataset)
    assert lengths is not None and max(lengths) > 4 * min(lengths)  # real pairs, of every length
    assert sorted(trainer._get_train_sampler()) == list(range(len(lengths)))
    sides = [("input_ids", "attention_mask")] if objective == "dpo" else \
        [("chosen_input_ids", "chosen_attention_mask"), ("rejected_input_ids", "rejected_attention_mask")]
    slots = real = 0
    for collated in trainer.get_train_dataloader():
        slots += sum(collated[ids].numel() for ids, _ in sides)
        real += sum(int(collated[mask].sum()) for _, mask in sides)
    # A pair pads its shorter side to its longer one whatever the batch; what a batch adds to that is
    # the padding of each pair to the batch's longest pair, which the order decides.
    own = 2 * sum(lengths)
    assert real <= own
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    random_slots = sum(2 * len(b) * max(lengths[i] for i in b) for b in
                       (order[j:j + batch] for j in range(0, len(order), batch)))
    assert slots - own < 0.25 * (random_slots - own), (slots, own, random_slots)
