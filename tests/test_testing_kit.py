"""The plugin test kit catches what it promises to catch: each assertion fails on a broken template."""

from __future__ import annotations

import pytest

from sft.core import Segment
from sft.testing import TINY_CONVERSATION, assert_exact_masking, run_sft, tiny_overrides, trained_spans
from sft.plugins.templates.chatml import ChatML


class EotNotTrained(ChatML):
    """The classic bug: the end-of-turn token is masked with the prompt, so the model never stops."""

    def render(self, messages, tokenizer=None):
        out = []
        for s in super().render(messages, tokenizer):
            if s.trained and s.text.endswith("<|im_end|>"):
                out += [Segment(s.text[: -len("<|im_end|>")], True), Segment("<|im_end|>", False)]
            else:
                out.append(s)
        return out


class NothingTrained(ChatML):
    def render(self, messages, tokenizer=None):
        return [Segment(s.text, False) for s in super().render(messages, tokenizer)]


class PromptTrained(ChatML):
    def render(self, messages, tokenizer=None):
        return [Segment(s.text, s.trained or "user" in s.text) for s in super().render(messages, tokenizer)]


class JinjaDrifts(ChatML):
    def jinja(self, tokenizer=None):
        return super().jinja(tokenizer).replace("<|im_start|>assistant", "<|im_start|>bot")


def test_a_correct_template_passes(tiny_tokenizer):
    assert_exact_masking(ChatML(), TINY_CONVERSATION, tiny_tokenizer)


@pytest.mark.parametrize(("template", "message"), [
    (EotNotTrained(), "the end-of-turn token '<|im_end|>' must be trained"),
    (NothingTrained(), "trains no token at all"),
    (PromptTrained(), "trained spans for 2 assistant turns"),
    (JinjaDrifts(), "jinja() renders differently"),
], ids=["eot-not-trained", "all-masked", "prompt-trained", "jinja-drift"])
def test_assert_exact_masking_catches(template, message, tiny_tokenizer):
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        assert_exact_masking(template, TINY_CONVERSATION, tiny_tokenizer)


def test_trained_spans_groups_runs_of_trained_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("a b c d e", add_special_tokens=False)["input_ids"]
    assert trained_spans(ids, [0, 1, 1, 0, 1], tiny_tokenizer) == [" b c", " e"]


def test_run_sft_reports_the_command_output_on_failure():
    assert "sft" in run_sft("--help").stdout
    result = run_sft("run", "training.max_stepz=1", check=False)
    assert result.exit_code == 2 and "did you mean 'max_steps'" in result.output
    with pytest.raises(pytest.fail.Exception, match="exited 2"):
        run_sft("run", "training.max_stepz=1")


def test_tiny_overrides_validate(tmp_path, sft_plugin_manager):
    # Every key the kit sets exists in the config schema (a renamed key would break every plugin's tests).
    from sft.engine.configuration import load_config

    cfg = load_config(overrides=tiny_overrides(tmp_path / "run", tmp_path / "model"))
    assert cfg.training.max_steps == 2 and list(cfg.export.enabled) == [] and list(cfg.loggers.enabled) == []
