"""The ChatML templates with tool calls: ``qwen`` (Qwen2.5), ``qwen3`` and ``hermes``.

Each is its family's real ``chat_template`` (``assets/*.jinja``), rendered by transformers, so
training sees exactly what ``apply_chat_template``, vLLM and llama.cpp ``--jinja`` render:

- tools are listed in the system turn (``<tools>`` JSON lines), calls are
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` in the assistant turn (after
  its text, when it has both; several for parallel calls), and results are
  ``<tool_response>`` blocks inside one *user* turn, so they are never trained;
- ``qwen`` adds Qwen2.5's default system prompt when the row has none;
- ``qwen3`` renders ``reasoning`` as ``<think>\\n...\\n</think>\\n\\n`` in the assistant turns after
  the last user question, drops it from earlier turns, and writes an empty think block on the
  final assistant turn when it has no reasoning, exactly as Qwen3's template does (text with
  ``<think>...</think>`` in the content is split the same way);
- ``hermes`` is the same tool format for other ChatML models (SmolLM2, OpenHermes...): no default
  system prompt, no reasoning.

The end-of-turn token ``<|im_end|>`` is trained after every assistant turn, tool calls included
(the turn ends there), and never after tool results (a user turn).
"""

from __future__ import annotations

from typing import Any

from sft.core import hookimpl

from .common import JinjaTemplate, chatml_tools_ollama

__all__ = ["Qwen", "Qwen3", "Hermes", "register_chat_templates"]

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class _ChatMLTools(JinjaTemplate):
    eot = "<|im_end|>"
    stops = ("<|endoftext|>",)
    default_system: str | None = None

    def ollama_template(self, tokenizer: Any = None) -> str:
        return chatml_tools_ollama(self.default_system, "\n\n", thinking=self.reasoning)


class Qwen(_ChatMLTools):
    name = "qwen"
    version = "1"
    description = "Qwen2.5: ChatML, default system prompt, <tool_call> JSON calls, <tool_response> results"
    asset = "qwen2.5.jinja"
    default_system = QWEN_SYSTEM


class Qwen3(_ChatMLTools):
    name = "qwen3"
    version = "2"
    description = "Qwen3: ChatML, <think> reasoning (earlier turns' dropped), <tool_call> calls, <tool_response> results"
    asset = "qwen3.jinja"
    reasoning = True


class Hermes(_ChatMLTools):
    name = "hermes"
    version = "1"
    description = "Hermes-style ChatML tool calls: <tool_call> JSON, <tool_response> results, no default system"
    asset = "hermes.jinja"


@hookimpl
def register_chat_templates(register):
    register(Qwen())
    register(Qwen3())
    register(Hermes())
