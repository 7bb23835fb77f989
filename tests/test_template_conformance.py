"""Conformance of the ``tokenizer`` template with real published chat templates.

Each model's real ``chat_template`` (llama.cpp's ``models/templates/*.jinja`` and TRL's
``trl/chat_templates/`` originals, in the shared peer data; see its SOURCES.md) is rendered
for a set of conversations through the ``tokenizer`` template, on a small tokenizer with the
model's marker tokens added as the model declares them (special or not, its eos and bos).
For every conversation:

- the text is what transformers' ``apply_chat_template`` renders with that template;
- each assistant turn is one trained span holding what the turn says (text, tool calls, and its
  reasoning where the template keeps it) and ending with what closes the turn; no tool result
  and no user question is trained;
- where TRL ships a ``{% generation %}`` training version that renders the same text, each
  trained span is that turn's generation span, less the generation prompt's header at its start
  and whitespace after its end (TRL trains ``<|im_start|>assistant`` in gpt-oss and the newline
  after ``<|im_end|>``; a model never writes those);
- under ``data.train_on: assistant_no_reasoning`` no reasoning token is trained, whatever the
  template's shape (a think block, one the generation prompt opened, a channel), and the answers
  still are.

What a template cannot render is an expected refusal, named in ``REFUSED`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sft.core.errors import SftError
from sft.core.plugins import get_plugin_manager
from sft.core.templating import as_messages, chat_dicts, encode_rendered, segments_text

from datakit import SHARED, fresh_tokenizer

TEMPLATES = SHARED / "peerdata" / "templates"
pytestmark = pytest.mark.skipif(not TEMPLATES.is_dir(), reason="the shared peer data (real chat templates) is absent")

PM = get_plugin_manager()
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
QWEN = (*CHATML, "+<think>", "+</think>", "+<tool_call>", "+</tool_call>", "+<tool_response>", "+</tool_response>")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
          "<|python_tag|>")
GEMMA = ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>")
COHERE = ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
          "<|SYSTEM_TOKEN|>")
MISTRAL = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class Model:
    """A model's real chat_template and its marker tokens (``+x``: an added token that is not special)."""

    source: str  # path under the peer data's templates/
    tokens: tuple[str, ...]
    eos: str
    bos: str | None = None
    training: str | None = None  # TRL's {% generation %} version, under templates/trl/
    #: What closes an assistant turn, as the model's card and generation config say (default: eos).
    closes: tuple[str, ...] = ()


MODELS = {
    "qwen2.5": Model("llamacpp/Qwen-Qwen2.5-7B-Instruct.jinja", QWEN, "<|im_end|>", training="qwen2_5_training"),
    "qwen3": Model("llamacpp/Qwen-Qwen3-0.6B.jinja", QWEN, "<|im_end|>", training="qwen3_training"),
    "qwen3.5": Model("llamacpp/Qwen3.5-4B.jinja", QWEN, "<|im_end|>"),
    "qwen3.5-think": Model("trl/qwen3_5_think.jinja", QWEN, "<|im_end|>", training="qwen3_5_think_training"),
    "qwen3.6": Model("trl/qwen3_6.jinja", QWEN, "<|im_end|>", training="qwen3_6_training"),
    "qwen3.8": Model("trl/qwen3_8.jinja", QWEN, "<|im_end|>", training="qwen3_8_training"),
    "qwq": Model("llamacpp/Qwen-QwQ-32B.jinja", QWEN, "<|im_end|>"),
    "r1-distill-qwen": Model("llamacpp/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                             ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                              "+<think>", "+</think>"), "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>",
                             training="deepseek_r1_distill_training"),
    "nemotron3": Model("llamacpp/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja", (*CHATML, "<think>", "</think>"),
                       "<|im_end|>", training="nemotron_3_nano_training"),
    "gpt-oss": Model("llamacpp/openai-gpt-oss-120b.jinja",
                     ("<|startoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
                      "<|constrain|>"), "<|return|>", training="gptoss_training",
                     closes=("<|return|>", "<|end|>", "<|call|>")),
    "llama3.0": Model("trl/llama3.jinja", LLAMA3, "<|eot_id|>", "<|begin_of_text|>", training="llama3_training"),
    "llama3.1": Model("llamacpp/meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3, "<|eot_id|>", "<|begin_of_text|>",
                      closes=("<|eot_id|>", "<|eom_id|>")),
    "llama3.2": Model("llamacpp/meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3, "<|eot_id|>", "<|begin_of_text|>",
                      closes=("<|eot_id|>", "<|eom_id|>")),
    "llama3.3": Model("llamacpp/meta-llama-Llama-3.3-70B-Instruct.jinja", LLAMA3, "<|eot_id|>", "<|begin_of_text|>",
                      closes=("<|eot_id|>", "<|eom_id|>")),
    "gemma2": Model("llamacpp/google-gemma-2-2b-it.jinja", GEMMA, "<eos>", "<bos>", training="gemma_training",
                    closes=("<end_of_turn>",)),
    "gemma3": Model("trl/gemma3.jinja", GEMMA, "<eos>", "<bos>", training="gemma3_training", closes=("<end_of_turn>",)),
    "gemma4": Model("llamacpp/google-gemma-4-31B-it.jinja",
                    ("<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>",
                     "<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", '<|"|>', "<|think|>"),
                    # A call turn hands over with <|tool_response>: the template ends a conversation cut
                    # after a call with it, where the application writes the response.
                    "<turn|>", "<bos>", closes=("<turn|>", "<|tool_response>")),
    "phi3.5": Model("llamacpp/microsoft-Phi-3.5-mini-instruct.jinja",
                    ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"), "<|endoftext|>",
                    training="phi3_5_training", closes=("<|end|>",)),
    "phi4": Model("other/microsoft-phi-4.jinja", ("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"),
                  "<|im_end|>"),
    "granite3.3": Model("llamacpp/ibm-granite-granite-3.3-2B-Instruct.jinja",
                        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"), "<|end_of_text|>"),
    "lfm2": Model("trl/lfm2.jinja", ("<|startoftext|>", *CHATML[:2], "<|tool_list_start|>", "<|tool_list_end|>",
                                     "<|tool_response_start|>", "<|tool_response_end|>", "<|tool_call_start|>",
                                     "<|tool_call_end|>"), "<|im_end|>", "<|startoftext|>",
                  training="lfm2_training"),
    "command-r7b": Model("trl/cohere2.jinja", (*COHERE, "<|START_RESPONSE|>", "<|END_RESPONSE|>"),
                         "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>", training="cohere2_training"),
    "hermes3-tool_use": Model("llamacpp/NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
                              ("<|begin_of_text|>", *CHATML[:2], "+<tool_call>", "+</tool_call>", "+<tool_response>",
                               "+</tool_response>"), "<|im_end|>", "<|begin_of_text|>"),
    "command-r-plus-tool_use": Model("llamacpp/CohereForAI-c4ai-command-r-plus-tool_use.jinja", COHERE,
                                     "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>"),
    "command-r7b-tool_use": Model("llamacpp/CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
                                  (*COHERE, "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>",
                                   "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>",
                                   "<|END_TOOL_RESULT|>"), "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>"),
    "mistral-v0.3": Model("other/mistralai-Mistral-7B-Instruct-v0.3.jinja", MISTRAL, "</s>", "<s>"),
    "mistral-small-3.2": Model("llamacpp/Mistral-Small-3.2-24B-Instruct-2506.jinja",
                               (*MISTRAL, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]"), "</s>", "<s>"),
    "devstral": Model("llamacpp/unsloth-mistral-Devstral-Small-2507.jinja",
                      (*MISTRAL, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[ARGS]"), "</s>", "<s>"),
    "mistral-nemo": Model("llamacpp/mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL, "</s>", "<s>"),
}

CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TIME = {"id": "call00002", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n} of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for n in ("get_weather", "get_time")]
Q1 = {"role": "user", "content": "Who are you and what do you do?"}
A1 = {"role": "assistant", "content": "I am Forge, a helpful assistant."}
Q2 = {"role": "user", "content": "Say it again, please, in two lines."}
A2 = {"role": "assistant", "content": "I am Forge.\nA helpful assistant."}
QW = {"role": "user", "content": "What is the weather like in Paris today?"}
CASES = {
    "single": [Q1, A1],
    "multi_turn": [Q1, A1, Q2, A2],
    "system_multi_turn": [{"role": "system", "content": "You are Forge, made by sft."}, Q1, A1, Q2, A2],
    "tool_call": [QW, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18C and sunny"},
                  {"role": "assistant", "content": "It is sunny in Paris, 18 degrees."}],
    "parallel_calls_with_text": [
        QW, {"role": "assistant", "content": "Let me check both.", "tool_calls": [CALL, TIME]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "call00002", "name": "get_time", "content": "09:30 local time"},
        {"role": "assistant", "content": "Sunny and 18 degrees; the time there is half past nine."}],
    "reasoning": [Q1, {**A1, "reasoning_content": "The user asks who I am. I should introduce myself."}],
    "multi_turn_reasoning": [Q1, {**A1, "reasoning_content": "The user asks who I am. I should introduce myself."},
                             Q2, {**A2, "reasoning_content": "They want it repeated on two lines."}],
    "reasoning_tools_then_question": [
        QW, {"role": "assistant", "content": "", "tool_calls": [CALL],
             "reasoning_content": "I need the weather tool for this."},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "18C and sunny"},
        {"role": "assistant", "content": "It is sunny in Paris, 18 degrees.",
         "reasoning_content": "The tool answered; now I can reply."},
        Q2, {**A2, "reasoning_content": "They want it repeated on two lines."}],
}

#: (model, case) -> what the refusal says: what the model's own template cannot render.
#: The models whose template writes reasoning; the others' refuse rows with reasoning rather than drop it.
#: QwQ's and DeepSeek-R1-Distill's templates cut everything up to </think> out of every assistant turn.
REASONING = {"qwen3", "qwen3.5", "qwen3.5-think", "qwen3.6", "qwen3.8", "nemotron3", "gpt-oss",
             "command-r7b-tool_use"}
REFUSED: dict[tuple[str, str], str] = {
    **{(m, c): "renders no reasoning" for m in MODELS if m not in REASONING for c in CASES if "reasoning" in c},
    # Gemma 4 writes reasoning only on a tool call after the last question.
    ("gemma4", "reasoning_tools_then_question"): "renders no reasoning",
    ("mistral-nemo", "parallel_calls_with_text"): "moves or rewrites its text",
    ("hermes3-tool_use", "parallel_calls_with_text"): "moves or rewrites its text",
    ("mistral-v0.3", "parallel_calls_with_text"): "moves or rewrites its text",
    ("mistral-small-3.2", "parallel_calls_with_text"): "moves or rewrites its text",
    # Command R7B writes reasoning only as the plan of a tool call.
    ("command-r7b-tool_use", "reasoning"): "renders no reasoning",
    ("command-r7b-tool_use", "multi_turn_reasoning"): "renders no reasoning",
    ("command-r7b-tool_use", "parallel_calls_with_text"): "moves or rewrites its text",
    # A tool_use template (Hermes 2 Pro/3, Command R+) renders only rows with tools; Command R+'s
    # reads Cohere's own tool schema (parameter_definitions), not OpenAI's.
    **{(m, c): "renders only conversations with tools" for m in ("hermes3-tool_use", "command-r-plus-tool_use")
       for c in CASES if not any("tool_calls" in t for t in CASES[c])},
    **{("command-r-plus-tool_use", c): "has no attribute 'description'" for c in CASES
       if any("tool_calls" in t for t in CASES[c])},
    # gpt-oss's and Llama 3.1's templates write one call per assistant turn (gpt-oss drops the rest).
    ("gpt-oss", "parallel_calls_with_text"): "its call of 'get_time'",
    ("llama3.1", "parallel_calls_with_text"): "only supports single tool-calls",
    ("llama3.2", "parallel_calls_with_text"): "only supports single tool-calls",
    ("llama3.3", "parallel_calls_with_text"): "only supports single tool-calls",
    # Gemma 4 writes the tool responses inside the model turn, before the turn's text.
    ("gemma4", "parallel_calls_with_text"): "writes the tool message 2 inside assistant turn 1",
    # No system role (Gemma 2), no tool role (Gemma 2/3, Command R7B's default template).
    ("gemma2", "system_multi_turn"): "System role not supported",
    # Mistral's Jinja writes the system prompt only before a final user turn (the named mistral-v3
    # and mistral-nemo train it, below).
    ("mistral-v0.3", "system_multi_turn"): "leaves out system message 0",
    ("mistral-nemo", "system_multi_turn"): "leaves out system message 0",
    **{(m, c): "roles must alternate" for m in ("gemma2", "gemma3", "command-r7b")
       for c in ("tool_call", "parallel_calls_with_text", "reasoning_tools_then_question")},
    # Templates that never write message.tool_calls (LFM2 expects them inside the content).
    **{(m, c): "its call of 'get_weather'" for m in ("llama3.0", "phi3.5", "phi4", "granite3.3", "lfm2")
       for c in ("tool_call", "parallel_calls_with_text", "reasoning_tools_then_question")},
}


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(smollm2_dir, name: str):
    """One tokenizer per model for the whole module (rendering never changes it)."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = _model_tokenizer(smollm2_dir, MODELS[name])
    return _TOKENIZERS[name]


def _model_tokenizer(smollm2_dir, model: Model):
    tokenizer = fresh_tokenizer(smollm2_dir)
    special = [t for t in model.tokens if not t.startswith("+")]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.add_tokens([t[1:] for t in model.tokens if t.startswith("+")])
    tokenizer.eos_token = model.eos
    if model.bos:
        tokenizer.bos_token = model.bos
    tokenizer.chat_template = (TEMPLATES / model.source).read_text()
    return tokenizer


def _trained_spans(segments) -> list[tuple[int, int]]:
    """Character spans of the trained text (adjacent trained segments joined)."""
    spans: list[list[int]] = []
    pos = 0
    for s in segments:
        end = pos + len(s.text)
        if s.trained:
            if spans and spans[-1][1] == pos:
                spans[-1][1] = end
            else:
                spans.append([pos, end])
        pos = end
    return [(a, b) for a, b in spans]


def _generation_spans(model: Model, messages, reasoning_key: str, text: str) -> list[tuple[int, int]] | None:
    """TRL's {% generation %} spans of the conversation, when its training template renders the same text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if model.training is None:
        return None
    source = (TEMPLATES / "trl" / f"{model.training}.jinja").read_text()
    tools = [t for t in TOOLS] if any(m.tool_calls for m in messages) else None
    rendered, indices = render_jinja_template([chat_dicts(messages, reasoning_key)], tools=tools, chat_template=source,
                                              return_assistant_tokens_mask=True, bos_token=model.bos or "",
                                              eos_token=model.eos)
    if rendered[0] != text:
        return None
    merged: list[tuple[int, int]] = []
    for a, b in indices[0]:  # Phi-3.5's training template marks the trailing eos as a span of its own
        merged[-1:] = [(merged[-1][0], b)] if merged and merged[-1][1] == a else [*merged[-1:], (a, b)]
    return merged


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_tokenizer_template_trains_what_the_models_template_renders(model_name, case, smollm2_dir):
    from transformers.utils.chat_template_utils import render_jinja_template

    from sft.core.templating import rendered_reasoning_key

    model = MODELS[model_name]
    tokenizer = _tokenizer(smollm2_dir, model_name)
    template = PM.get("chat_template", "tokenizer")
    has_tools = any("tool_calls" in m for m in CASES[case])
    messages = as_messages(CASES[case], TOOLS if has_tools else None)
    try:
        segments = template.render(messages, tokenizer)
    except SftError as e:
        why = REFUSED.get((model_name, case))
        assert why is not None, f"{model_name} refuses {case}: {e}"
        assert why in str(e)
        return
    assert (model_name, case) not in REFUSED, f"{model_name} renders {case}, which it was expected to refuse"
    text = segments_text(segments)
    key = rendered_reasoning_key(tokenizer)
    [own], _ = render_jinja_template([chat_dicts(messages, key)], tools=TOOLS if has_tools else None,
                                     chat_template=(TEMPLATES / model.source).read_text(),
                                     bos_token=model.bos or "", eos_token=model.eos)
    assert text == own, "the trained text is not what the model's own template renders"

    ends = template._probe_ends(tokenizer)
    spans = _trained_spans(segments)
    turns = [m for m in messages if m.role == "assistant"]
    assert len(spans) == len(turns), f"{len(spans)} trained spans for {len(turns)} assistant turns: {spans}"
    trained = "".join(text[a:b] for a, b in spans)
    said = "".join(m.content + (m.reasoning or "") for m in turns)
    for (a, b), m in zip(spans, turns):
        span = text[a:b]
        assert m.content.strip() in span
        assert all(c.name in span for c in m.tool_calls)
        if m.reasoning and m.reasoning.strip() in text:
            assert m.reasoning.strip() in span, "the turn's reasoning is rendered outside its span"
        assert any(span.endswith(e) for e in model.closes or (model.eos,)), f"{span!r} is not closed as the model closes a turn"
        assert any(span.endswith(e) for e in ends) or m.tool_calls, f"{span!r} does not end with one of {ends}"
    for m in messages:
        if m.role in ("user", "tool", "system") and m.content.strip() not in said:
            assert m.content.strip() not in trained, f"the {m.role} message {m.content!r} is trained"

    generation = _generation_spans(model, messages, key, text)
    if generation is not None:
        assert len(generation) == len(spans), f"TRL's spans {generation} for sft's {spans}"
        starts = [i for i, m in enumerate(messages) if m.role == "assistant"]
        for (a, b), (ga, gb), i in zip(spans, generation, starts):
            # TRL's span may start earlier, inside the header the generation prompt writes (gpt-oss's
            # <|start|>assistant, Qwen's newline), and run on over whitespace after the turn's end, and
            # over the eos Phi-3 writes after the last turn (generation stops at <|end|> before it).
            assert ga <= a and gb >= b and text[b:gb].strip() in ("", model.eos), (text[a:b], text[ga:gb])
            prompt = template.generation_prompt(messages[:i], tokenizer)
            history = tokenizer.apply_chat_template(chat_dicts(messages[:i], key), tools=TOOLS if has_tools else None,
                                                    tokenize=False) if i else ""
            header = prompt[next((k for k, (x, y) in enumerate(zip(history, prompt)) if x != y), len(history)):]
            assert text[ga:a] in header, f"TRL trains {text[ga:a]!r}, not in the prompt's {header!r}, before {text[a:b]!r}"

    if any(m.reasoning and m.reasoning.strip() in text for m in turns):
        [(ids, mask)] = encode_rendered(tokenizer, [segments], "assistant_no_reasoning")
        kept = tokenizer.decode([t for t, k in zip(ids, mask) if k], skip_special_tokens=False)
        for m in turns:
            if m.reasoning:
                assert m.reasoning.strip() not in kept, "reasoning is trained under assistant_no_reasoning"
            assert m.content.strip() in kept


#: Bundled templates that ship a model's real chat_template, and that model here.
BUNDLED = {"qwen": "qwen2.5", "qwen3": "qwen3", "mistral-v3": "mistral-v0.3", "mistral-nemo": "mistral-nemo",
           "llama31": "llama3.2"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bundled", list(BUNDLED))
def test_bundled_template_trains_what_the_tokenizer_template_trains_on_the_models_own(bundled, case, smollm2_dir):
    """The named template and ``tokenizer`` on the model's real template: the same segments, or both refuse.

    The named ``qwen3`` trains an exchange with tool calls and reasoning followed by another
    question (LLaMA-Factory's reason_tool_use rows): its earlier turns lose their reasoning and train.
    """
    tokenizer = _tokenizer(smollm2_dir, BUNDLED[bundled])
    has_tools = any("tool_calls" in m for m in CASES[case])
    messages = as_messages(CASES[case], TOOLS if has_tools else None)
    try:
        own = PM.get("chat_template", "tokenizer").render(messages, tokenizer)
    except SftError as e:
        if "leaves out system message" in str(e) and bundled.startswith("mistral"):
            return  # the named template trains it: test_named_mistral_variants_train_the_system_prompt_as_served
        with pytest.raises(SftError):
            PM.get("chat_template", bundled).render(messages, tokenizer)
        return
    named = PM.get("chat_template", bundled).render(messages, tokenizer)
    assert [(s.text, s.trained, s.reasoning) for s in named] == [(s.text, s.trained, s.reasoning) for s in own]


@pytest.mark.parametrize("model_name, shape", [
    ("qwen3", "a <think> block in the turn"),
    ("qwen3.5", "a <think> block the generation prompt opened"),
    ("nemotron3", "a <think> block the generation prompt opened, closed without a newline"),
    ("gpt-oss", "an analysis channel message before the final one"),
])
def test_reasoning_is_untrained_under_assistant_no_reasoning_whatever_its_shape(model_name, shape, smollm2_dir):
    tokenizer = _tokenizer(smollm2_dir, model_name)
    messages = as_messages(CASES["multi_turn_reasoning"])
    segments = PM.get("chat_template", "tokenizer").render(messages, tokenizer)
    last = messages[-1]

    def trained(train_on: str) -> str:
        [(ids, mask)] = encode_rendered(tokenizer, [segments], train_on)
        return tokenizer.decode([t for t, k in zip(ids, mask) if k], skip_special_tokens=False)

    assert last.reasoning in trained("assistant"), shape
    without = trained("assistant_no_reasoning")
    assert last.reasoning not in without and last.content in without, shape
    # Nothing of the reasoning's wrapping stays trained either (a think block, an analysis channel).
    assert "think" not in without and "analysis" not in without, without


def _inline(conversation: list[dict], written: str) -> list[dict]:
    """``conversation`` with each reasoning_content moved into its answer as a think block, ``written`` so."""
    return [{k: v for k, v in turn.items() if k != "reasoning_content"}
            | {"content": written.format(turn["reasoning_content"], turn["content"])}
            if "reasoning_content" in turn else turn for turn in conversation]


@pytest.mark.parametrize("written", ["<think>\n{}\n</think>\n\n{}", "<think>{}</think>{}", "\n<think> {} </think>\n{}"])
@pytest.mark.parametrize("case", ["reasoning", "multi_turn_reasoning", "reasoning_tools_then_question"])
@pytest.mark.parametrize("model_name, template_name", [
    ("qwen3", "tokenizer"), ("qwen3", "qwen3"), ("qwen3.5", "tokenizer"), ("qwen3.6", "tokenizer"),
    ("qwen3.8", "tokenizer"), ("nemotron3", "tokenizer"), ("gpt-oss", "tokenizer")])
def test_an_answers_think_block_trains_as_a_reasoning_field_does(model_name, template_name, case, written, smollm2_dir):
    """DeepSeek-R1's way of writing reasoning (a think block opening the answer, with or without newlines)
    trains what a reasoning_content field trains wherever the template has a reasoning format: Qwen3
    rebuilds the block with its newlines and drops it from earlier turns, TRL's Qwen3.8 and Nemotron 3
    would otherwise write it as text after an empty block of their own, gpt-oss as text in its final
    message instead of its analysis one. Reasoning segments included."""
    tokenizer = _tokenizer(smollm2_dir, model_name)
    template = PM.get("chat_template", template_name)
    tools = TOOLS if any("tool_calls" in t for t in CASES[case]) else None
    fields = template.render(as_messages(CASES[case], tools), tokenizer)
    inline = template.render(as_messages(_inline(CASES[case], written), tools), tokenizer)
    assert [(s.text, s.trained, s.reasoning) for s in inline] == [(s.text, s.trained, s.reasoning) for s in fields]
    assert any(s.reasoning for s in inline)


@pytest.mark.parametrize("template_name", ["tokenizer", "qwen3"])
def test_reasoning_repeated_in_a_later_turn_is_not_taken_for_the_dropped_one(template_name, smollm2_dir):
    """Qwen3 drops earlier turns' reasoning; when a later turn reasons with the same words, the earlier turn
    still ends at its own end of turn (it used to run on to the later one's, and the row was refused)."""
    tokenizer = _tokenizer(smollm2_dir, "qwen3")
    same = "Let me check the question."
    conversation = [Q1, {**A1, "reasoning_content": same}, Q2, {**A2, "reasoning_content": same + " Twice."}]
    segments = PM.get("chat_template", template_name).render(as_messages(conversation), tokenizer)
    trained = [(s.text, s.reasoning) for s in segments if s.trained]
    assert trained == [(A1["content"] + "<|im_end|>", False), (f"<think>\n{same} Twice.\n</think>\n\n", True),
                       (A2["content"] + "<|im_end|>", False)]


@pytest.mark.parametrize("model_name", ["gpt-oss", "qwen3.8", "qwq"])
def test_check_template_reads_an_answers_think_block_as_training_does(model_name, smollm2_dir):
    """`sft preview --check-template` hands the model's own template the think block as training does (its
    reasoning field where it has one): a row trained as the model's template renders it shows no difference."""
    from sft.engine.render_check import render_difference

    tokenizer = _tokenizer(smollm2_dir, model_name)
    messages = as_messages(_inline(CASES["multi_turn_reasoning"], "<think>{}</think>{}"))
    assert render_difference(PM.get("chat_template", "tokenizer"), tokenizer, tokenizer, messages) is None


def test_a_think_block_the_template_writes_as_it_is_stays_text_marked_as_reasoning(smollm2_dir):
    """A template without a reasoning format of its own (SmolLM2's ChatML) trains the block as written, and
    assistant_no_reasoning leaves it out there too."""
    tokenizer = fresh_tokenizer(smollm2_dir)
    conversation = _inline(CASES["multi_turn_reasoning"], "<think>{}</think>{}")
    segments = PM.get("chat_template", "tokenizer").render(as_messages(conversation), tokenizer)
    assert segments_text(segments) == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert [s.text for s in segments if s.reasoning] == [f"<think>{t['reasoning_content']}</think>"
                                                         for t in CASES["multi_turn_reasoning"] if "reasoning_content" in t]


def test_a_template_that_cuts_the_think_block_out_of_every_answer_refuses_it(smollm2_dir):
    """R1-Distill's template cuts the block out of every answer: refused, never trained without it."""
    tokenizer = _tokenizer(smollm2_dir, "r1-distill-qwen")
    with pytest.raises(SftError, match="the chat_template renders no reasoning"):
        PM.get("chat_template", "tokenizer").render(
            as_messages(_inline(CASES["multi_turn_reasoning"], "<think>\n{}\n</think>\n\n{}")), tokenizer)


@pytest.mark.parametrize("written", ["<think>\n{}\n</think>\n\n{}", "<think>{}</think>{}"])
def test_qwq_trains_its_own_format_the_last_answers_block_after_the_prompts_think(written, smollm2_dir):
    """QwQ has no reasoning field: its template keeps the last answer as written (its generation prompt opens
    the block) and cuts the block out of earlier ones. That is what trains; the last block is reasoning."""
    tokenizer = _tokenizer(smollm2_dir, "qwq")
    conversation = _inline(CASES["multi_turn_reasoning"], written)
    segments = PM.get("chat_template", "tokenizer").render(as_messages(conversation), tokenizer)
    assert segments_text(segments) == tokenizer.apply_chat_template(conversation, tokenize=False)
    last, first = CASES["multi_turn_reasoning"][3], CASES["multi_turn_reasoning"][1]
    [reasoning] = [s.text for s in segments if s.reasoning]
    assert last["reasoning_content"] in reasoning and reasoning.rstrip("\n").endswith("</think>")
    assert first["reasoning_content"] not in segments_text(segments)


@pytest.mark.parametrize("model_name, template_name, data", [
    ("gpt-oss", "tokenizer", "glaive_toolcall_en_demo.json"),
    ("qwen3.5", "tokenizer", "reason_tool_use_demo_50.jsonl"),
    ("qwen3", "qwen3", "reason_tool_use_demo_50.jsonl"),
])
def test_llamafactory_tool_and_reasoning_rows_all_train(model_name, template_name, data, smollm2_dir):
    """Every row of LLaMA-Factory's glaive tool calls (gpt-oss refused 261 of 300) and reason_tool_use
    (the named qwen3 refused 14 of 50) renders, and no tool result is trained."""
    import json

    path = SHARED / "peerdata" / "llamafactory" / data
    fmt = PM.get("dataset_format", "sharegpt" if data.endswith(".json") else "messages")
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if data.endswith(".json") else [json.loads(line) for line in text.splitlines()]
    tokenizer = _tokenizer(smollm2_dir, model_name)
    template = PM.get("chat_template", template_name)
    for n, row in enumerate(rows):
        messages = fmt.to_conversation(row)
        segments = template.render(messages, tokenizer)
        trained = "".join(s.text for s in segments if s.trained)
        said = "".join(m.content + (m.reasoning or "") for m in messages if m.role == "assistant")
        for m in messages:
            if m.role == "tool" and len(m.content.strip()) > 8 and m.content.strip() not in said:
                assert m.content.strip() not in trained, f"row {n}: a tool result is trained"


def test_a_hub_template_list_picks_the_tool_use_template_for_rows_with_tools(smollm2_dir):
    """Hermes 3's chat_template is a list (default + tool_use): each row renders with the one the hub picks."""
    tokenizer = _model_tokenizer(smollm2_dir, MODELS["hermes3-tool_use"])
    tool_use = tokenizer.chat_template
    tokenizer.chat_template = {"default": (TEMPLATES / "other" / "NousResearch-Hermes-3-Llama-3.1-8B-default.jinja")
                               .read_text(), "tool_use": tool_use}
    template = PM.get("chat_template", "tokenizer")
    for case in ("multi_turn", "tool_call"):
        has_tools = any("tool_calls" in m for m in CASES[case])
        messages = as_messages(CASES[case], TOOLS if has_tools else None)
        text = segments_text(template.render(messages, tokenizer))
        assert text == tokenizer.apply_chat_template(CASES[case], tools=TOOLS if has_tools else None, tokenize=False)
        assert ("<tools>" in text) == has_tools
    assert template.stop_tokens(tokenizer)[0] == "<|im_end|>"


def test_a_turn_closed_by_two_special_tokens_trains_both(smollm2_dir):
    """Command R7B closes an answer with <|END_RESPONSE|><|END_OF_TURN_TOKEN|>; generation stops at the second."""
    tokenizer = _tokenizer(smollm2_dir, "command-r7b")
    template = PM.get("chat_template", "tokenizer")
    assert template.stop_tokens(tokenizer)[0] == "<|END_OF_TURN_TOKEN|>"
    segments = template.render(as_messages(CASES["multi_turn"]), tokenizer)
    [(ids, mask)] = encode_rendered(tokenizer, [segments])
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>")]
    closed = [k for k in range(len(ids) - 1) if ids[k:k + 2] == ends]
    assert len(closed) == 2 and all(mask[k] and mask[k + 1] for k in closed)
    assert not any(mask[k + 2] for k in closed if k + 2 < len(ids))  # the next turn's header is not trained


@pytest.mark.parametrize("name", ["tokenizer", "phi3"])
def test_phi_renders_its_own_eos_after_the_tokenizer_is_fitted(name, smollm2_dir):
    """prepare_tokenizer makes <|end|> the eos (generation stops there); Phi-3.5's own template still ends
    a conversation with <|endoftext|>, and so do the trained text and `--check-template`."""
    from sft.engine.configuration import load_config
    from sft.core.templating import prepare_tokenizer
    from sft.engine.render_check import render_difference

    model_tokenizer = _model_tokenizer(smollm2_dir, MODELS["phi3.5"])
    tokenizer = _model_tokenizer(smollm2_dir, MODELS["phi3.5"])
    template = PM.get("chat_template", name)
    prepare_tokenizer(tokenizer, template, load_config(overrides=[f"template.name={name}"]))
    assert tokenizer.eos_token == "<|end|>"
    for case in ("single", "system_multi_turn"):
        messages = as_messages(CASES[case])
        text = segments_text(template.render(messages, tokenizer))
        assert text == model_tokenizer.apply_chat_template(CASES[case], tokenize=False)
        assert text.endswith("<|end|>\n<|endoftext|>")
        assert render_difference(template, tokenizer, model_tokenizer, messages) is None


@pytest.mark.parametrize("name, model_name", [("mistral-v3", "mistral-v0.3"), ("mistral-nemo", "mistral-nemo")])
def test_named_mistral_variants_render_real_rows_as_the_models_own_template(name, model_name, smollm2_dir):
    """`--check-template` on real Alpaca rows: no row without a system prompt differs (the named `mistral`
    matched none of them: v0.3 writes `[INST] Hi[/INST] Hello</s>`, Nemo `[INST]Hi[/INST]Hello</s>`).

    A row with one trains it before the question, exactly as the model's template writes the prompt
    it is served; its own Jinja would drop it from the training row, so those rows differ."""
    import json

    from sft.engine.render_check import render_difference

    from datakit import REAL_ALPACA

    if not REAL_ALPACA.exists():
        pytest.skip("the shared data is absent")
    alpaca = PM.get("dataset_format", "alpaca")
    rows = json.loads(REAL_ALPACA.read_text(encoding="utf-8"))[:40]
    tokenizer = _tokenizer(smollm2_dir, model_name)
    template = PM.get("chat_template", name)
    for n, row in enumerate(rows):
        messages = alpaca.to_conversation({**row, "system": "Answer briefly."} if n % 2 else row)
        difference = render_difference(template, tokenizer, tokenizer, messages)
        assert (difference is None) == (n % 2 == 0), f"row {n}: {difference}"
        prompt, answer, *rest = template.render(messages, tokenizer)
        assert not prompt.trained and answer.trained
        assert prompt.text == tokenizer.apply_chat_template(chat_dicts(messages[:-1]), tokenize=False,
                                                            add_generation_prompt=True)
        assert ("Answer briefly.\n\n" in prompt.text) == bool(n % 2)
    legacy = PM.get("chat_template", "mistral")
    assert render_difference(legacy, tokenizer, tokenizer, alpaca.to_conversation(rows[0])) is not None


@pytest.mark.parametrize("name, model_name", [("mistral-v3", "mistral-v0.3"), ("mistral-nemo", "mistral-nemo")])
def test_named_mistral_variants_train_the_system_prompt_as_served(name, model_name, smollm2_dir):
    """A multi-turn row's system prompt opens its last question (mistral-common's place for it): the last
    answer trains after exactly the prompt the model's template writes when asked that question;
    `tokenizer` on the model's own template refuses the row rather than drop the system prompt."""
    tokenizer = _tokenizer(smollm2_dir, model_name)
    messages = as_messages(CASES["system_multi_turn"])
    with pytest.raises(SftError, match="leaves out system message 0"):
        PM.get("chat_template", "tokenizer").render(messages, tokenizer)
    segments = PM.get("chat_template", name).render(messages, tokenizer)
    text = segments_text(segments)
    served = tokenizer.apply_chat_template(chat_dicts(messages[:-1]), tokenize=False, add_generation_prompt=True)
    assert text.startswith(served) and text.count("You are Forge, made by sft.") == 1
    trained = [s.text for s in segments if s.trained]
    assert len(trained) == 2 and trained[-1].strip() == A2["content"] + "</s>"
    assert text.index("You are Forge") > text.index(Q1["content"]) + len(Q1["content"])


@pytest.mark.parametrize("model_name, date", [("llama3.1", "26 Jul 2024"), ("llama3.2", "today"), ("llama3.3", "26 Jul 2024")])
def test_llama31_writes_the_date_the_models_own_template_writes(model_name, date, smollm2_dir):
    """Llama 3.2's template writes the day of rendering, 3.1's and 3.3's 26 Jul 2024 (template.llama31.date: model)."""
    from datetime import date as day

    from sft.engine.configuration import load_config
    from sft.core.templating import resolve_template

    tokenizer = _tokenizer(smollm2_dir, model_name)
    messages = as_messages(CASES["single"])
    want = day.today().strftime("%d %b %Y") if date == "today" else date
    template = resolve_template(load_config(overrides=["template.name=llama31"]))
    text = segments_text(template.render(messages, tokenizer))
    assert f"Today Date: {want}\n" in text and text == tokenizer.apply_chat_template(CASES["single"], tokenize=False)
    fixed = resolve_template(load_config(overrides=["template.name=llama31", "template.llama31.date='01 Jan 2026'"]))
    assert "Today Date: 01 Jan 2026\n" in segments_text(fixed.render(messages, tokenizer))
    assert '"01 Jan 2026"' in fixed.jinja(tokenizer)


@pytest.mark.parametrize("name, model_name", [("gemma", "gemma2"), ("gemma", "gemma3"), ("llama3", "llama3.0")])
def test_family_templates_trim_and_refuse_as_the_models_own(name, model_name, smollm2_dir):
    """gemma and llama3 trim contents as Gemma's and Llama 3's templates do; gemma refuses a system turn on
    Gemma 2, whose template refuses it, and folds it into the first user turn on Gemma 3, as Gemma 3's does."""
    from sft.engine.configuration import load_config
    from sft.core.templating import prepare_tokenizer
    from sft.engine.render_check import render_difference

    model_tokenizer = _tokenizer(smollm2_dir, model_name)
    tokenizer = _model_tokenizer(smollm2_dir, MODELS[model_name])
    template = PM.get("chat_template", name)
    prepare_tokenizer(tokenizer, template, load_config(overrides=[f"template.name={name}"]))
    padded = [{"role": m["role"], "content": f"  {m['content']}\n"} for m in CASES["multi_turn"]]
    assert render_difference(template, tokenizer, model_tokenizer, as_messages(padded)) is None
    with_system = as_messages([{"role": "system", "content": "You are Forge."}, *padded])
    if model_name == "gemma2":
        for t in (model_tokenizer, tokenizer):  # the model's template, and the one saved after training
            with pytest.raises(SftError, match="System role not supported"):
                template.render(with_system, t)
    else:
        assert render_difference(template, tokenizer, model_tokenizer, with_system) is None


def test_check_template_passes_reasoning_under_the_key_the_model_reads(smollm2_dir):
    """gpt-oss reads a turn's reasoning from `thinking`: `--check-template` compares the same render training uses."""
    from sft.engine.render_check import render_difference

    tokenizer = _tokenizer(smollm2_dir, "gpt-oss")
    messages = as_messages(CASES["multi_turn_reasoning"])
    template = PM.get("chat_template", "tokenizer")
    assert messages[-1].reasoning in segments_text(template.render(messages, tokenizer))
    assert render_difference(template, tokenizer, tokenizer, messages) is None
