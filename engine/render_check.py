"""``sft preview --check-template``: does `sft` train on the text the model's own template renders?

For every row, the text the run's template renders (what is tokenized and trained on) is
compared, token for token, with ``apply_chat_template`` of the model tokenizer's *own*
``chat_template`` (tools, tool calls and reasoning passed in the OpenAI schema). A row that
differs is reported with the first differing token and both texts around it; such a row
teaches the model a format it will not see at inference (vLLM, TGI, llama.cpp ``--jinja``
and ``transformers`` all render with that Jinja).

:func:`render_difference` compares one conversation; the test kit's
:func:`sft.testing.assert_renders_like` uses it for a template plugin's tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sft.core.errors import SftError
from sft.core.interfaces import ChatTemplate, Message, tools_of
from sft.core.templating import chat_dicts, rendered_reasoning_key, segments_text
from sft.core.timelimit import render_time_limit

__all__ = ["RenderDifference", "render_difference", "model_render", "check_template", "CONTEXT_CHARS"]

#: Characters of each text shown on both sides of the first difference.
CONTEXT_CHARS = 60


@dataclass
class RenderDifference:
    """Where the trained text and the model's own render of one conversation first differ."""

    token_index: int
    ours_token: str | None
    model_token: str | None
    ours_context: str
    model_context: str

    def describe(self) -> str:
        return (f"first difference at token {self.token_index}: sft trains {self.ours_token!r}, the model's template "
                f"renders {self.model_token!r}\n    sft:   ...{self.ours_context!r}...\n"
                f"    model: ...{self.model_context!r}...")


def model_render(model_tokenizer: Any, messages: Sequence[Message]) -> str:
    """``apply_chat_template`` of the tokenizer's own chat_template for ``messages`` and their tools."""
    if not getattr(model_tokenizer, "chat_template", None):
        raise SftError("the model's tokenizer has no chat_template to check the rendering against")
    # Reasoning under the key the model's template reads (gpt-oss: thinking), as training passes it.
    with render_time_limit("the model tokenizer's own chat_template"):
        return model_tokenizer.apply_chat_template(chat_dicts(messages, rendered_reasoning_key(model_tokenizer)),
                                                   tools=tools_of(messages) or None, tokenize=False)


def render_difference(template: ChatTemplate, tokenizer: Any, model_tokenizer: Any,
                      messages: Sequence[Message]) -> RenderDifference | None:
    """None when ``template`` renders ``messages`` to the same tokens as the model's own template.

    ``tokenizer`` is the one training uses (after :func:`sft.engine.data.prepare_tokenizer`);
    ``model_tokenizer`` a copy with the model's original ``chat_template`` and special tokens.
    Both texts are tokenized with ``tokenizer``, without special tokens, as training does.
    """
    ours = segments_text(template.render(messages, tokenizer))
    theirs = model_render(model_tokenizer, messages)
    if ours == theirs:
        return None
    a, b = _encode(tokenizer, ours), _encode(tokenizer, theirs)
    if a == b:
        return None
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    # Character offsets of the first differing token in each text.
    at_a = len(tokenizer.decode(a[:k], skip_special_tokens=False))
    at_b = len(tokenizer.decode(b[:k], skip_special_tokens=False))

    def token(ids: list[int]) -> str | None:
        return tokenizer.decode(ids[k:k + 1], skip_special_tokens=False) if k < len(ids) else None

    return RenderDifference(k, token(a), token(b), ours[max(0, at_a - CONTEXT_CHARS):at_a + CONTEXT_CHARS],
                            theirs[max(0, at_b - CONTEXT_CHARS):at_b + CONTEXT_CHARS])


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_template(cfg: Any, pm: Any = None, limit: int | None = None) -> dict[str, Any]:
    """Compare every row of the configured data (train and eval) with the model's own render.

    Returns ``{"template", "rows", "checked", "differing": [{"row", "split", ...RenderDifference}]}``.
    """
    from .data import build_datasets
    from .models import load_tokenizer
    from sft.core.templating import resolve_template

    model_tokenizer = load_tokenizer(cfg.model, of_base=True)  # untouched: the model's chat_template and special tokens
    if not getattr(model_tokenizer, "chat_template", None):
        raise SftError(f"--check-template: the tokenizer of {cfg.model.name} has no chat_template to compare with")
    tokenizer = load_tokenizer(cfg.model)
    prepared = build_datasets(cfg, pm, tokenizer, quiet=True)
    template = resolve_template(cfg, pm)
    rows = [("train", i, c) for i, c in enumerate(prepared.train_conversations)]
    rows += [("eval", i, c) for i, c in enumerate(prepared.eval_conversations)]
    if limit is not None:
        rows = rows[:limit]
    differing = []
    for split, i, conversation in rows:
        diff = render_difference(template, tokenizer, model_tokenizer, conversation)
        if diff is not None:
            differing.append({"split": split, "row": i, **diff.__dict__, "description": diff.describe()})
    return {"template": template.name, "model": cfg.model.name, "checked": len(rows), "differing": differing}


def print_check(report: dict[str, Any], file: Any = None, shown: int = 5) -> None:
    """The report as text: a verdict line, then the first ``shown`` differing rows."""
    import sys

    out = file or sys.stdout
    n, total = len(report["differing"]), report["checked"]
    if not n:
        out.write(f"template '{report['template']}' renders all {total} rows exactly as the chat_template of "
                  f"{report['model']} does (token for token)\n")
        return
    out.write(f"template '{report['template']}': {n} of {total} rows differ from the chat_template of "
              f"{report['model']}:\n")
    for d in report["differing"][:shown]:
        out.write(f"  {d['split']} row {d['row']}: {d['description']}\n")
    if n > shown:
        out.write(f"  ... and {n - shown} more\n")
