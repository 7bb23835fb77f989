"""Tool calls and reasoning: read from the data, validated, rendered as each model's own template does, masked exactly.

The family tokenizers are SmolLM2's real tokenizer given the family's special tokens and its
*real* ``chat_template`` (tests/data/chat_templates/*.json, copied from the models' public
tokenizer_config.json), so ``apply_chat_template`` renders what Qwen2.5, Qwen3 and Llama 3.1
render.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.core.errors import DataError, SftError
from sft.core.formats import validate_conversation
from sft.core.interfaces import Conversation, Message, ToolCall
from sft.core.plugins import PluginManager
from sft.engine.render_check import render_difference
from sft.testing import (TINY_CONVERSATION, TOOL_CONVERSATIONS, TOOL_TOOLS, assert_exact_masking,
                              assert_renders_like, write_jsonl)
from sft.core.templating import as_messages

from datakit import FIXTURES, data_config, fresh_tokenizer

PM = PluginManager()
PM.load_entry_points(bundled_only=True)

FAMILIES = {"qwen2.5": "qwen", "qwen3": "qwen3", "llama3.1": "llama31"}
#: What each named template cannot render, by kit case (it refuses those rows with a clear error).
UNSUPPORTED = {
    "qwen": {"reasoning"}, "hermes": {"reasoning"}, "qwen3": set(),
    "llama31": {"reasoning", "parallel", "text_and_call"},
}


def family_tokenizer(model_dir: Path, family: str):
    """SmolLM2's tokenizer dressed as ``family``'s: its special tokens, bos/eos and real chat_template."""
    from tokenizers import AddedToken

    spec = json.loads((FIXTURES / "chat_templates" / f"{family}.json").read_text())
    tokenizer = fresh_tokenizer(model_dir)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec["added_special_tokens"]],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in spec["added_tokens"]])
    for key in ("bos_token", "eos_token", "pad_token"):
        setattr(tokenizer, key, spec[key])
    tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def _cases(template_name: str) -> list[str]:
    return [c for c in TOOL_CONVERSATIONS if c not in UNSUPPORTED[template_name]]


@pytest.mark.parametrize("family, template_name", [(f, t) for f, t in FAMILIES.items()] + [("qwen2.5", "hermes")])
def test_exact_masking_of_tool_calls_results_and_reasoning(family, template_name, tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, family)
    template = PM.get("chat_template", template_name)
    for case in _cases(template_name):
        for train_on in ("assistant", "assistant_no_reasoning"):
            assert_exact_masking(template, TOOL_CONVERSATIONS[case], tokenizer, tools=TOOL_TOOLS, train_on=train_on)
    assert_exact_masking(template, TINY_CONVERSATION, tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_template_masks_tools_exactly_with_each_real_template(family, tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, family)
    template = PM.get("chat_template", "tokenizer")
    for case in _cases(FAMILIES[family]):
        assert_exact_masking(template, TOOL_CONVERSATIONS[case], tokenizer, tools=TOOL_TOOLS)


@pytest.mark.parametrize("family", FAMILIES)
def test_named_and_tokenizer_templates_render_token_for_token_like_the_real_template(family, tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, family)
    cases = [(TOOL_CONVERSATIONS[c], TOOL_TOOLS) for c in _cases(FAMILIES[family])] + [(TINY_CONVERSATION, None)]
    for name in (FAMILIES[family], "tokenizer"):
        assert_renders_like(PM.get("chat_template", name), tokenizer, cases)
    assert PM.get("chat_template", FAMILIES[family]).jinja() == tokenizer.chat_template  # the shipped copy is the real one


def test_a_drifting_template_is_caught_with_the_first_differing_token(tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, "qwen2.5")
    diff = render_difference(PM.get("chat_template", "hermes"), tokenizer, tokenizer,
                             as_messages([Message("user", "Hi"), Message("assistant", "Hello")]))
    assert diff is not None and diff.token_index == 1  # Qwen2.5 adds its default system prompt; hermes does not
    assert "You are Qwen" in diff.model_context and "system" in diff.describe()
    with pytest.raises(AssertionError, match="first difference at token 1"):
        assert_renders_like(PM.get("chat_template", "chatml"), tokenizer, [TINY_CONVERSATION[1:]])


def test_qwen3_keeps_only_the_current_turns_thinking_and_writes_the_empty_block_where_qwen3_does(tiny_model_dir):
    tokenizer = family_tokenizer(tiny_model_dir, "qwen3")
    template = PM.get("chat_template", "qwen3")
    text = "".join(s.text for s in template.render(as_messages(TOOL_CONVERSATIONS["reasoning"], TOOL_TOOLS), tokenizer))
    assert "17 * 3 = 51." not in text  # before the last user question: dropped
    assert "<think>\nI need the weather tool.\n</think>\n\n<tool_call>" in text
    assert text.endswith("<think>\nThe tool says 10C.\n</think>\n\nIt is 10C in Bern.<|im_end|>\n")
    plain = "".join(s.text for s in template.render([Message(*m) for m in TINY_CONVERSATION], tokenizer))
    assert plain.count("<think>\n\n</think>\n\n") == 1 and plain.endswith("<think>\n\n</think>\n\nI'm Forge.\nMade by sft-forge.<|im_end|>\n")
    segments = template.render(as_messages(TOOL_CONVERSATIONS["reasoning"], TOOL_TOOLS), tokenizer)
    assert [s.text for s in segments if s.reasoning] == ["<think>\nI need the weather tool.\n</think>\n\n",
                                                         "<think>\nThe tool says 10C.\n</think>\n\n"]


@pytest.mark.parametrize("template_name, case, message", [
    ("llama31", "parallel", "single tool-calls"),
    ("llama31", "text_and_call", "changes the text of assistant turn 1 \\(it drops, moves or rewrites its text\\)"),
    ("qwen", "reasoning", "has no reasoning format"),
    ("chatml", "single", "has no format for tools"),
    ("llama3", "single", "has no format for tools"),
])
def test_templates_refuse_what_their_format_cannot_hold(template_name, case, message, tiny_tokenizer):
    with pytest.raises(Exception, match=message):
        PM.get("chat_template", template_name).render(as_messages(TOOL_CONVERSATIONS[case], TOOL_TOOLS), tiny_tokenizer)


def test_chatml_refuses_reasoning_instead_of_dropping_it(tiny_tokenizer):
    with pytest.raises(SftError, match="has no format for reasoning"):
        PM.get("chat_template", "chatml").render([Message("user", "q"), Message("assistant", "a", reasoning="r")],
                                                 tiny_tokenizer)


def _reasoning_row(content, reasoning=None):
    answer = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
    return {"messages": [{"role": "user", "content": "What is 17 * 3?"}, answer]}


@pytest.mark.parametrize("template_name", ["chatml", "qwen3"])
@pytest.mark.parametrize("row, reason", [
    (_reasoning_row("<think>17 * 3 = 51, or is it", None),
     "turn 1 (assistant): its content opens <think> and never closes it with </think>"),
    (_reasoning_row("<think>17 * 3 = 51.</think>51.", "17 * 3 = 51."),
     "turn 1 (assistant): reasoning twice, in its reasoning_content and as a <think> block in its content"),
])
def test_an_unclosed_or_doubled_think_block_is_a_located_bad_row_under_every_template(template_name, row, reason,
                                                                                       tiny_model_dir, tmp_path):
    """The same refusal whatever the template and data.train_on: such a row is never trained, nor trained half."""
    from sft.engine.data import build_datasets

    good = [_reasoning_row("51.") for _ in range(20)]
    path = write_jsonl(tmp_path / "reasoning.jsonl", [*good, row])
    prepared = build_datasets(data_config(tiny_model_dir, path, f"template.name={template_name}",
                                          "data.train_on=assistant_no_reasoning", "data.on_bad_row=skip"),
                              None, fresh_tokenizer(tiny_model_dir), quiet=True)
    assert prepared.stats["skipped"]["count"] == 1 and prepared.stats["train_rows"] == 20
    assert prepared.stats["skipped"]["examples"][0].startswith(f"{path}:21, row 20: {reason}")


@pytest.mark.parametrize("row", [_reasoning_row("51.", "17 * 3 = 51."), _reasoning_row("<think>17 * 3 = 51.</think>51.")])
def test_chatml_refuses_reasoning_from_either_source_alike(row, tiny_model_dir, tmp_path):
    """A reasoning_content field and an inline think block follow one policy: a template without a reasoning
    format refuses both (inline, chatml used to train it as text, even under assistant_no_reasoning)."""
    from sft.engine.data import build_datasets

    path = write_jsonl(tmp_path / "reasoning.jsonl", [_reasoning_row("51."), row])
    with pytest.raises(DataError, match=rf"^{path}:2, row 1: template 'chatml' cannot render this row: chat template "
                                        r"'chatml' has no format for reasoning \(a reasoning_content field or a <think>"):
        build_datasets(data_config(tiny_model_dir, path, "template.name=chatml"), None, fresh_tokenizer(tiny_model_dir))


@pytest.mark.parametrize("train_on", ["assistant", "assistant_no_reasoning"])
def test_think_blocks_written_in_the_answer_train_as_reasoning_content_does_on_qwen3(train_on, tiny_model_dir, tmp_path):
    """R1-style rows (`<think>...</think>` opening the answer, however spaced) prepare to the same tokens and masks
    as the same rows with a reasoning_content field: none is refused, and assistant_no_reasoning leaves the
    block untrained in both."""
    from sft.engine.data import build_datasets

    reasons = [f"{n} * 3 = {3 * n}, so the answer is {3 * n}." for n in range(12)]
    fields = [_reasoning_row(f"{3 * n}.", r) for n, r in enumerate(reasons)]
    inline = [_reasoning_row(f"<think>{r}</think>{3 * n}." if n % 2 else f"<think>\n{r}\n</think>\n\n{3 * n}.")
              for n, r in enumerate(reasons)]
    prepared = [build_datasets(data_config(tiny_model_dir, write_jsonl(tmp_path / f"{name}.jsonl", rows),
                                           "template.name=qwen3", f"data.train_on={train_on}", "data.test_size=0"),
                               None, fresh_tokenizer(tiny_model_dir), quiet=True)
                for name, rows in (("fields", fields), ("inline", inline))]
    assert [p.stats["train_rows"] for p in prepared] == [12, 12]
    assert prepared[1].train["input_ids"] == prepared[0].train["input_ids"]
    assert prepared[1].train["assistant_masks"] == prepared[0].train["assistant_masks"]
    tokenizer = fresh_tokenizer(tiny_model_dir)
    row = prepared[1].train[0]
    trained = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    assert ("so the answer is" in trained) == (train_on == "assistant")


# -- data ---------------------------------------------------------------------------------
def test_messages_format_reads_the_openai_tool_schema():
    fmt = PM.get("dataset_format", "messages")
    row = {"tools": json.dumps([{"name": "get_time", "parameters": {"type": "object"}}]), "messages": [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "get_time", "arguments": "{\"city\": \"Oslo\"}"}},
            {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "x", "content": "09:30"},
        {"role": "tool", "name": "get_time", "content": "10:30"},
        {"role": "assistant", "content": "Oslo 09:30, Rome 10:30."}]}
    conversation = fmt.to_conversation(row)
    assert isinstance(conversation, Conversation)
    assert conversation.tools == [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    assert conversation[1] == Message("assistant", "", reasoning="Use the tool.", tool_calls=(
        ToolCall("get_time", {"city": "Oslo"}, "x"), ToolCall("get_time", {"city": "Rome"})))
    assert conversation[2].tool_call_id == "x" and conversation[3].name == "get_time"
    assert conversation[1:].tools == conversation.tools  # slices keep the tools
    assert validate_conversation(conversation) == []


def test_sharegpt_reads_function_call_and_observation_turns():
    fmt = PM.get("dataset_format", "sharegpt")
    row = {"tools": '[{"name": "get_time", "description": "d", "parameters": {}}]', "conversations": [
        {"from": "human", "value": "Time in Oslo?"},
        {"from": "gpt", "value": "Checking."},
        {"from": "function_call", "value": '{"name": "get_time", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": "09:30"},
        {"from": "gpt", "value": "09:30."}]}
    conversation = fmt.to_conversation(row)
    assert [m.role for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[1] == Message("assistant", "Checking.", tool_calls=(ToolCall("get_time", {"city": "Oslo"}),))
    assert conversation.tools[0]["function"]["name"] == "get_time"
    assert validate_conversation(conversation) == []


def _call_row(arguments, tool_turn=None, tools=None, reasoning_on=None):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                tool_turn or {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                {"role": "assistant", "content": "18C."}]
    if reasoning_on is not None:
        messages[reasoning_on]["reasoning_content"] = "thinking"
    return {"messages": messages, **({"tools": tools} if tools else {})}


@pytest.mark.parametrize("row, message", [
    (_call_row('{"city": "Paris"'), r"field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': tool-call arguments "
                                    r"are not valid JSON"),
    (_call_row('["Paris"]'), "tool-call arguments must be a JSON object, got list"),
    (_call_row({"city": "Paris"}, {"role": "tool", "tool_call_id": "zz", "content": "18C"}),
     "turn 2: a tool result with no matching call: tool_call_id 'zz'"),
    (_call_row({"city": "Paris"}, reasoning_on=0), r"turn 0 \(user\): reasoning on a user turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "ok"}]}, "turn 1: a tool result with no matching call"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "x"}]}, "tool call\\(s\\) f have no result"),
])
def test_bad_tool_rows_name_file_line_and_what_is_wrong(row, message, tiny_model_dir, tmp_path):
    from sft.engine.data import build_datasets

    path = write_jsonl(tmp_path / "tools.jsonl", [_call_row({"city": "Paris"}), row])
    with pytest.raises(DataError, match=rf"^{path}:2, row 1.*{message}"):
        build_datasets(data_config(tiny_model_dir, path, "template.name=hermes"), None, fresh_tokenizer(tiny_model_dir))


def test_a_call_of_an_undeclared_tool_warns_with_the_location_and_trains(tiny_model_dir, tmp_path, capsys):
    from sft.engine.data import build_datasets

    tools = [{"type": "function", "function": {"name": "get_wether", "parameters": {}}}]
    path = write_jsonl(tmp_path / "tools.jsonl", [_call_row({"city": "Paris"}, tools=tools)] * 2)
    prepared = build_datasets(data_config(tiny_model_dir, path, "template.name=hermes", "data.test_size=0"), None,
                              fresh_tokenizer(tiny_model_dir))
    err = capsys.readouterr().err
    assert f"{path}:1, row 0: turn 1: calls tool 'get_weather', which the row's tools do not declare" in err
    assert "did you mean 'get_wether'" in err and prepared.stats["train_rows"] == 2


def test_tool_conversations_survive_the_data_cache(tiny_model_dir, tmp_path):
    from sft.engine.data import build_datasets

    path = write_jsonl(tmp_path / "tools.jsonl", [_call_row({"city": "Paris"}, tools=list(TOOL_TOOLS))] * 3)
    cfg = data_config(tiny_model_dir, path, "template.name=hermes", "data.test_size=0", f"data.cache_dir={tmp_path / 'c'}")
    first = build_datasets(cfg, None, fresh_tokenizer(tiny_model_dir))
    again = build_datasets(cfg, None, fresh_tokenizer(tiny_model_dir))
    assert again.stats["cache"] == "hit" and again.train_conversations == first.train_conversations
    assert again.train_conversations[0].tools == list(TOOL_TOOLS)


# -- export -------------------------------------------------------------------------------
def _go_data(messages, tools):
    from gotemplate import GoJSON

    system = next((m.content for m in messages if m.role == "system"), "")
    return {"System": system, "Tools": [GoJSON(t) for t in tools],
            "Messages": [{"Role": m.role, "Content": m.content, "Thinking": m.reasoning or "", "ToolCalls": [
                {"Function": {"Name": c.name, "Arguments": GoJSON(c.arguments)}} for c in m.tool_calls]}
                for m in messages if m.role != "system"]}


def _canonical_json(text: str) -> str:
    """``text`` with every JSON object in it rewritten canonically (sorted keys, no spaces or indents)."""
    from gotemplate import go_json

    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] == "{":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                pass
            else:
                out.append(go_json(value))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


@pytest.mark.parametrize("template_name, family", [("qwen", "qwen2.5"), ("qwen3", "qwen3"), ("hermes", "qwen2.5"),
                                                   ("llama31", "llama3.1")])
def test_ollama_template_renders_tool_calls_and_results_like_training(template_name, family, tiny_model_dir):
    """The Modelfile TEMPLATE gives the generation prompt training used, tools and calls included.

    Ollama prints JSON compactly (Go's json.Marshal) where Jinja's tojson puts spaces (and
    Llama 3.1 indents tool specs), so JSON objects are compared canonically; all the other
    text must match character for character.
    """
    from gotemplate import render_go_template

    tokenizer = family_tokenizer(tiny_model_dir, family)
    template = PM.get("chat_template", template_name)
    go = template.ollama_template(tokenizer)
    for case in [*_cases(template_name), None]:
        tools = TOOL_TOOLS if case else None
        conversation = as_messages(TOOL_CONVERSATIONS[case], tools) if case else [Message(*m) for m in TINY_CONVERSATION]
        for i, m in enumerate(conversation):
            if m.role != "assistant":
                continue
            prompt = template.generation_prompt(conversation[:i], tokenizer).removeprefix(tokenizer.bos_token or "")
            rendered = render_go_template(go, _go_data(conversation[:i], list(tools or ())))
            assert _canonical_json(rendered) == _canonical_json(prompt), (
                f"{template_name} {case} turn {i}:\n{rendered!r}\n{prompt!r}")


# -- end to end ---------------------------------------------------------------------------
TOOL_DATA = FIXTURES / "tools" / "weather.jsonl"
TOOL_SPECS = FIXTURES / "tools" / "weather_tools.json"
HELD_BACK = "What's the weather in Madrid?"  # no training row asks about Madrid


def _parse_tool_call(text: str) -> dict:
    """The one ``<tool_call>`` JSON block of a Hermes-style answer, parsed (AssertionError when there is none)."""
    import re

    found = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S)
    assert found, f"no <tool_call> block in {text!r}"
    call = json.loads(found.group(1))
    assert call["name"] == "get_weather" and isinstance(call["arguments"], dict) and "city" in call["arguments"], call
    return call


@pytest.fixture(scope="module")
def tool_run(tiny_model_dir, tmp_path_factory):
    """The tiny Llama fully fine-tuned on the weather tool set with ``hermes``, long enough to learn the call format.

    At a rate of 1e-2 for 60 steps the call came out malformed on one CI machine and well formed on
    another (the CPUs' float rounding took the runs apart); 5e-3 for 100 steps gave a valid call for
    each of 7 seeds tried, so the test measures learning, not one lucky trajectory."""
    from sft.testing import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tools") / "run", tiny_model_dir, "template.name=hermes",
                      "model.method=full", "training.learning_rate=5e-3", "training.lr_scheduler_type=constant", "data.test_size=0",
                      "model.max_seq_length=320", "training.per_device_train_batch_size=4",
                      "training.generation_max_new_tokens=40", dataset=TOOL_DATA, steps=100)


def test_trained_model_calls_the_tool_in_sft_generate_and_in_the_exported_gguf(tool_run):
    from sft.testing import run_sft

    result = run_sft("generate", tool_run, HELD_BACK, "--tools", TOOL_SPECS, "--max-new-tokens", "40")
    _parse_tool_call(result.output)

    run_sft("export", tool_run, "--exporter", "gguf", "export.gguf.quants=[f16]", "export.gguf.name=tools",
            "export.verify=false")
    gguf = tool_run / "exports" / "gguf" / "tools-F16.gguf"
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=512, verbose=False)
    # llama.cpp renders the GGUF's own chat_template (the hermes Jinja, tools included).
    assert "<tool_call>" in llm.metadata["tokenizer.chat_template"]
    reply = llm.create_chat_completion([{"role": "user", "content": HELD_BACK}], tools=json.loads(TOOL_SPECS.read_text()),
                                       temperature=0.0, max_tokens=40)
    _parse_tool_call(reply["choices"][0]["message"]["content"])
    modelfile = (tool_run / "exports" / "gguf" / "tools-F16.Modelfile").read_text()
    assert ".ToolCalls" in modelfile and ".Tools" in modelfile and "<tool_response>" in modelfile


def test_check_template_reports_rows_that_differ_from_the_models_own_template(tiny_model_dir, tmp_path):
    from sft.testing import run_sft

    same = run_sft("preview", "--check-template", f"model.name={tiny_model_dir}", f"data.dataset={FIXTURES / 'messages.jsonl'}",
                   "template.name=tokenizer", "data.cache_dir='off'")
    assert "exactly as the chat_template" in same.output
    differ = run_sft("preview", "--check-template", f"model.name={tiny_model_dir}", f"data.dataset={TOOL_DATA}",
                     "template.name=hermes", "data.cache_dir='off'", check=False)
    assert differ.exit_code == 1, differ.output
    assert "rows differ from the chat_template" in differ.output and "first difference at token" in differ.output
