"""Preference rows → the token ids TRL's preference trainers take, with exact completion spans.

A pair becomes ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (the columns of TRL's
``DataCollatorForPreference``); a labelled row (KTO) becomes ``prompt_ids`` /
``completion_ids`` / ``label``. Each completion is rendered by the run's template after its
prompt, exactly as a conversation is for SFT (:func:`sft.core.templating.encode_rendered`), and:

- the prompt's tokens are the tokens of the template's generation prompt, what the model is
  given at inference (where BPE would merge the prompt's end with the answer, the answer keeps
  its own first token; where a tokenizer's look-ahead splits the prompt's last whitespace
  otherwise before an answer, the render's own tokens of that same text stand, as SFT trains
  them); chosen and rejected must get the same prompt tokens, and a completion whose render
  does not start with the generation prompt's text is a located bad row, never a silently
  shifted one;
- a completion's scored tokens run from the answer's start to its last trained token, its
  end-of-turn token included, and nothing after it (ChatML's newline after ``<|im_end|>`` is
  not something the model writes, so it is not scored; TRL's own tokenization scores it);
- a pair whose completions are the same is a bad row; rows too long for ``model.max_seq_length``
  follow ``data.on_truncate`` (``drop``: counted and left out; otherwise the completion's end
  is cut by the collator, as TRL does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sft.core.errors import DataError, SftError
from sft.core.formats import validate_conversation
from sft.core.interfaces import ChatTemplate, Conversation, Message, Preference, tools_of
from sft.core.timelimit import TemplateTooSlow
from .longrows import LongRows

__all__ = ["check_preference", "encode_preferences", "EncodedPreferences"]


def check_preference(pref: Any) -> list[str]:
    """Check a format's :class:`Preference` like a conversation (raises :class:`DataError`); return its warnings."""
    if not isinstance(pref, Preference):
        raise DataError(f"the format returned {type(pref).__name__}, not a Preference")
    warnings: list[str] = []
    for completion in pref.completions():
        if completion.role != "assistant":
            raise DataError(f"a completion must be an assistant turn, got role '{completion.role}'")
        warnings += validate_conversation(_joined(pref.prompt, completion))
    if pref.rejected is not None and pref.chosen == pref.rejected:
        raise DataError("chosen and rejected are the same completion: the pair teaches nothing")
    if pref.rejected is None and not isinstance(pref.label, bool):
        raise DataError(f"an unpaired row needs a true/false label, got {pref.label!r}")
    return list(dict.fromkeys(warnings))


def _joined(prompt: Sequence[Message], completion: Message) -> list[Message]:
    tools = tools_of(prompt)
    messages = [*prompt, completion]
    return Conversation(messages, tools) if tools else messages


@dataclass
class EncodedPreferences:
    """Token columns of the rows kept, row for row with ``conversations`` (prompt + chosen)."""

    columns: dict[str, list[Any]] = field(default_factory=dict)
    conversations: list[list[Message]] = field(default_factory=list)
    truncated: int = 0
    cut_dropped: int = 0
    #: rows far longer than model.max_seq_length, cut by characters before tokenizing
    precut: int = 0
    tokens: int = 0
    scored_tokens: int = 0
    max_tokens: int = 0

    def __len__(self) -> int:
        return len(self.conversations)


def _split(template: ChatTemplate, tokenizer: Any, pref: Preference, completion: Message,
           generation: str, generation_ids: list[int], long_rows: LongRows) -> tuple[list[int], list[int]]:
    """``completion`` rendered after ``pref.prompt``: ``(prompt ids, completion ids)``, the completion's
    running from the answer's first token to its last trained token (its end of turn).

    The prompt's tokens are the render's own, as SFT trains them. They are the generation prompt's
    tokens, except where a tokenizer's look-ahead splits the prompt's last whitespace differently
    before an answer (``\\n\\n`` alone is one token, ``\\n\\nRed`` two): then the same text,
    tokenized as in the render, stands before the answer. A completion far longer than
    ``model.max_seq_length`` is cut by characters first (:mod:`.longrows`): the collator cuts it anyway."""
    segments = template.render(_joined(pref.prompt, completion), tokenizer)
    ids, mask = long_rows.encode_cut(segments, after=len(generation))
    same = next((i for i, (a, b) in enumerate(zip(ids, generation_ids)) if a != b), min(len(ids), len(generation_ids)))
    answer = len(generation_ids)
    if same < len(generation_ids):
        answer = next((i for i in range(same, len(ids)) if mask[i]), len(ids))
        if tokenizer.decode(ids[same:answer]) != tokenizer.decode(generation_ids[same:]):
            raise DataError(f"template '{template.name}' renders the prompt differently before this answer than as a "
                            f"generation prompt ({tokenizer.decode(ids[same:answer])!r} where the generation prompt "
                            f"has {tokenizer.decode(generation_ids[same:])!r}), so the answer's tokens cannot be "
                            f"scored exactly; choose a template whose generation prompt starts every answer")
    trained = [i for i in range(answer, len(ids)) if mask[i]]
    if not trained:
        raise DataError(f"template '{template.name}' trains no token of this completion")
    return list(ids[:answer]), list(ids[answer:trained[-1] + 1])


def encode_preferences(prefs: Sequence[Preference], refs: Sequence[Any], template: ChatTemplate, tokenizer: Any,
                       cfg: Any, bad: Any) -> EncodedPreferences:
    """Tokenize preference rows; bad ones go to ``bad`` (the pipeline's bad-row policy) with their file:line."""
    out = EncodedPreferences()
    max_len = int(cfg.model.max_seq_length)
    long_rows = LongRows(tokenizer, max_len, "assistant")
    for pref, ref in zip(prefs, refs):
        try:
            prompt = template.generation_prompt(pref.prompt, tokenizer)
            if long_rows.too_long(len(prompt)):
                # The prompt alone certainly fills model.max_seq_length: left out, as once tokenized.
                out.truncated += 1
                out.cut_dropped += 1
                out.precut += 1
                continue
            generation = tokenizer(prompt, add_special_tokens=False)
            cut_before = long_rows.cut
            prompts, completions = zip(*(_split(template, tokenizer, pref, c, prompt, generation["input_ids"],
                                                long_rows) for c in pref.completions()))
            out.precut += long_rows.cut > cut_before  # a row, whether one completion or both were cut
            if len(set(map(tuple, prompts))) > 1:
                raise DataError("the prompt's tokens differ between chosen and rejected: the tokenizer joins the "
                                "prompt's end with each answer's start differently, so the two would not be "
                                "scored after the same prompt")
            prompt_ids, completions = prompts[0], list(completions)
            if len(completions) == 2 and completions[0] == completions[1]:
                raise DataError("chosen and rejected render to the same tokens: the pair teaches nothing")
        except DataError as exc:
            bad.add(exc.located(source=ref.source, line=ref.line, row=ref.row))
            continue
        except TemplateTooSlow:
            raise  # the template's fault: every row would wait as long
        except Exception as exc:  # noqa: BLE001 - a row the template cannot render is a bad row
            detail = str(exc) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"
            bad.add(DataError(f"template '{template.name}' cannot render this row: {detail}",
                              source=ref.source, line=ref.line, row=ref.row))
            continue
        longest = len(prompt_ids) + max(map(len, completions))
        if longest > max_len:
            out.truncated += 1
            if str(cfg.data.on_truncate) == "drop" or len(prompt_ids) >= max_len:
                out.cut_dropped += 1
                continue
        names = ("chosen_ids", "rejected_ids") if pref.rejected is not None else ("completion_ids",)
        row = {"prompt_ids": prompt_ids, **dict(zip(names, completions))}
        if pref.rejected is None:
            row["label"] = bool(pref.label)
        for key, value in row.items():
            out.columns.setdefault(key, []).append(value)
        out.conversations.append(_joined(pref.prompt, pref.chosen))
        out.tokens += len(prompt_ids) + sum(map(len, completions))
        out.scored_tokens += sum(min(len(c), max_len - len(prompt_ids)) for c in completions)
        out.max_tokens = max(out.max_tokens, longest)
    return out


def to_dataset(encoded: EncodedPreferences) -> Any:
    """The rows as a ``datasets.Dataset`` (Arrow columns straight from the lists)."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    arrays = {key: pa.array(values, type=pa.bool_() if key == "label" else pa.list_(pa.int32()))
              for key, values in encoded.columns.items()}
    return datasets.Dataset(InMemoryTable(pa.table(arrays)))
