"""Nothing lost, nothing corrupted, nothing injected (issue 13): the fast checks, no training.

Config ranges and names, secrets kept out of written config, plugin isolation, non-UTF-8
rows, ``data.on_truncate``, hashed checkpoints, the run-directory lock, the resume decision
and the Ollama Modelfile's quoting, read back with a port of Ollama's own parser.
The checks that train a tiny model are in ``test_safety_runs.py``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
import pytest

from sft.core import ChatTemplate, Segment, hookimpl
from sft.engine import checkpoints
from sft.core.config import config_to_yaml, shareable_container
from sft.engine.configuration import load_config
from sft.core.errors import ConfigError, DataError, SftError
from sft.engine.resume import ResumeError, RunLockedError, check_resume, run_lock
from sft.core.rundir import RunDir
from sft.testing import run_sft, write_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from ollama_modelfile import parse_modelfile  # noqa: E402


def _problems(*overrides: str, pm=None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=list(overrides), pm=pm)
    return {p.key: p.message for p in info.value.problems}


# -- 10: every number has its range ---------------------------------------------------------
def test_out_of_range_numbers_are_config_errors_all_at_once():
    problems = _problems("training.learning_rate=-1", "lora.lora_dropout=1.5", "training.warmup_steps=-2",
                         "training.max_grad_norm=-1", "training.weight_decay=-0.1", "training.save_total_limit=-1",
                         "training.warmup_ratio=7", "data.test_size=1.5", "export.gguf.verify_tokens=0")
    assert set(problems) == {"training.learning_rate", "lora.lora_dropout", "training.warmup_steps",
                             "training.max_grad_norm", "training.weight_decay", "training.save_total_limit",
                             "training.warmup_ratio", "data.test_size", "export.gguf.verify_tokens"}
    assert problems["lora.lora_dropout"] == "must be >= 0 and < 1, got 1.5"
    assert "whole number" in problems["data.test_size"]


def test_the_reference_shows_each_range():
    from sft.docgen import configuration_markdown

    text = configuration_markdown()
    row = next(line for line in text.splitlines() if line.startswith("| `lora_dropout`"))
    assert "Range: `>= 0 and < 1`" in row
    generated = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert generated == text, "docs/configuration.md is stale: python -m sft.docgen --docs docs"


# -- security: names are names, secrets stay in the environment -----------------------------
@pytest.mark.parametrize("override", ["training.run_name=../../escape", "training.run_name=/tmp/abs",
                                      "export.gguf.name=../../x", "export.gguf.name=a\nFROM /etc/passwd"])
def test_names_that_are_paths_are_refused(override):
    key = override.split("=")[0]
    message = _problems(override)[key]
    assert "must be a name, not a path" in message
    # The hint names a key of the name's own section, or nothing: an export's name has no folder key.
    if key == "training.run_name":
        assert message.endswith("; the folder is set by training.output_dir")
    else:
        assert "output_dir" not in message and "training." not in message


SECRET = "hunter2-secret"


@pytest.mark.parametrize("value", ["${oc.env:SFT_TEST_SECRET}", "${oc.env:SFT_TEST_SECRET,x}", "Tell me ${oc.env:SFT_TEST_SECRET}",
                                   "${oc.decode:${oc.env:SFT_TEST_SECRET}}", "${${training.run_name}:SFT_TEST_SECRET}"])
def test_a_config_that_reads_the_environment_is_refused_naming_the_key(monkeypatch, tmp_path, value):
    """Issue 31: one indirection (notes: ${training.generation_prompt}) carried a resolved secret into
    config.yaml, summary.json, the loggers and the Hub's card. A config names other keys and nothing else."""
    monkeypatch.setenv("SFT_TEST_SECRET", SECRET)
    config = tmp_path / "config.yaml"
    config.write_text(f"training:\n  generation_prompt: '{value}'\n  run_name: oc.env\n"
                      f"  output_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(config), overrides=["model.name=${training.generation_prompt}"])
    problems = {p.key: p.message for p in info.value.problems}
    assert set(problems) == {"training.generation_prompt"}  # the key that spells it; the indirection needs no second line
    assert "training.generation_prompt=\"$VAR\"" in problems["training.generation_prompt"]
    assert "HF_TOKEN" in problems["training.generation_prompt"] and SECRET not in str(info.value)
    result = run_sft("validate", str(config), check=False)
    assert result.exit_code == 2 and "training.generation_prompt:" in result.output and SECRET not in result.output
    assert not (tmp_path / "runs").exists()


def test_a_resolver_given_on_the_command_line_or_through_the_api_is_refused_too(monkeypatch):
    from omegaconf import OmegaConf

    import sft

    monkeypatch.setenv("SFT_TEST_SECRET", SECRET)
    assert "reads the environment" in _problems("publish.hub.commit_message=${oc.env:SFT_TEST_SECRET}")["publish.hub.commit_message"]
    with pytest.raises(ConfigError, match="loggers.wandb.project: .* reads the environment"):
        sft.config(OmegaConf.create({"loggers": {"wandb": {"project": "${oc.env:SFT_TEST_SECRET}"}}}))


def test_interpolations_that_name_keys_still_work_and_are_written_resolved():
    cfg = load_config(overrides=["training.eval_steps=${training.save_steps}", "training.run_name=run-${training.seed}"])
    shared = shareable_container(cfg)
    assert shared["training"]["eval_steps"] == 50 and shared["training"]["run_name"] == f"run-{cfg.training.seed}"
    assert "${" not in config_to_yaml(cfg)


# -- 5: a broken plugin disables itself, not the CLI ----------------------------------------
class _Template(ChatTemplate):
    description = "test"

    def __init__(self, name, options=None):
        self.name = name
        if options is not None:
            self.options = options

    def render(self, messages, tokenizer=None):
        return [Segment(m.content, m.role == "assistant") for m in messages]

    def generation_prompt(self, messages, tokenizer=None):
        return ""

    def stop_tokens(self, tokenizer=None):
        return ["\n"]

    def jinja(self, tokenizer=None):
        return ""

    def ollama_template(self, tokenizer=None):
        return ""


class _Registers:
    def __init__(self, template):
        self.template = template

    @hookimpl
    def register_chat_templates(self, register):
        register(self.template)


@dataclass
class _SetOptions:  # OmegaConf cannot build a field annotated `set`
    value: set = field(default_factory=set)


class _NotADataclass:
    value = 1


@pytest.mark.parametrize("template, reason", [
    (_Template("odd", options=_NotADataclass), "options must be a dataclass type"),
    (_Template("odd", options=_SetOptions), "OmegaConf cannot build its options _SetOptions"),
])
def test_a_plugin_that_breaks_the_registry_is_disabled_alone_and_listed(sft_plugin_manager, template, reason):
    sft_plugin_manager.register(_Registers(template), "bad")
    cfg = load_config(overrides=["export.enabled=[]"])  # every command still works
    assert cfg.template.name == "chatml"
    assert sft_plugin_manager.owner("chat_template", "chatml") == "templates.chatml"
    listed = json.loads(run_sft("plugins", "--json").stdout)
    bad = next(p for p in listed if p["name"] == "bad")
    assert bad["status"] == "failed" and reason in bad["error"]
    assert next(p for p in listed if p["name"] == "templates.chatml")["status"] == "ok"


def test_a_third_party_chatml_is_left_out_and_listed(sft_plugin_manager):
    sft_plugin_manager.register(_Registers(_Template("chatml")), "bad")
    assert load_config(overrides=["export.enabled=[]"]).template.name == "chatml"
    assert sft_plugin_manager.owner("chat_template", "chatml") == "templates.chatml"
    bad = next(p for p in json.loads(run_sft("plugins", "--json").stdout) if p["name"] == "bad")
    assert bad["status"] == "ok" and "the name is sft's own (plugin 'templates.chatml' (sft-forge" in bad["clashes"][0]


def test_options_that_clash_with_a_core_key_disable_that_plugin(sft_plugin_manager):
    @dataclass
    class Options:
        x: int = 1

    class Named:
        @hookimpl
        def register_chat_templates(self, register):
            register(_Template("on_missing_eot", options=Options))  # template.on_missing_eot is a core key

    sft_plugin_manager.register(Named(), "clashing")
    assert load_config(overrides=["export.enabled=[]"]).template.on_missing_eot == "add"
    listed = {p["name"]: p for p in json.loads(run_sft("plugins", "--json").stdout)}
    assert "clashes with the core key 'template.on_missing_eot'" in listed["clashing"]["error"]


# -- 6: bytes that are not UTF-8 -----------------------------------------------------------
def _rows(n=30):
    return [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)]


def _latin1_file(path: Path, suffix: str) -> Path:
    rows = _rows()
    if suffix == ".jsonl":
        lines = [json.dumps(r).encode() for r in rows]
        lines[6] = '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1")
        path.write_bytes(b"\n".join(lines) + b"\n")
    elif suffix == ".json":
        lines = [json.dumps(r).encode() for r in rows]
        lines[6] = '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1")
        path.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    else:
        lines = [b"instruction,output"] + [f"{r['instruction']},{r['output']}".encode() for r in rows]
        lines[7] = "caf\xe9,x".encode("latin-1")
        path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_rows_name_file_line_and_byte_and_skip_counts_them(tmp_path, tiny_model_dir, suffix):
    from transformers import AutoTokenizer

    from sft.engine.data import build_datasets

    data = _latin1_file(tmp_path / f"train{suffix}", suffix)
    raw = data.read_bytes()
    offset = raw.index(b"\xe9")
    base = [f"data.dataset={data}", f"model.name={tiny_model_dir}", "data.cache_dir=none", "export.enabled=[]"]
    with pytest.raises(DataError) as info:
        build_datasets(load_config(overrides=base), None, AutoTokenizer.from_pretrained(tiny_model_dir))
    message = str(info.value)
    line = raw[:offset].count(b"\n") + 1
    assert message.startswith(f"{data}:{line}, row 6: not valid UTF-8") and f"byte offset {offset}" in message and "0xe9" in message
    prepared = build_datasets(load_config(overrides=[*base, "data.on_bad_row=skip"]), None,
                              AutoTokenizer.from_pretrained(tiny_model_dir), quiet=True)
    assert prepared.stats["skipped"]["count"] == 1 and prepared.stats["train_rows"] == 29
    assert "not valid UTF-8" in prepared.stats["skipped"]["examples"][0]
    # The counted reason keeps the encodings' names (numbers elsewhere become N).
    [reason] = prepared.stats["skipped"]["reasons"]
    assert reason.startswith("not valid UTF-8: byte 0xe9 at byte offset N;") and "iconv -f latin-1 -t UTF-8" in reason


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_file_in_another_unicode_encoding_is_named_once(tmp_path, tiny_model_dir, encoding, name):
    from sft.engine.data import build_datasets

    data = tmp_path / "train.jsonl"
    data.write_bytes("".join(json.dumps(r) + "\n" for r in _rows()).encode(encoding))  # with its byte-order mark
    with pytest.raises(DataError) as info:
        build_datasets(load_config(overrides=[f"data.dataset={data}", f"model.name={tiny_model_dir}",
                                              "data.cache_dir=none", "data.on_bad_row=skip"]), None, None)
    assert str(info.value) == (f"{data}: the file is {name} (it starts with a {name} byte-order mark), not UTF-8; "
                               f"save it as UTF-8 (e.g. iconv -f {name} -t UTF-8 FILE)")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_empty_file_under_format_auto_is_said_to_be_empty(tmp_path, tiny_model_dir, suffix):
    from sft.engine.data import build_datasets

    data = tmp_path / f"train{suffix}"
    data.write_text("")
    with pytest.raises(DataError) as info:
        build_datasets(load_config(overrides=[f"data.dataset={data}", f"model.name={tiny_model_dir}",
                                              "data.cache_dir=none"]), None, None)
    assert str(info.value) == f"{data}: the file is empty: it has no rows"


# -- 7: a cut answer keeps its end-of-turn token, or is left out ---------------------------
@pytest.mark.parametrize("policy", ["drop", "keep_eot", "truncate"])
def test_on_truncate(tmp_path, tiny_model_dir, policy):
    from transformers import AutoTokenizer

    from sft.engine.data import build_datasets

    rows = _rows(4) + [{"instruction": "tell me a long story", "output": " ".join(["word"] * 600)}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    overrides = [f"data.dataset={data}", f"model.name={tiny_model_dir}", "data.cache_dir=none",
                 "model.max_seq_length=64", "export.enabled=[]"]
    if policy != "drop":
        overrides.append(f"data.on_truncate={policy}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(overrides=overrides)
    assert cfg.data.on_truncate == policy  # drop is the default
    prepared = build_datasets(cfg, None, tokenizer, quiet=True)
    stats = prepared.stats
    assert stats["truncated"] == 1
    long_rows = [(ids, mask) for ids, mask in zip(prepared.train["input_ids"], prepared.train["assistant_masks"])
                 if len(ids) == 64]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if policy == "drop":
        assert stats["truncated_dropped"] == 1 and stats["train_rows"] == 4 and not long_rows
    elif policy == "keep_eot":
        assert stats["truncated_eot_added"] == 1 and stats["train_rows"] == 5
        [(ids, mask)] = long_rows
        assert ids[-1] == eot and mask[-1] == 1 and mask[-2] == 1
    else:
        [(ids, mask)] = long_rows
        assert ids[-1] != eot and stats["train_rows"] == 5


# -- 3: checkpoints carry sha256, and a damaged one is never resumed -----------------------
def _checkpoint(root: Path, step: int, weights=None) -> Path:
    import torch
    from safetensors.torch import save_file

    written = checkpoints.staging_dir(root, step) / f"checkpoint-{step}"
    written.mkdir()
    save_file({"w": weights if weights is not None else torch.ones(4)}, str(written / "adapter_model.safetensors"))
    (written / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoints.commit_checkpoint(written, root, step)


def test_a_same_size_corruption_is_found_by_its_sha256_and_passed_over(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    _checkpoint(root, 1)
    newest = _checkpoint(root, 2)
    marker = json.loads((newest / checkpoints.COMPLETE).read_text())
    assert set(marker["sha256"]) == {"adapter_model.safetensors", "trainer_state.json"}
    state = newest / "trainer_state.json"
    state.write_text(state.read_text().replace("2", "9"))  # same size, other bytes
    assert checkpoints.last_complete(root).step == 2  # sizes alone cannot tell
    notes: list[str] = []
    assert checkpoints.last_complete(root, notify=notes.append, verify=True).step == 1
    assert "checkpoint-2" in notes[-1] and "sha256" in notes[-1]
    _checkpoint(root, 3, weights=torch.tensor([1.0, float("nan")]))
    notes.clear()
    assert checkpoints.last_complete(root, notify=notes.append, verify=True).step == 1
    assert any("NaN/inf" in n and "checkpoint-3" in n for n in notes)


# -- 1: one run per directory; the data cache under two writers -----------------------------
def test_a_second_run_in_the_same_directory_is_refused_with_the_holders_pid(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released when the first run ends
        pass


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SftError, match="cannot create the run directory"):
        with run_lock(tmp_path / "file" / "run"):
            pass


def test_two_writers_of_one_cache_entry_leave_a_whole_entry(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from sft.engine.data import build_datasets
    from sft.engine.data.cache import load_entry, store_entry

    data = write_jsonl(tmp_path / "train.jsonl", _rows(8))
    cfg = load_config(overrides=[f"data.dataset={data}", f"model.name={tiny_model_dir}", "data.cache_dir=none"])
    prepared = build_datasets(cfg, None, AutoTokenizer.from_pretrained(tiny_model_dir), quiet=True)
    entry = tmp_path / "cache" / "key"
    errors: list[BaseException] = []

    def write():
        try:
            for _ in range(3):
                store_entry(entry, prepared)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors
    loaded = load_entry(entry)
    assert loaded is not None and loaded["train"]["input_ids"] == prepared.train["input_ids"]
    assert [p.name for p in entry.parent.iterdir()] == ["key"]  # no staging leftovers


# -- 0, 2, 9: what --resume may continue, decided before anything is written ---------------
def _fake_run(root: Path, cfg, status: str | None = None, complete: bool = True) -> RunDir:
    run = RunDir.of(root)
    run.root.mkdir(parents=True)
    run.config.write_text(config_to_yaml(cfg))
    if status:
        run.update_summary(status=status, steps=3)
    if complete:
        _checkpoint(run.checkpoints, 3)
    else:
        (run.checkpoints / "checkpoint-3").mkdir(parents=True)
    return run


def test_resume_refuses_a_finished_run_and_optimisation_changes_and_writes_nothing(tmp_path):
    cfg = load_config(overrides=["export.enabled=[]"])
    finished = _fake_run(tmp_path / "finished", cfg, status="ok")
    before = {p: p.read_bytes() for p in (finished.config, finished.summary_path)}
    with pytest.raises(ResumeError, match="finished"):
        check_resume(finished, cfg)
    assert {p: p.read_bytes() for p in before} == before

    unfinished = _fake_run(tmp_path / "unfinished", cfg, status="interrupted")
    changed = load_config(overrides=["export.enabled=[lora]", "lora.r=8", "data.dataset=other.jsonl",
                                     "training.logging_steps=5"])
    with pytest.raises(ResumeError) as info:
        check_resume(unfinished, changed)
    assert "lora.r" in str(info.value) and "data.dataset" in str(info.value)
    assert "logging_steps" not in str(info.value) and "export.enabled" not in str(info.value)
    harmless = load_config(overrides=["export.enabled=[lora]", "training.logging_steps=5"])
    assert check_resume(unfinished, harmless) == ["export.enabled", "training.logging_steps"]


def test_resume_without_a_name_picks_the_one_unfinished_matching_run(tmp_path, monkeypatch):
    from sft.engine.run import resolve_run_dir

    cfg = load_config(overrides=["export.enabled=[]"])
    other = load_config(overrides=["export.enabled=[]", "training.learning_rate=0.1"])
    _fake_run(tmp_path / "a-finished", cfg, status="ok")
    _fake_run(tmp_path / "b-other-config", other, status="interrupted")
    _fake_run(tmp_path / "c-incomplete", cfg, complete=False)
    with pytest.raises(ResumeError, match="no unfinished run .* matches this config .*b-other-config"):
        resolve_run_dir(cfg, resume=True, runs_root=tmp_path)
    wanted = _fake_run(tmp_path / "d-wanted", cfg, status="interrupted")
    assert resolve_run_dir(cfg, resume=True, runs_root=tmp_path) == wanted
    _fake_run(tmp_path / "e-twin", cfg)
    with pytest.raises(ResumeError, match="2 unfinished runs match"):
        resolve_run_dir(cfg, resume=True, runs_root=tmp_path)


def test_resume_with_only_an_incomplete_checkpoint_says_to_start_over_and_a_new_run_can(tmp_path):
    from sft.engine.run import _check_fresh, _resume_point

    cfg = load_config(overrides=["export.enabled=[]"])
    run = _fake_run(tmp_path / "run", cfg, complete=False)
    with pytest.raises(ResumeError, match="without --resume to start this run over"):
        _resume_point(run, cfg)
    _check_fresh(run)  # and without --resume, the run may start over there
    assert not run.checkpoints.exists()


# -- security: the Modelfile reads back as written ------------------------------------------
class _StopTemplate(_Template):
    def __init__(self, stops, go="{{ .Prompt }}"):
        super().__init__("stops")
        self.stops, self.go = stops, go

    def stop_tokens(self, tokenizer=None):
        return self.stops

    def ollama_template(self, tokenizer=None):
        return self.go


def test_modelfile_reads_back_exactly_with_ollamas_parser():
    from sft.plugins.exporters.gguf.modelfile import modelfile_text

    go = '{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}say "hi"\t{{ .Prompt }}"'
    stops = ["<|im_end|>", "<|endoftext|>", " ### ", "User:"]
    commands = parse_modelfile(modelfile_text("run-q8_0.gguf", _StopTemplate(stops, go)))
    assert commands == [("model", "./run-q8_0.gguf"), ("template", go)] + [("stop", s) for s in stops]


@pytest.mark.parametrize("stop", ['a"\nFROM /etc/passwd\nPARAMETER stop "b', 'say "hi"', "back\\slash", "two\nlines"])
def test_modelfile_refuses_stop_strings_its_parser_cannot_read(stop):
    from sft.plugins.exporters.gguf.modelfile import modelfile_text

    with pytest.raises(SftError, match="cannot quote"):
        modelfile_text("run.gguf", _StopTemplate(["<|im_end|>", stop]))


# -- the test kit's GPU skip: the marker, not a keyword -------------------------------------
def test_the_gpu_skip_hook_skips_the_marker_and_nothing_else(tmp_path):
    """A directory or a parametrize id named "gpu" is no reason to skip; ``@pytest.mark.gpu`` on CPU is."""
    import subprocess

    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "test_third_party.py").write_text(
        "import pytest\n\n"
        "def test_in_a_gpu_folder():\n    pass\n\n"
        "@pytest.mark.parametrize('device', ['gpu', 'cpu'])\ndef test_param(device):\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_marked():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "SFT_FORCE_GPU_TESTS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "sft.testing", "-rs", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "gpu")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "3 passed, 1 skipped" in result.stdout, result.stdout
    assert "test_third_party.py:10: needs a CUDA GPU" in result.stdout  # line 10: test_marked
