"""Nothing lost, nothing corrupted, nothing injected (issue 13): the checks that train a tiny model.

SIGTERM stops a real run with a checkpoint; a failed resume leaves the run's record alone; a
resume that trains nothing keeps the run's figures; a refused pickle, refused remote code,
a sandboxed template and an unwritable directory are one-line errors; no environment
secret reaches what a run writes or tells its loggers; ``sft generate`` loads runs trained
with ``model.trust_remote_code`` and ``model.gguf_file``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.core import hookimpl
from sft.engine import checkpoints
from sft.core.interfaces import Logger
from sft.testing import make_tiny_llama, run_sft, tiny_overrides, train_tiny


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sft.cli", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}


# -- 4: SIGTERM ------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_records_interrupted(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", *tiny_overrides(out, tiny_model_dir, steps=500)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    last = checkpoints.last_complete(out / "checkpoints", verify=True)
    assert last is not None and last.step == summary["steps"]
    assert f"checkpoint-{last.step} was saved; continue with --resume" in err
    assert "Traceback" not in err


# -- 2, 11: resume keeps the run's record ----------------------------------------------------
@pytest.fixture
def trained_then_killed(tiny_model_dir, tmp_path) -> Path:
    """A run with checkpoints at steps 1 and 2 (its last), killed before it wrote its adapter and summary."""
    run = train_tiny(tmp_path / "run", tiny_model_dir, "training.save_steps=1", steps=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mean_train_loss"] > 0 and summary["tokens_per_second"] > 0
    shutil.rmtree(run / "adapter")
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    return run


def test_a_resume_with_an_incompatible_config_changes_nothing(trained_then_killed, tiny_model_dir):
    run = trained_then_killed
    before = {p.name: p.read_bytes() for p in (run / "config.yaml", run / "summary.json")}
    result = run_sft("run", "--resume", *tiny_overrides(run, tiny_model_dir, "sft:identity", steps=2), "training.save_steps=1",
                     "lora.r=8", check=False)
    assert result.exit_code == 1 and "lora.r" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in (run / "config.yaml", run / "summary.json")} == before


def test_a_resume_that_trains_no_step_keeps_the_runs_figures(trained_then_killed, tiny_model_dir):
    from sft.engine.run import run_training
    from sft.testing import tiny_config

    run = trained_then_killed
    earlier = json.loads((run / "summary.json").read_text())
    run_training(tiny_config(run, tiny_model_dir, "training.save_steps=1", steps=2), resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and (run / "adapter").is_dir()
    assert summary["tokens_per_second"] == earlier["tokens_per_second"], (summary, earlier)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert summary["mean_train_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)


# -- 12: one-line errors -------------------------------------------------------------------
def test_a_refused_pickle_in_a_checkpoint_is_one_line(trained_then_killed, tiny_model_dir):
    run = trained_then_killed
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")  # resume from step 1, which loads the RNG state
    ckpt = run / "checkpoints" / "checkpoint-1"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (ckpt / "rng_state.pth").write_bytes(pickle.dumps(Evil(), protocol=2))  # torch's own protocol
    staged = checkpoints.staging_dir(run / "checkpoints", 1) / "checkpoint-1"
    ckpt.rename(staged)
    (staged / checkpoints.COMPLETE).unlink()
    checkpoints.commit_checkpoint(staged, run / "checkpoints", 1)  # a valid marker: only the pickle is wrong
    result = run_sft("run", "--resume", *tiny_overrides(run, tiny_model_dir, "sft:identity", steps=2), "training.save_steps=1",
                     check=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and not Path("pwned").exists()
    # Our own line, naming the file and what it asks for; never torch's advice to load it with weights_only=False.
    assert (f"refused to load --resume: {ckpt / 'rng_state.pth'}: it asks for posix.system, which weights never "
            f"need; it was not written by sft, so it is not loaded") in result.output
    assert "weights_only" not in result.output and "trusted source" not in result.output


def _remote_code_model(path: Path) -> Path:
    make_tiny_llama(path)
    (path / "configuration_forge.py").write_text(
        "from transformers import LlamaConfig\n\nclass ForgeConfig(LlamaConfig):\n    model_type = 'forge_llama'\n")
    (path / "modeling_forge.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_forge import ForgeConfig\n\n"
        "class ForgeForCausalLM(LlamaForCausalLM):\n    config_class = ForgeConfig\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="forge_llama", architectures=["ForgeForCausalLM"],
                  auto_map={"AutoConfig": "configuration_forge.ForgeConfig",
                            "AutoModelForCausalLM": "modeling_forge.ForgeForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_remote_code_is_refused_in_one_line_and_generate_honours_trust_remote_code(tmp_path, capsys):
    from sft.engine.generate import generate_from_run

    model = _remote_code_model(tmp_path / "model")
    refused = run_sft("run", *tiny_overrides(tmp_path / "refused", model, steps=1), check=False)
    assert refused.exit_code == 1 and "model.trust_remote_code" in refused.output
    assert "Traceback" not in refused.output
    # Full fine-tuning saves the custom model whole: generation must load it with remote code too.
    run = train_tiny(tmp_path / "run", model, "model.trust_remote_code=true", "model.method=full", steps=1)
    assert json.loads((run / "adapter" / "config.json").read_text())["model_type"] == "forge_llama"
    assert isinstance(generate_from_run(run, "Who are you?", max_new_tokens=3, trust_remote_code=True), str)


def test_merged_16bit_verifies_a_model_that_needs_its_own_code(tmp_path):
    """Issue 31: the verification reloaded the merged folder without trust_remote_code, so it failed for every such model."""
    model = _remote_code_model(tmp_path / "model")
    run = train_tiny(tmp_path / "run", model, "model.trust_remote_code=true", "export.enabled=[merged_16bit]", steps=1)
    record = json.loads((run / "summary.json").read_text())["exports"]["merged_16bit"]
    assert record["ok"], record["error"]
    assert record["details"]["verify"]["ok"]
    assert json.loads((run / "exports/merged_16bit/config.json").read_text())["model_type"] == "forge_llama"


# -- issue 31: a run folder someone sent you runs none of its code without your word --------------
def _hostile_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose config.yaml trusts remote code in a base model inside the folder and
    names an eval task file inside it; each one's Python writes a marker file when it is imported."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "received"))
    base = _remote_code_model(run / "base")
    config_code = base / "configuration_forge.py"
    config_code.write_text(f"open({str(tmp_path / 'model-code-ran')!r}, 'w').write('ran')\n" + config_code.read_text())
    tasks = run / "tasks"
    tasks.mkdir()
    (tasks / "evil.py").write_text(f"open({str(tmp_path / 'task-code-ran')!r}, 'w').write('ran')\n"
                                   "def rows(**_):\n    raise RuntimeError('not a dataset')\n")
    (tasks / "evil.yaml").write_text("task: evil\ncustom_dataset: !function evil.rows\ntest_split: test\n"
                                     "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
                                     "doc_to_target: a\n")
    text = (run / "config.yaml").read_text()
    text = re.sub(r"(?m)^  name: .*$", f"  name: {base}", text, count=1)
    text = text.replace("trust_remote_code: false", "trust_remote_code: true")
    text = re.sub(r"(?m)^  tasks:\n(  - .*\n)*", f"  tasks:\n  - {tasks / 'evil.yaml'}\n", text)
    (run / "config.yaml").write_text(text)
    from sft.engine.configuration import load_config

    cfg = load_config(str(run / "config.yaml"))
    assert cfg.model.trust_remote_code and cfg.model.name == str(base) and list(cfg.eval.tasks) == [str(tasks / "evil.yaml")]
    return run


def test_a_received_run_runs_none_of_its_code_without_the_users_flag(tiny_run, tmp_path):
    run = _hostile_run(tiny_run, tmp_path)
    model_ran, task_ran = tmp_path / "model-code-ran", tmp_path / "task-code-ran"
    for args in (["generate", run, "Hi"], ["chat", run], ["export", run, "--exporter", "merged_16bit"], ["eval", run]):
        result = run_sft(*args, input="hello\n", check=False)
        assert result.exit_code == 1, result.output
        assert (f"model.trust_remote_code: {run / 'config.yaml'} sets it to true" in result.output
                and "add --trust-remote-code to this command" in result.output), result.output
        assert "Traceback" not in result.output and not model_ran.exists() and not task_ran.exists()
    # The user's flag allows the model's code, never the task file the run's config names.
    result = run_sft("eval", run, "--trust-remote-code", check=False)
    assert result.exit_code == 1 and not task_ran.exists() and not model_ran.exists()
    assert f"eval.tasks: {run / 'config.yaml'} names the task file {run / 'tasks/evil.yaml'}" in result.output
    assert f"--tasks {run / 'tasks/evil.yaml'}" in result.output
    # What the flags let through does run: the folder's code is live, so the refusals above are what kept it out.
    assert run_sft("generate", run, "Hi", "--max-new-tokens", "2", "--trust-remote-code").exit_code == 0
    assert model_ran.exists()
    model_ran.unlink()
    run_sft("eval", run, "--tasks", run / "tasks/evil.yaml", "--trust-remote-code", "--limit", "1", check=False)
    assert task_ran.exists()


def test_generate_loads_a_run_trained_from_a_gguf_file(tmp_path, tiny_model_dir):
    """The run directory is built by hand (training from a GGUF converts its tokenizer, a minute here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.core.config import config_to_yaml

    from sft.engine.configuration import load_config
    from sft.engine.generate import load_run
    from sft.plugins.exporters.gguf.convert import convert_to_gguf

    folder = tmp_path / "gguf-model"
    folder.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    convert_to_gguf(tiny_model_dir, folder / "tiny.gguf", "f16", tokenizer=tokenizer, tokenizer_dir=tiny_model_dir,
                    chat_template=None, eot_token=None, name="tiny")
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(overrides=[f"model.name={folder}", "model.gguf_file=tiny.gguf", "export.enabled=[]"])
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    model, _tokenizer, _template, loaded = load_run(run)
    assert loaded.model.gguf_file == "tiny.gguf"
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"
    assert model.base_model.model.config.num_hidden_layers == 2


def test_a_sandboxed_template_is_one_line(tmp_path):
    model = make_tiny_llama(tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    result = run_sft("validate", f"model.name={model}", "template.name=tokenizer", "data.cache_dir=none",
                     check=False)
    assert result.exit_code == 1 and "Jinja sandbox" in result.output and "Traceback" not in result.output


#: Templates that never finish: nested loops (10^10 turns), and a macro that calls itself twice (2^60 calls).
ENDLESS = {
    "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
             "{% for m in messages %}{{ m.content }}{% endfor %}",
    "exponential": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                   "{{ f(60) }}{% for m in messages %}{{ m.content }}{% endfor %}",
}


@pytest.mark.parametrize("shape", sorted(ENDLESS))
def test_a_template_that_never_finishes_is_stopped_with_one_line(tmp_path, monkeypatch, shape):
    from sft.core import timelimit

    monkeypatch.setattr(timelimit, "RENDER_SECONDS", 1.0)  # 30 s in use
    model = make_tiny_llama(tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ENDLESS[shape]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    started = time.monotonic()
    result = run_sft("validate", f"model.name={model}", "template.name=tokenizer", "data.cache_dir=none",
                     "data.on_bad_row=skip", check=False)
    assert time.monotonic() - started < 60, "stopped at the first render, never once a row"
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"template 'tokenizer' (the chat_template of {model}) took more than 1 s to render one conversation "
            f"and was stopped") in result.output
    # The limit leaves later renders alone: a template that finishes renders as before.
    from sft.core.timelimit import render_time_limit

    with render_time_limit("a quick one"):
        time.sleep(0.01)
    time.sleep(1.5)  # past where a stale timeout would land


# -- security: no secret in what a run writes or tells its loggers --------------------------
class _Recorder(Logger):
    name = "recorder"
    description = "keeps what it is told"
    seen: dict = {}

    def start(self, run, options=None):
        _Recorder.seen["config"] = run.config

    def log(self, step, metrics):
        pass

    def finish(self, summary):
        _Recorder.seen["summary"] = dict(summary)


class _RecorderPlugin:
    @hookimpl
    def register_loggers(self, register):
        register(_Recorder())


def test_no_environment_secret_reaches_the_run_directory_or_a_logger(sft_plugin_manager, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """The notes take the secret through one indirection: the run is refused before a file is written."""
    monkeypatch.setenv("SFT_TEST_TOKEN", "hf_secret_value_42")
    sft_plugin_manager.register(_RecorderPlugin(), "recorder-plugin")
    _Recorder.seen.clear()
    config = tmp_path / "config.yaml"
    config.write_text("training:\n  generation_prompt: ${oc.env:SFT_TEST_TOKEN}\n"
                      "loggers:\n  wandb:\n    notes: ${training.generation_prompt}\n")
    result = run_sft("run", str(config), *tiny_overrides(tmp_path / "run", tiny_model_dir, steps=1),
                     "loggers.enabled=[recorder]", check=False)
    assert result.exit_code == 2, result.output
    assert "training.generation_prompt: '${oc.env:SFT_TEST_TOKEN}' reads the environment" in result.output
    assert "hf_secret_value_42" not in result.output and not _Recorder.seen
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"hf_secret_value_42" not in f.read_bytes(), f


def test_continuing_a_received_run_needs_the_users_own_trust_remote_code(tiny_run, tmp_path):
    """``sft run --from RUN`` takes the model settings of that run, but not its permission to run code."""
    from sft.core.errors import ConfigError
    from sft.engine.configuration import load_config
    from sft.engine.continuation import continued_run

    run = _hostile_run(tiny_run, tmp_path)
    with pytest.raises(ConfigError, match=r"model.trust_remote_code: .*received/config.yaml sets it to true") as info:
        load_config(overrides=[f"model.from_run={run}"], from_run=continued_run)
    assert [p.key for p in info.value.problems] == ["model.trust_remote_code"]
    cfg = load_config(overrides=[f"model.from_run={run}", "model.trust_remote_code=true"], from_run=continued_run)
    assert cfg.model.trust_remote_code and cfg.model.name == str(run / "base")
    assert not (tmp_path / "model-code-ran").exists()
