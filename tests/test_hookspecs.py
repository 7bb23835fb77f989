"""Every hook spec is documented and tested: a plugin registered through it is used by the real code path.

The meta-tests (as in datasette) require a docstring on each spec and a ``test_hook_<name>``
test somewhere under tests/. Each ``test_hook_*`` registers an in-test plugin through its
hook on ``sft_plugin_manager`` and checks that the code that reads that registry (data
pipeline, trainer, exporters) uses it.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest

from sft.core import (
    DataError,
    DatasetFormat,
    Exporter,
    ExportResult,
    Logger,
    Message,
    Publisher,
    RunInfo,
    SftError,
    TrainingBackend,
    hookimpl,
    hookspecs,
)
from sft.core.config import opt
from sft.core.interfaces import KINDS
from sft.core.templating import Turn, TurnTemplate
from sft.testing import tiny_config, train_tiny, trained_spans, write_jsonl

TESTS = Path(__file__).parent
HOOKS = sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sft_spec"))


def test_every_kind_has_a_hook_spec():
    assert HOOKS == sorted(hook for hook, _iface, _section in KINDS.values())


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_has_a_docstring(hook: str):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc.splitlines()[0]) > 20, f"{hook}: needs a one-line summary"
    for arg in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f":param {arg}:" in doc, f"{hook}: the docstring does not describe its argument '{arg}'"
    assert "Called" in doc, f"{hook}: the docstring must say when the hook is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_has_a_test(hook: str):
    pattern = re.compile(rf"^def test_hook_{hook}\b", re.M)
    assert any(pattern.search(p.read_text()) for p in TESTS.rglob("test_*.py")), f"no test_hook_{hook} under tests/"


# -- register_dataset_formats ---------------------------------------------------------------
class PipeFormat(DatasetFormat):
    """``{"dialogue": "question|answer"}``: a format no bundled plugin reads."""

    name = "pipe"
    version = "1"
    description = "question|answer in one column"
    columns = ("dialogue",)

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        question, sep, answer = str(row.get("dialogue", "")).partition("|")
        if not sep:
            raise DataError("expected 'question|answer'", field="dialogue")
        return [Message("user", question), Message("assistant", answer)]


class PipePlugin:
    @hookimpl
    def register_dataset_formats(self, register):
        register(PipeFormat())


def test_hook_register_dataset_formats(sft_plugin_manager, tiny_model_dir, tiny_tokenizer, tmp_path: Path):
    from sft.engine.data import build_datasets

    sft_plugin_manager.register(PipePlugin(), "pipe-plugin")
    rows = [{"dialogue": f"What is {n}+{n}?|{2 * n}"} for n in range(5)] + [{"dialogue": "no separator"}]
    data = write_jsonl(tmp_path / "pipe.jsonl", rows)
    # format: auto detects it from the columns; the bad row is located by file:line and field.
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "data.on_bad_row=skip", "data.max_bad_fraction=0.5", dataset=data)
    prepared = build_datasets(cfg, None, tiny_tokenizer, use_cache=False, quiet=True)
    assert prepared.stats["format"] == "pipe" and prepared.stats["train_rows"] == 5
    assert prepared.train_conversations[1] == [Message("user", "What is 1+1?"), Message("assistant", "2")]
    assert f"{data}:6" in prepared.stats["skipped"]["examples"][0] and "dialogue" in prepared.stats["skipped"]["examples"][0]


# -- register_chat_templates ----------------------------------------------------------------
@dataclass
class BracketOptions:
    answer_tag: str = opt("[A]", "What starts an answer.")


class BracketTemplate(TurnTemplate):
    """``[Q] question\\n[A]\\nanswer<|im_end|>\\n``, with the answer tag configurable."""

    name = "brackets"
    version = "1"
    description = "[Q]/[A] lines"
    options = BracketOptions
    user = Turn("[Q] ", "\n")
    assistant = Turn("[A]\n", "\n")
    eot = "<|im_end|>"

    def configure(self, options: BracketOptions) -> "BracketTemplate":
        configured = BracketTemplate()
        configured.assistant = Turn(options.answer_tag + "\n", "\n")
        return configured


class BracketPlugin:
    @hookimpl
    def register_chat_templates(self, register):
        register(BracketTemplate())


def test_hook_register_chat_templates(sft_plugin_manager, tiny_model_dir, tiny_tokenizer, tmp_path: Path):
    from sft.engine.data import build_datasets

    sft_plugin_manager.register(BracketPlugin(), "bracket-plugin")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "template.name=brackets", "template.brackets.answer_tag=<ANS>")
    prepared = build_datasets(cfg, None, tiny_tokenizer, use_cache=False, quiet=True)
    assert prepared.stats["template"] == "brackets"
    row = prepared.train[0]
    conversation = prepared.train_conversations[0]
    text = tiny_tokenizer.decode(row["input_ids"])
    assert text.startswith("[Q] ") and "\n<ANS>\n" in text  # rendered by the template, with its options
    answers = [m.content + "<|im_end|>" for m in conversation if m.role == "assistant"]
    assert trained_spans(row["input_ids"], row["assistant_masks"], tiny_tokenizer) == answers
    assert tiny_tokenizer.chat_template == BracketTemplate().configure(BracketOptions("<ANS>")).jinja(tiny_tokenizer)


# -- register_loggers -----------------------------------------------------------------------
class RecordingLogger(Logger):
    name = "recorder"
    description = "keeps every call"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self, run: RunInfo, options: Any = None) -> None:
        self.calls = [("start", run)]

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.calls.append(("log", (step, dict(metrics))))

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.calls.append(("finish", dict(summary)))


class LoggerPlugin:
    def __init__(self) -> None:
        self.logger = RecordingLogger()

    @hookimpl
    def register_loggers(self, register):
        register(self.logger)


def test_hook_register_loggers(sft_plugin_manager, tiny_model_dir, tmp_path: Path):
    plugin = LoggerPlugin()
    sft_plugin_manager.register(plugin, "recorder-plugin")
    run = train_tiny(tmp_path / "run", tiny_model_dir, "loggers.enabled=[recorder]", "data.test_size=2",
                     "training.eval_strategy=steps", "training.eval_steps=2")
    calls = plugin.logger.calls
    kinds = [kind for kind, _ in calls]
    assert kinds[0] == "start" and kinds[-1] == "finish" and kinds.count("log") >= 3
    info: RunInfo = calls[0][1]
    assert Path(info.run_dir) == run and info.total_steps == 2 and info.config["loggers"]["enabled"] == ["recorder"]
    logged = [payload for kind, payload in calls if kind == "log"]
    train_steps = [step for step, metrics in logged if "loss" in metrics]
    assert train_steps == [1, 2] and all(metrics["loss"] > 0 for _, metrics in logged if "loss" in metrics)
    assert any("eval_loss" in metrics for _, metrics in logged)
    # The same events that went to metrics.jsonl, and the final summary.json.
    assert len(logged) == len((run / "metrics.jsonl").read_text().splitlines())
    assert calls[-1][1]["status"] == "ok" and calls[-1][1]["steps"] == 2


# -- register_exporters ---------------------------------------------------------------------
@dataclass
class ManifestOptions:
    filename: str = opt("MANIFEST.txt", "Where the list goes.")


class ManifestExporter(Exporter):
    """Lists the adapter's files: proves it ran on the run it was given, with its options."""

    name = "manifest"
    description = "adapter file list"
    options = ManifestOptions

    def export(self, context: Any, options: ManifestOptions | None = None) -> ExportResult:
        out = context.output_dir(self.name) / options.filename
        out.write_text("\n".join(sorted(p.name for p in context.adapter_dir.iterdir())) + "\n")
        return ExportResult(self.name, ok=True, paths=[str(out)], details={"template": context.template.name})


class NeedsGpuExporter(ManifestExporter):
    name = "needs_gpu"

    def unsupported_reason(self, env: Any, options: Any = None) -> str | None:
        return None if env.cuda else "needs a CUDA GPU (test exporter)"


class ExporterPlugin:
    @hookimpl
    def register_exporters(self, register):
        register(ManifestExporter())
        register(NeedsGpuExporter())


def test_hook_register_exporters(sft_plugin_manager, tiny_run: Path, tmp_path: Path):
    from sft.engine.configuration import load_config
    from sft.core.env import current_environment
    from sft.core.rundir import RunDir
    from sft.core.templating import resolve_template
    from sft.engine.export import run_exporters

    sft_plugin_manager.register(ExporterPlugin(), "exporter-plugin")
    run = RunDir.of(shutil.copytree(tiny_run, tmp_path / "run"))
    cfg = load_config(str(run.config), ["export.enabled=[manifest,needs_gpu]", "export.manifest.filename=files.txt"])
    manifest, gpu = run_exporters(cfg, run, sft_plugin_manager, resolve_template(cfg, sft_plugin_manager))
    assert manifest.ok and manifest.details == {"template": "chatml"}
    listed = (run.export_dir("manifest") / "files.txt").read_text().split()
    assert "adapter_model.safetensors" in listed and "tokenizer_config.json" in listed
    assert run.read_summary()["exports"]["manifest"]["ok"]
    if not current_environment().cuda:  # refused before any work, with the plugin's reason
        assert not gpu.ok and "needs a CUDA GPU (test exporter)" in gpu.error
        assert not run.export_dir("needs_gpu").exists()


# -- register_backends ----------------------------------------------------------------------
class RecordingBackend(TrainingBackend):
    """transformers + PEFT written out in the test, recording that the trainer called it."""

    name = "recording"
    description = "records load/prepare calls"
    priority = -1  # never chosen by auto over the bundled ones

    def __init__(self) -> None:
        self.calls: list[str] = []

    def load(self, config: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        from sft.engine.models import load_tokenizer

        self.calls.append(f"load {config.model.name}")
        return AutoModelForCausalLM.from_pretrained(config.model.name, dtype=torch.float32), load_tokenizer(config.model)

    def prepare_for_training(self, model: Any, config: Any, new_token_rows: Any = ()) -> Any:
        from peft import LoraConfig, get_peft_model

        from sft.plugins.backends.common import lora_settings

        self.calls.append(f"prepare r={config.lora.r}")
        settings = {k: v for k, v in lora_settings(config).items() if v is not None}
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


class BackendPlugin:
    def __init__(self) -> None:
        self.backend = RecordingBackend()

    @hookimpl
    def register_backends(self, register):
        register(self.backend)


def test_hook_register_backends(sft_plugin_manager, tiny_model_dir, tmp_path: Path):
    plugin = BackendPlugin()
    sft_plugin_manager.register(plugin, "backend-plugin")
    run = train_tiny(tmp_path / "run", tiny_model_dir, "model.backend=recording")
    assert plugin.backend.calls == [f"load {tiny_model_dir}", "prepare r=4"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "recording" and summary["steps"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# -- register_publishers --------------------------------------------------------------------
class CountedBrackets(BracketTemplate):
    """The bracket template, counting how often a run resolves it (it should be once)."""

    name = "counted_brackets"
    configured = 0

    def configure(self, options: BracketOptions) -> "BracketTemplate":
        CountedBrackets.configured += 1
        return super().configure(options)


@dataclass
class ShelfOptions:
    shelf: str | None = opt(None, "Where the exports go; setting it turns the publisher on.")


class ShelfPublisher(Publisher):
    """Keeps every call; ``broken`` makes its publications fail."""

    name = "shelf"
    description = "records publications"
    options = ShelfOptions
    enabled_by = "shelf"

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.calls: list[tuple[str, Any]] = []

    def preflight(self, config: Any, exporters: Any, options: Any = None) -> list[str]:
        self.calls.append(("preflight", (Path(config.training.output_dir).exists(), [e.name for e in exporters])))
        return [] if options.shelf != "refused" else ["the shelf refuses"]

    def start(self, context: Any, options: Any = None) -> str:
        self.calls.append(("start", context.template.assistant.prefix))
        if options.shelf == "locked":
            raise SftError("the shelf is locked")
        return f"shelf:{options.shelf}"

    def publish(self, context: Any, exporter: Exporter, result: ExportResult, options: Any = None) -> dict[str, Any]:
        self.calls.append(("publish", (exporter.name, sorted(f.name for p in result.paths for f in Path(p).rglob("*")))))
        if self.broken:
            raise SftError("the shelf collapsed")
        return {"where": f"shelf:{options.shelf}/{exporter.name}"}


class PublisherPlugin:
    def __init__(self, broken: bool = False) -> None:
        self.publisher = ShelfPublisher(broken)

    @hookimpl
    def register_chat_templates(self, register):
        register(CountedBrackets())

    @hookimpl
    def register_publishers(self, register):
        register(self.publisher)


def test_hook_register_publishers(sft_plugin_manager, tiny_model_dir, tmp_path: Path):
    from sft.engine.export import publish_run

    plugin = PublisherPlugin()
    sft_plugin_manager.register(plugin, "publisher-plugin")
    CountedBrackets.configured = 0
    run = train_tiny(tmp_path / "run", tiny_model_dir, "export.enabled=[lora]", "publish.shelf.shelf=top",
                     "template.name=counted_brackets", "template.counted_brackets.answer_tag=<ANS>")
    # Checked before the run directory existed; started with the run's configured template; each export sent.
    assert [name for name, _ in plugin.publisher.calls] == ["preflight", "start", "publish"]
    assert plugin.publisher.calls[0][1] == (False, ["lora"]) and plugin.publisher.calls[1][1] == "<ANS>\n"
    assert "adapter_model.safetensors" in plugin.publisher.calls[2][1][1]
    published = json.loads((run / "summary.json").read_text())["publish"]["shelf"]
    assert published == {"target": "shelf:top", "exports": {"lora": {"where": "shelf:top/lora", "ok": True}}}
    # The run resolved its configured template once and handed it to data, training, the quick generation,
    # the export context and the publisher.
    assert CountedBrackets.configured == 1

    # sft publish sends the finished run again; a failure is recorded, never raised past the record.
    plugin.publisher.broken = True
    records = publish_run(run, "shelf", overrides=["publish.shelf.shelf=bottom"])
    assert records == {"lora": {"ok": False, "error": "the shelf collapsed"}}
    published = json.loads((run / "summary.json").read_text())["publish"]["shelf"]
    assert published["target"] == "shelf:bottom" and published["exports"]["lora"]["ok"] is False


def test_a_refused_publisher_stops_the_run_before_the_run_directory_exists(sft_plugin_manager, tiny_model_dir,
                                                                           tmp_path: Path):
    from sft.engine.run import run_training

    sft_plugin_manager.register(PublisherPlugin(), "publisher-plugin")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "export.enabled=[lora]", "publish.shelf.shelf=refused")
    with pytest.raises(SftError, match="training did not start.*\n  - shelf: the shelf refuses"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
    # sft validate runs the same preflight.
    from sft.testing import run_sft, tiny_overrides

    overrides = [*tiny_overrides(tmp_path / "run", tiny_model_dir), "export.enabled=[lora]"]
    result = run_sft("validate", *overrides, "publish.shelf.shelf=refused", check=False)
    assert result.exit_code == 1 and "shelf: the shelf refuses" in result.output
    result = run_sft("validate", *overrides, "publish.shelf.shelf=top")
    assert result.output.strip().endswith("exports OK: lora; publishers OK: shelf")


def test_a_publisher_that_cannot_start_loses_nothing_and_names_the_retry(sft_plugin_manager, tiny_model_dir,
                                                                         tmp_path: Path):
    from sft.testing import run_sft, tiny_overrides

    sft_plugin_manager.register(PublisherPlugin(), "publisher-plugin")
    out = tmp_path / "run"
    result = run_sft("run", *tiny_overrides(out, tiny_model_dir), "export.enabled=[lora]", "publish.shelf.shelf=locked",
                     check=False)
    assert result.exit_code == 1, result.output
    assert (out / "exports/lora/adapter_model.safetensors").is_file()  # the export is written all the same
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["exports"]["lora"]["ok"]
    assert summary["publish"]["shelf"] == {"error": "the shelf is locked"}
    assert f"Retry with: sft publish {out} --to shelf --exporter lora\n" in result.output

    # The retry, with the shelf open, sends what is on disk and the record stands corrected.
    result = run_sft("publish", out, "--to", "shelf", "publish.shelf.shelf=open")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["publish"]["shelf"] == {"target": "shelf:open",
                                           "exports": {"lora": {"where": "shelf:open/lora", "ok": True}}}
