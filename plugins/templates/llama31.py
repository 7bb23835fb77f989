"""The ``llama31`` chat template: Llama 3.1 / 3.2 / 3.3 with JSON tool calls and the ``ipython`` role.

It is Meta's real ``chat_template`` (``assets/llama3.1.jinja``), rendered by transformers. Unlike
``llama3`` (the 3.0 layout), every conversation opens with the system header carrying
"Cutting Knowledge Date" / "Today Date" (and "Environment: ipython" when the row has tools);
the tools go into the first user turn; a call is the assistant turn
``{"name": ..., "parameters": {...}}<|eot_id|>``; a tool result is an ``ipython`` turn holding
the result as JSON. The format has one call per turn and no text beside a call: rows with
parallel calls, or with text and a call in one turn, are refused (the template raises),
never trained in a shape the model does not use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt

from .common import JinjaTemplate

__all__ = ["Llama31", "Llama31Options", "register_chat_templates"]

#: Llama 3.1's and 3.3's templates write this date; Llama 3.2's the day of rendering (strftime_now).
FIXED_DATE = "26 Jul 2024"
_FIXED = '{%- set date_string = "26 Jul 2024" %}'
_TODAY = ('{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
          '{%- else %}' + _FIXED + '{%- endif %}')


@dataclass
class Llama31Options:
    date: str = opt("model", "The system header's 'Today Date': model (what the model's own chat_template writes: "
                             "the day of rendering for Llama 3.2, 26 Jul 2024 for 3.1 and 3.3), today, or a fixed "
                             "date such as '26 Jul 2024'.")


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class Llama31(JinjaTemplate):
    name = "llama31"
    version = "2"
    description = "Llama 3.1+: date system header, JSON tool calls, ipython tool results, <|eot_id|>"
    options = Llama31Options
    asset = "llama3.1.jinja"
    bos = "<|begin_of_text|>"
    eot = "<|eot_id|>"
    stops = ("<|eom_id|>", "<|end_of_text|>")
    date = "model"

    def configure(self, options: Any) -> "Llama31":
        return type(self)._with_date(options.date if options is not None else "model")

    @classmethod
    def _with_date(cls, date: str) -> "Llama31":
        configured = cls()
        configured.date = date
        return configured

    def source(self, tokenizer: Any = None) -> str:
        """Meta's template, writing the date as ``date`` says: the saved tokenizer writes what training did."""
        text = super().source(tokenizer)
        date = self.date
        if date == "model":
            own = getattr(tokenizer, "chat_template", None)
            date = "today" if isinstance(own, str) and "strftime_now" in own else FIXED_DATE
        if date == "today":
            return text.replace(_FIXED, _TODAY)
        return text.replace(_FIXED, '{%- set date_string = "' + date.replace('"', "") + '" %}')

    def ollama_template(self, tokenizer: Any = None) -> str:
        """Ollama's Go template: the same layout; tools in the first user turn as the Jinja puts them.

        Ollama writes JSON compactly, where the Jinja indents tool specs by 4; the call and result
        shapes are the model's.
        """
        preamble = ("Given the following functions, please respond with a JSON for a function call with its proper "
                    "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function "
                    "name, \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
                    "{{ range $.Tools }}{{ json . }}\n\n{{ end }}")
        return (
            _header("system") + "{{ if .Tools }}Environment: ipython\n{{ end }}Cutting Knowledge Date: December 2023\n"
            "Today Date: " + self._ollama_date(tokenizer) + "\n\n{{ .System }}<|eot_id|>"
            "{{ $first := true }}"
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{ if eq .Role "user" }}' + _header("user")
            + "{{ if and $.Tools $first }}" + preamble + "{{ end }}{{ $first = false }}{{ .Content }}<|eot_id|>"
            '{{ else if eq .Role "assistant" }}' + _header("assistant")
            + '{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": '
              "{{ .Function.Arguments }}}{{ end }}<|eot_id|>"
            "{{ else }}{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}{{ end }}"
            '{{ else if eq .Role "tool" }}' + _header("ipython") + "{{ json .Content }}<|eot_id|>"
            "{{ end }}"
            '{{ if and $last (ne .Role "assistant") }}' + _header("assistant") + "{{ end }}"
            "{{ end }}")


    def _ollama_date(self, tokenizer: Any) -> str:
        """The date the Ollama TEMPLATE writes: the fixed one, or for the day of rendering the export's day
        (a Go TEMPLATE has no portable clock)."""
        if "strftime_now" in self.source(tokenizer):
            from datetime import date

            return date.today().strftime("%d %b %Y")
        return FIXED_DATE if self.date in ("model", "today") else self.date.replace('"', "")


@hookimpl
def register_chat_templates(register):
    register(Llama31())
