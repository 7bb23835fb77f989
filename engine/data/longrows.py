"""Rows far longer than ``model.max_seq_length``, cut by characters before they are tokenized.

Tokenizing costs memory in proportion to the text (ids, offsets and the fast tokenizer's own
structures: a 9 MB answer took 1.7 GB, a 200 MB one was killed at 19 GB), only to learn that
the row is far too long. What the pipeline does with a long row depends on its first
``max_seq_length + 1`` tokens and their mask alone (drop it, cut it, end it with the end-of-turn
token, or leave out a prompt that fills the window), so a row is cut before tokenizing when it
certainly has more tokens than that, and the outcome is the one the whole text would have had:

- ``longest``, the most characters one token covers, is the tokenizer's longest vocabulary entry.
  A byte-level BPE entry writes each byte as one character, so it covers at most as many
  characters of text as it has; SentencePiece's byte tokens (``<0x0A>``) and WordPiece's ``##``
  only overstate it.
- A text of ``N`` characters thus has at least ``N / longest`` tokens: beyond
  ``sure = (max_seq_length + 1) × longest`` characters it has more than ``max_seq_length + 1``,
  and those all lie within its first ``sure`` characters.
- The text is cut at ``2 × sure`` characters: only the tokens next to a cut differ from the whole
  text's (a word cut in two), never ``sure`` characters back.
- Checked on what the cut text gives: its first ``max_seq_length + 1`` tokens must decode to at most
  ``sure`` characters. A tokenizer that breaks the bound (an unknown-word token spanning a long word)
  fails the check, and that row is tokenized whole, as before.

A raw-text document whose every token is trained (continued pre-training) is kept whole, split into
``max_seq_length`` windows: longer than :data:`BLOCK` characters, it is tokenized in blocks that end
before a line break (before a space on a longer line), so memory stays bounded there too.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sft.core.interfaces import Segment
from sft.core.templating import encode_rendered, segments_text

from .plain import Pieces, encode_plain

__all__ = ["LongRows", "BLOCK"]

#: Characters of a kept-whole raw-text document tokenized at once.
BLOCK = 1 << 20

Encoded = tuple[list[int], list[int]]

#: tokenizer -> (its vocabulary size, its longest entry in characters): the vocabulary is read once per
#: tokenizer and process, not once per chunk of rows (a 49k-entry dict built in Rust, 5% of a row's time).
_LONGEST: "weakref.WeakKeyDictionary[Any, tuple[int, int]]" = weakref.WeakKeyDictionary()


def _longest_entry(tokenizer: Any) -> int:
    """The most characters one of ``tokenizer``'s vocabulary entries has (re-read when tokens were added)."""
    size = len(tokenizer)
    known = _LONGEST.get(tokenizer)
    if known is None or known[0] != size:
        known = _LONGEST[tokenizer] = (size, max(map(len, tokenizer.get_vocab()), default=1))
    return known[1]


def _chars(segments: Sequence[Segment]) -> int:
    return sum(len(s.text) for s in segments)


def _slice(segments: Sequence[Segment], start: int, end: int) -> list[Segment]:
    """The characters ``start:end`` of the rendered text, as segments (each keeps its flags)."""
    out: list[Segment] = []
    pos = 0
    for seg in segments:
        lo, hi = max(start, pos), min(end, pos + len(seg.text))
        if lo < hi:
            out.append(replace(seg, text=seg.text[lo - pos:hi - pos]))
        pos += len(seg.text)
    return out


class LongRows:
    """Tokenizes rendered rows for a window of ``max_len`` tokens, cutting the far too long ones first."""

    def __init__(self, tokenizer: Any, max_len: int, train_on: str):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.train_on = train_on
        #: characters beyond which a text certainly has more than max_len + 1 tokens
        self.sure = (max_len + 1) * max(1, _longest_entry(tokenizer))
        #: rows cut by characters before tokenizing
        self.cut = 0

    def too_long(self, text_chars: int) -> bool:
        """True when a text of ``text_chars`` characters certainly has more than ``max_len + 1`` tokens."""
        return text_chars > self.sure

    def encode(self, rendered: Sequence[Sequence[Segment] | Pieces], whole: Sequence[bool] = ()) -> list[Encoded]:
        """:func:`encode_rendered` of each row, far too long ones cut first (``whole[i]``: kept whole, in blocks);
        a plain render (:class:`.plain.Pieces`) masked at its boundaries where they tell (:func:`.plain.encode_plain`)."""
        kept_whole = list(whole) + [False] * (len(rendered) - len(whole))
        out: list[Encoded | None] = [None] * len(rendered)
        plain = [i for i, r in enumerate(rendered) if isinstance(r, Pieces) and sum(map(len, r)) <= self.sure]
        for i, enc in zip(plain, encode_plain(self.tokenizer, [rendered[i] for i in plain], self.train_on)):
            out[i] = enc
        rendered = [r.segments() if isinstance(r, Pieces) and out[i] is None else r for i, r in enumerate(rendered)]
        long = {i for i, segs in enumerate(rendered)
                if out[i] is None and _chars(segs) > (BLOCK if kept_whole[i] else self.sure)}
        short = [i for i in range(len(rendered)) if out[i] is None and i not in long]
        for i, enc in zip(short, encode_rendered(self.tokenizer, [rendered[i] for i in short], self.train_on)):
            out[i] = enc
        for i in sorted(long):
            out[i] = self._blocks(rendered[i]) if kept_whole[i] else self.encode_cut(rendered[i])
        return out  # type: ignore[return-value]

    def encode_cut(self, segments: Sequence[Segment], after: int = 0) -> Encoded:
        """One row's ``(ids, mask)``, its text cut ``2 × sure`` characters past character ``after`` when longer
        (a preference row's completion is measured from the prompt's end)."""
        if _chars(segments) <= after + self.sure:
            (enc,) = encode_rendered(self.tokenizer, [segments], self.train_on)
            return enc
        (ids, mask), = encode_rendered(self.tokenizer, [_slice(segments, 0, after + 2 * self.sure)], self.train_on)
        head = self.tokenizer.decode(ids[:self.max_len + 1])
        if len(head) > after + self.sure:
            # The tokenizer broke the bound (a token spanning more than its longest entry): the whole text.
            (enc,) = encode_rendered(self.tokenizer, [segments], self.train_on)
            return enc
        self.cut += 1
        return ids, mask

    def _blocks(self, segments: Sequence[Segment]) -> Encoded:
        """A kept-whole row tokenized in blocks of at most :data:`BLOCK` characters (see the module's docstring)."""
        text = segments_text(segments)
        bounds = [0]
        while len(text) - bounds[-1] > BLOCK:
            start, end = bounds[-1], bounds[-1] + BLOCK
            # Before a line break, else before a space: pre-tokenizers split there, so the tokens stay those
            # of the whole text (a space or line break starts the next piece, as it starts the next word).
            cut = max(text.rfind("\n", start + 1, end), 0) or max(text.rfind(" ", start + 1, end), 0) or end
            bounds.append(cut)
        bounds.append(len(text))
        ids: list[int] = []
        mask: list[int] = []
        for start, end in zip(bounds, bounds[1:]):
            (b_ids, b_mask), = encode_rendered(self.tokenizer, [_slice(segments, start, end)], self.train_on)
            ids += b_ids
            mask += b_mask
        return ids, mask
