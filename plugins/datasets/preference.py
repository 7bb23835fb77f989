"""Preference data: pairs (``preference``, ``sharegpt_pairs``) and labelled completions (``kto``).

The shapes practitioners bring, read into :class:`~sft.core.interfaces.Preference` rows that the
run's chat template renders (docs/preference.md):

- ``preference``, TRL's preference type: ``prompt`` / ``chosen`` / ``rejected``, each a string or
  a list of OpenAI messages; or the "implicit prompt" form without ``prompt``, where ``chosen``
  and ``rejected`` are whole conversations that share every turn but the last.
- ``sharegpt_pairs``, LLaMA-Factory's ShareGPT ranking data: ``conversations`` (the prompt's
  turns, ``from``/``value``) with one ``chosen`` and one ``rejected`` turn (an object, or a
  list holding one).
- ``kto``, unpaired feedback: ``prompt`` / ``completion`` / ``label`` (TRL's unpaired preference
  type), or ``messages`` whose last turn is the completion plus ``label`` (LLaMA-Factory's KTO data).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError
from sft.core.formats import present_field
from sft.core.interfaces import Conversation, DatasetFormat, Message, Preference

from .messages import Messages, MessagesOptions
from .sharegpt import ShareGPT, ShareGPTOptions

__all__ = ["PreferencePairs", "ShareGPTPairs", "LabelledCompletions", "register_dataset_formats"]

_MESSAGES = Messages()


def _turns(value: Any, field: str, tools: Any = None) -> list[Message]:
    """A column that is a string (one turn's text) or a list of OpenAI messages, as messages.

    A plain string becomes a user turn here; callers that read a completion re-role it."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", field=field)
        return [Message("user", value)]
    row = {"messages": value} if tools is None else {"messages": value, "tools": tools}
    try:
        return list(_MESSAGES.to_conversation(row, MessagesOptions()))
    except DataError as exc:
        # The messages reader names its own column: say which column of this row it was.
        inner = (exc.field or "").replace("messages", field, 1) if exc.field else field
        raise DataError(exc.message, field=inner) from None


def _completion(value: Any, field: str) -> Message:
    """A completion column: a string (the answer's text) or a list holding one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty text", field=field)
        return Message("assistant", value)
    turns = _turns(value, field)
    if len(turns) != 1 or turns[0].role != "assistant":
        roles = ", ".join(t.role for t in turns)
        raise DataError(f"a completion must be one assistant turn, got {len(turns)} turn(s) ({roles})", field=field)
    return turns[0]


def _with_tools(prompt: list[Message], row: Mapping[str, Any], key: str) -> list[Message]:
    from sft.core.formats import parse_tools

    tools = parse_tools(row.get(key), key)
    return Conversation(prompt, tools) if tools else prompt


@dataclass
class PreferenceOptions:
    prompt_key: str = opt("prompt", "Column of the prompt (text or messages); absent: the implicit-prompt form.")
    chosen_key: str = opt("chosen", "Column of the preferred completion (text or messages).")
    rejected_key: str = opt("rejected", "Column of the rejected completion (text or messages).")
    tools_key: str = opt("tools", "Column holding the row's tool specs; optional.")


class PreferencePairs(DatasetFormat):
    name = "preference"
    description = "TRL preference pairs: prompt, chosen, rejected (text or messages), or implicit-prompt conversations"
    options = PreferenceOptions
    row_kind = "pair"
    sample_rows = (
        {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Purple."},
        {"prompt": [{"role": "user", "content": "Is ice cold?"}],
         "chosen": [{"role": "assistant", "content": "Yes, ice is cold."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
         "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Five."}]},
    )

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        o = options or PreferenceOptions()
        return o.chosen_key in columns and o.rejected_key in columns and "conversations" not in columns

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or PreferenceOptions()
        return (o.prompt_key, o.chosen_key, o.rejected_key, o.tools_key)

    def to_preference(self, row: Mapping[str, Any], options: Any = None) -> Preference:
        o: PreferenceOptions = options or PreferenceOptions()
        for key in (o.chosen_key, o.rejected_key):
            present_field(row, key)
        if row.get(o.prompt_key) is not None:
            prompt = _turns(row[o.prompt_key], o.prompt_key)
            chosen = _completion(row[o.chosen_key], o.chosen_key)
            rejected = _completion(row[o.rejected_key], o.rejected_key)
            return Preference(_with_tools(prompt, row, o.tools_key), chosen, rejected)
        return self._implicit(row, o)

    def _implicit(self, row: Mapping[str, Any], o: PreferenceOptions) -> Preference:
        """Whole conversations in ``chosen`` and ``rejected``: the prompt is every turn but the last,
        and must be the same in both."""
        if isinstance(row[o.chosen_key], str) or isinstance(row[o.rejected_key], str):
            raise DataError(f"text completions need a '{o.prompt_key}' column (or give chosen and rejected as "
                            f"whole conversations)", field=o.prompt_key)
        chosen = _turns(row[o.chosen_key], o.chosen_key)
        rejected = _turns(row[o.rejected_key], o.rejected_key)
        for key, turns in ((o.chosen_key, chosen), (o.rejected_key, rejected)):
            if len(turns) < 2 or turns[-1].role != "assistant":
                raise DataError("an implicit-prompt row's conversation must end with an assistant turn after "
                                "the prompt's turns", field=key)
        if chosen[:-1] != rejected[:-1]:
            at = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) if len(chosen) == len(rejected) \
                else min(len(chosen), len(rejected)) - 1
            raise DataError(f"chosen and rejected must share every turn but the last (the prompt); they differ at "
                            f"turn {at}", field=f"{o.rejected_key}[{at}]")
        return Preference(_with_tools(chosen[:-1], row, o.tools_key), chosen[-1], rejected[-1])


@dataclass
class ShareGPTPairsOptions(ShareGPTOptions):
    chosen_key: str = opt("chosen", "Column of the preferred turn ({from, value}, or a list holding one).")
    rejected_key: str = opt("rejected", "Column of the rejected turn ({from, value}, or a list holding one).")


class ShareGPTPairs(DatasetFormat):
    name = "sharegpt_pairs"
    description = "LLaMA-Factory ShareGPT ranking: conversations (the prompt) + chosen + rejected turns"
    options = ShareGPTPairsOptions
    row_kind = "pair"
    sample_rows = (
        {"conversations": [{"from": "human", "value": "Name a primary colour."}],
         "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Purple."}},
    )

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        o = options or ShareGPTPairsOptions()
        return all(c in columns for c in (o.conversations_key, o.chosen_key, o.rejected_key))

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or ShareGPTPairsOptions()
        return (*ShareGPT().read_columns(o), o.chosen_key, o.rejected_key)

    def to_preference(self, row: Mapping[str, Any], options: Any = None) -> Preference:
        o: ShareGPTPairsOptions = options or ShareGPTPairsOptions()
        prompt = ShareGPT().to_conversation(row, o)
        completions = []
        for key in (o.chosen_key, o.rejected_key):
            value = row.get(key)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if not isinstance(value, Mapping):
                raise DataError(f"expected one turn {{'{o.role_key}': ..., '{o.content_key}': ...}}, got {value!r:.60}",
                                field=key)
            turns = ShareGPT().to_conversation({o.conversations_key: [value]}, o)
            if len(turns) != 1 or turns[0].role != "assistant":
                raise DataError(f"the {key} turn must be the assistant's (speaker one of {', '.join(o.assistant)})",
                                field=f"{key}.{o.role_key}")
            completions.append(turns[0])
        # ShareGPT's reader already keeps the row's tools on the prompt it returns.
        return Preference(prompt, completions[0], completions[1])


@dataclass
class KTOOptions:
    prompt_key: str = opt("prompt", "Column of the prompt (text or messages), with completion_key.")
    completion_key: str = opt("completion", "Column of the completion (text or one assistant message).")
    messages_key: str = opt("messages", "Column of a whole conversation whose last turn is the completion (instead of prompt and completion).")
    label_key: str = opt("label", "Column of the label: true (desirable) or false (undesirable).")
    tools_key: str = opt("tools", "Column holding the row's tool specs; optional.")


class LabelledCompletions(DatasetFormat):
    name = "kto"
    description = "Unpaired feedback for KTO: prompt + completion + label, or messages (last turn judged) + label"
    options = KTOOptions
    row_kind = "labelled"
    sample_rows = (
        {"prompt": "Name a primary colour.", "completion": "Red.", "label": True},
        {"messages": [{"role": "user", "content": "Is ice cold?"}, {"role": "assistant", "content": "No."}],
         "label": False},
    )

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        o = options or KTOOptions()
        return o.label_key in columns and (o.completion_key in columns or o.messages_key in columns)

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or KTOOptions()
        return (o.prompt_key, o.completion_key, o.messages_key, o.label_key, o.tools_key)

    def to_preference(self, row: Mapping[str, Any], options: Any = None) -> Preference:
        o: KTOOptions = options or KTOOptions()
        _field, label = present_field(row, o.label_key)
        if not isinstance(label, bool):
            raise DataError(f"expected true or false, got {label!r:.40}", field=o.label_key)
        if row.get(o.completion_key) is not None or row.get(o.messages_key) is None:
            if row.get(o.prompt_key) is None:
                raise DataError("missing field" if o.prompt_key not in row else "null value", field=o.prompt_key)
            prompt = _turns(row[o.prompt_key], o.prompt_key)
            completion = _completion(row.get(o.completion_key), o.completion_key)
        else:
            turns = _turns(row[o.messages_key], o.messages_key)
            if len(turns) < 2 or turns[-1].role != "assistant":
                raise DataError("the conversation must end with the assistant turn being judged", field=o.messages_key)
            prompt, completion = turns[:-1], turns[-1]
        return Preference(_with_tools(prompt, row, o.tools_key), completion, label=label)


@hookimpl
def register_dataset_formats(register):
    register(PreferencePairs())
    register(ShareGPTPairs())
    register(LabelledCompletions())
