"""Plain rows: conversations of text turns alone, checked, rendered and masked without an object per turn.

Nearly every row of a chat dataset is turns of text (a system prompt, then user and assistant turns)
and nothing else. A dataset format that can say so cheaply (:meth:`DatasetFormat.plain_turns`) gives
such a row as ``(role, text)`` pairs, and a chat template that can render them so
(:meth:`ChatTemplate.render_plain`) gives texts alternating untrained and trained. The trained-token
mask then follows from the token at each boundary between those texts, rather than from every
token's offsets (a realistic row's offsets as Python tuples and the array passes over them took about 0.2 ms,
some 40% of tokenizing it).

Whatever this path is not sure of takes the general one (``Message``, ``Segment``, every offset), which
also names every error: a format or template without these parts, a row that is not plainly valid, a
boundary some token crosses. The tokens, masks, stored conversations and errors are the same either way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sft.core.formats import THINK_OPEN
from sft.core.interfaces import DatasetFormat, Segment
from sft.core.templating import direct_backend

__all__ = ["PlainTurns", "Pieces", "plain_turns", "encode_plain"]

Encoded = tuple[list[int], list[int]]


class PlainTurns(tuple):
    """A row's ``(role, text)`` turns that :func:`sft.core.formats.validate_conversation` passes without a warning."""

    def text(self) -> str:
        """The stored conversation: the JSON text of the same turns as ``Message`` objects (cache.conversation_text)."""
        return json.dumps({"messages": [{"role": role, "content": text} for role, text in self]}, ensure_ascii=False)


class Pieces(list):
    """A render as texts alternating untrained and trained, the first untrained (:meth:`ChatTemplate.render_plain`)."""

    def segments(self) -> list[Segment]:
        """The same render as segments, for the general path."""
        return [Segment(text, i % 2 == 1) for i, text in enumerate(self) if text]


def plain_turns(fmt: DatasetFormat, row: Mapping[str, Any], options: Any) -> PlainTurns | None:
    """``row``'s plain turns when its format gives them and they are plainly valid; None: the general path."""
    turns = fmt.plain_turns(row, options)
    return PlainTurns(turns) if turns is not None and _plainly_valid(turns) else None


def _plainly_valid(turns: Sequence[Any]) -> bool:
    """True for turns that validate_conversation passes with no warning and no template refuses as reasoning: a
    system turn only first, then user and assistant turns alternating from a user turn to an assistant turn, no
    text empty, no answer with a think block. Anything else is left to the general path, which names the error."""
    try:
        roles, texts = zip(*turns, strict=True)
        # Whole rows at a time rather than a turn at a time: str.isspace is true where str.strip leaves "".
        if not all(texts) or any(map(str.isspace, texts)):
            return False
    except (TypeError, ValueError):  # not pairs, or not text
        return False
    start = int(roles[0] == "system")
    pairs, odd = divmod(len(roles) - start, 2)
    return (pairs > 0 and not odd and roles[start::2] == ("user",) * pairs and roles[start + 1::2] == ("assistant",) * pairs
            and THINK_OPEN not in "\n".join(texts[start + 1::2]))


def encode_plain(tokenizer: Any, rows: Sequence[Pieces], train_on: str) -> list[Encoded | None]:
    """``(ids, mask)`` of each plain render, the mask read off the tokens at its boundaries; None for a row whose
    boundaries do not tell (:func:`sft.core.templating.encode_rendered` encodes it, as every row was before)."""
    backend = direct_backend(tokenizer)
    # Where encode_rendered would not use the Rust tokenizer's own batch (or refuses the tokenizer), it decides.
    if not rows or not getattr(tokenizer, "is_fast", False) or backend is None:
        return [None] * len(rows)
    encodings = backend.encode_batch(["".join(pieces) for pieces in rows], add_special_tokens=False)
    if train_on == "all":
        return [(e.ids, [1] * len(e.ids)) for e in encodings]
    return [_masked(e, pieces) for e, pieces in zip(encodings, rows)]


def _masked(encoding: Any, pieces: Pieces) -> Encoded | None:
    """``(ids, mask)`` when at every boundary between an untrained and a trained text a token begins and the token
    before it ends: no token crosses it, and since offsets run in text order (as every fast tokenizer's do), the
    tokens between two boundaries are those of the text between them, trained or not as it is. This is what
    encode_rendered's per-token offsets give, without building them: it finds no answer start straddled, and each
    token's characters (a zero-width token's place) lie in one text. None when a boundary is crossed or no token
    begins there (a straddled answer start is encoded in pieces by encode_rendered)."""
    ids = encoding.ids
    mask: list[int] = []
    trained = None  # the flag of the text being read; None before the first non-empty one
    pos = first = 0  # where the text being read starts: its character, its first token
    for i, text in enumerate(pieces):
        if not text:
            continue
        flag = i % 2
        if trained is not None and flag != trained:
            token = encoding.char_to_token(pos)
            if token is None or token < first or encoding.token_to_chars(token)[0] != pos:
                return None
            if token:
                start, end = encoding.token_to_chars(token - 1)
                if not start < end <= pos:
                    return None
            mask += [trained] * (token - first)
            first = token
        trained = flag
        pos += len(text)
    mask += [trained or 0] * (len(ids) - first)
    return ids, mask
