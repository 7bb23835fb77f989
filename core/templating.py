"""Shared machinery for chat templates: turn-based rendering, Jinja/Ollama generation, and masks.

Most chat formats are "each role's content between a fixed prefix and suffix". A template
plugin describes that with :class:`Turn` values on a :class:`TurnTemplate` subclass, and gets
``render``, ``generation_prompt``, ``jinja`` and ``ollama_template`` generated from the same
strings, so the training text, the saved tokenizer's chat_template and the Ollama TEMPLATE
cannot drift apart.

:func:`encode_rendered` turns rendered segments into token ids plus the trained-token mask. It
tokenizes the *whole* text once (so the ids are exactly what the tokenizer produces at
inference) and maps each token's character span back onto the segments: a token is trained
when any of its characters lies in a trained segment. No marker strings are searched for.

Nothing here imports transformers; the tokenizer is passed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .errors import ConfigError, ConfigProblem, SftError
from .formats import has_reasoning, split_reasoning
from .interfaces import ChatTemplate, Conversation, Message, Segment, ToolCall, tools_of
from .timelimit import TemplateTooSlow, render_time_limit

if TYPE_CHECKING:
    from .plugins import PluginManager

#: Tokens a tokenizer may already have that make a good pad (checked in this order).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>")

__all__ = ["resolve_template", "prepare_tokenizer", "model_eos_token", "Turn", "TurnTemplate", "segments_text",
           "trained_text", "encode_rendered", "end_of_turn", "adds_bos", "as_messages", "chat_dicts", "REASONING_KEYS",
           "rendered_reasoning_key", "try_render", "PROBE_TOOL", "direct_backend"]


def resolve_template(cfg: Any, pm: "PluginManager | None" = None, tokenizer: Any = None) -> ChatTemplate:
    """The chat template a run uses: the plugin ``cfg.template.name`` names, configured with ``template.<name>``.

    The one place a template name becomes an object, so data, training, the exports and
    generation all use the same configured template. ``cfg`` is a validated config
    (:func:`sft.engine.configuration.load_config`). With ``tokenizer``, it is also fitted to the
    template (:func:`prepare_tokenizer`, in place).
    """
    from .config import plugin_options

    if pm is None:
        from .plugins import get_plugin_manager

        pm = get_plugin_manager()
    name = cfg.template.name
    template = pm.get("chat_template", name, "template.name").configure(plugin_options(cfg, "chat_template", name, pm))
    if tokenizer is not None:
        prepare_tokenizer(tokenizer, template, cfg)
    return template



def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def prepare_tokenizer(tokenizer: Any, template: ChatTemplate, cfg: Any) -> int:
    """Make ``tokenizer`` agree with ``template``; return how many tokens were added.

    Called by the trainer before it loads data (and by :func:`build_datasets`; it is
    idempotent). When the result is > 0 the trainer must resize the model's embeddings.

    1. The template's end-of-turn token (its first stop token) must be one token. If it is
       not in the vocabulary, ``template.on_missing_eot`` adds it as a special token
       (``add``) or raises :class:`ConfigError` (``error``).
    2. ``eos_token`` becomes that EOT, so ``generate()``, the saved tokenizer and the GGUF
       stop where training taught the model to stop.
    3. When ``pad == eos`` (or pad is unset), a distinct pad is chosen: an existing pad-like
       token, else the unk token, else a new ``<|pad|>``. Collators that mask pad ids
       would otherwise mask the trained EOS too.
    4. ``tokenizer.chat_template`` becomes ``template.jinja(tokenizer)``.
    """
    from tokenizers import AddedToken

    added = 0
    eot = end_of_turn(template, tokenizer)
    if _single_token_id(tokenizer, eot) is None:
        if cfg.template.on_missing_eot == "error":
            raise ConfigError([ConfigProblem(
                "template.on_missing_eot",
                f"the end-of-turn token {eot!r} of template '{template.name}' is not a token of the tokenizer of "
                f"'{cfg.model.name}'; set template.on_missing_eot=add to add it (the embeddings are resized), "
                f"or choose a template made for this model")])
        added += tokenizer.add_tokens([AddedToken(eot, special=True, normalized=False)], special_tokens=True)
    if tokenizer.eos_token != eot:
        # The model's own template may write its eos (Phi-3 ends a conversation with <|endoftext|>);
        # it keeps rendering that one (model_eos_token), whatever generation stops at.
        setattr(tokenizer, _MODEL_EOS, model_eos_token(tokenizer))
        tokenizer.eos_token = eot
    pad = tokenizer.pad_token
    if pad is None or pad in (eot, tokenizer.eos_token):
        vocab = tokenizer.get_vocab()
        taken = {eot, tokenizer.eos_token, tokenizer.bos_token}
        choice = next((c for c in (*PAD_CANDIDATES, tokenizer.unk_token) if c and c in vocab and c not in taken), None)
        if choice is None:
            choice = "<|pad|>"
            added += tokenizer.add_tokens([AddedToken(choice, special=True, normalized=False)], special_tokens=True)
        tokenizer.pad_token = choice
    tokenizer.chat_template = template.jinja(tokenizer)
    return added


#: The attribute prepare_tokenizer keeps the tokenizer's own eos token under, before making the EOT its eos.
_MODEL_EOS = "sft_model_eos_token"


def model_eos_token(tokenizer: Any) -> str | None:
    """The eos token the model's tokenizer came with (what its own chat_template writes as ``eos_token``)."""
    return getattr(tokenizer, _MODEL_EOS, None) or getattr(tokenizer, "eos_token", None)


def segments_text(segments: Sequence[Segment]) -> str:
    """The rendered text of ``segments``."""
    return "".join(s.text for s in segments)


def trained_text(segments: Sequence[Segment]) -> str:
    """The text of the trained segments only (what decoding the trained tokens should give)."""
    return "".join(s.text for s in segments if s.trained)


def as_messages(messages: Sequence[Any], tools: Sequence[Any] | None = None) -> list[Message]:
    """Accept :class:`Message` objects or OpenAI-style dicts (what HF tools pass); keep or attach the tools.

    Dicts may carry ``tool_calls`` (``{function: {name, arguments}}`` or flat), ``tool_call_id``,
    ``name`` and ``reasoning_content``. The result is a :class:`Conversation` when there are tools.
    """
    out = [m if isinstance(m, Message) else _from_dict(m) for m in messages]
    tools = list(tools) if tools is not None else tools_of(messages)
    return Conversation(out, tools) if tools else out


def _from_dict(m: Any) -> Message:
    calls = []
    for c in m.get("tool_calls") or ():
        f = c.get("function", c)
        args = f.get("arguments", {})
        calls.append(ToolCall(f["name"], json.loads(args) if isinstance(args, str) else args, c.get("id")))
    return Message(m["role"], m.get("content") or "", tool_calls=tuple(calls), tool_call_id=m.get("tool_call_id"),
                   name=m.get("name"), reasoning=m.get("reasoning_content"))


#: The keys chat templates read a turn's reasoning from, most common first (gpt-oss reads ``thinking``).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


#: A tool for probe renders of templates that render only conversations with tools (Hermes' tool_use).
PROBE_TOOL = {"type": "function", "function": {"name": "f", "description": "f", "parameters": {
    "type": "object", "properties": {}}}}

#: chat_template (its JSON for a hub list of named templates) -> the key it reads reasoning from.
_REASONING_KEY: dict[str, str | None] = {}


def rendered_reasoning_key(tokenizer: Any) -> str | None:
    """The message key the tokenizer's chat_template reads reasoning from: the first of REASONING_KEYS it renders.

    Most read ``reasoning_content``; gpt-oss reads ``thinking``. Probed (once per template) on an answer, then
    on a tool call (Gemma 4 writes reasoning only there). None: it renders none (then a row's reasoning is
    refused, never dropped silently)."""
    source = tokenizer.chat_template
    source = source if isinstance(source, str) else json.dumps(source, sort_keys=True)
    if source not in _REASONING_KEY:
        marker = "SFTPROBEREASONING"
        call = {"type": "function", "function": {"name": "f", "arguments": {}}}
        probes = [({"role": "assistant", "content": "SFTPROBEANSWER"}, None),
                  ({"role": "assistant", "content": "", "tool_calls": [call]}, [PROBE_TOOL])]
        _REASONING_KEY[source] = next(
            (key for answer, tools in probes for key in REASONING_KEYS
             if marker in try_render(tokenizer, [{"role": "user", "content": "SFTPROBEUSER"}, {**answer, key: marker}],
                                     tools)), None)
    return _REASONING_KEY[source]


def try_render(tokenizer: Any, dicts: list[dict[str, Any]], tools: Any) -> str:
    """``apply_chat_template`` of a probe (with the model's own eos), or "" when the template refuses it."""
    try:
        with render_time_limit(f"the chat_template of {getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}"):
            return tokenizer.apply_chat_template(dicts, tools=tools, tokenize=False,
                                                 eos_token=model_eos_token(tokenizer))
    except TemplateTooSlow:
        raise
    except Exception:  # noqa: BLE001 - a template may refuse a probe shape; that probe tells nothing
        return ""


def chat_dicts(messages: Sequence[Message], reasoning_key: str | None = "reasoning_content") -> list[dict[str, Any]]:
    """The messages as the dicts HF chat templates read (OpenAI schema), with only the keys that are set.

    Keys are left out rather than set empty: Llama 3.1's template tests ``'tool_calls' in message``.
    Arguments stay objects, so a template's ``tojson`` writes them (Qwen2.5 always does).
    ``reasoning_key`` is the key the template reads reasoning from (one of :data:`REASONING_KEYS`); an
    answer's opening think block goes there too (:func:`~sft.core.formats.split_reasoning`), for the
    template to write its way. None: the template reads none; think blocks stay in the content.
    """
    out = []
    for m in messages if reasoning_key is None else map(split_reasoning, messages):
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{**({"id": c.id} if c.id else {}), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        if m.reasoning is not None:
            item[reasoning_key or REASONING_KEYS[0]] = m.reasoning
        out.append(item)
    return out


def end_of_turn(template: ChatTemplate, tokenizer: Any = None) -> str:
    """The template's end-of-turn token: the first of its stop tokens."""
    stops = template.stop_tokens(tokenizer)
    if not stops:
        raise SftError(f"chat template '{template.name}' declares no stop tokens; the first must be its end-of-turn token")
    return stops[0]


@dataclass(frozen=True)
class Turn:
    """How one role renders: ``prefix + content + suffix``.

    For the assistant role the end-of-turn token comes between the content and ``suffix``;
    content and EOT are trained, ``prefix`` and ``suffix`` are not.
    """

    prefix: str
    suffix: str = ""


def _jinja_literal(text: str) -> str:
    # A Jinja expression, not raw template text: HF compiles chat templates with
    # trim_blocks/lstrip_blocks, which would eat newlines that follow a block tag.
    # JSON escapes (\n, \", \uXXXX) are valid Jinja string-literal escapes.
    return "{{ " + json.dumps(text) + " }}" if text else ""


class TurnTemplate(ChatTemplate):
    """A chat template described by a prefix/suffix per role.

    Subclasses set the class attributes below and get every :class:`ChatTemplate` method.
    ``eot`` None means "the tokenizer's eos token" (the Alpaca style). ``default_system`` is
    rendered as a system turn when a conversation has none.
    """

    bos: ClassVar[str] = ""
    system: ClassVar[Turn] = Turn("")
    user: ClassVar[Turn] = Turn("")
    assistant: ClassVar[Turn] = Turn("")
    default_system: ClassVar[str | None] = None
    eot: ClassVar[str | None] = None
    #: Stop strings after the EOT (other tokens that also end a turn in this family).
    extra_stops: ClassVar[tuple[str, ...]] = ()
    #: Used for the EOT when ``eot`` is None and no tokenizer is given (e.g. docs, Ollama without a tokenizer).
    fallback_eot: ClassVar[str] = "</s>"
    #: Text after the last turn of a whole conversation (not before a generation prompt): Phi-3's
    #: template ends with its eos ``<|endoftext|>``. Untrained: generation stops at the EOT before it.
    final: ClassVar[str] = ""
    #: Contents are trimmed of surrounding whitespace (Jinja's ``| trim``), as Llama 3's and Gemma's own
    #: templates do: the trained text is then what the model sees at inference.
    trim: ClassVar[bool] = False

    # -- the contract -------------------------------------------------------------------
    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        eot = self.eot
        if eot is None:
            eot = getattr(tokenizer, "eos_token", None) or self.fallback_eot
        return [eot] + [s for s in self.extra_stops if s != eot]

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        segments = self._turns(messages, tokenizer)
        return segments + [Segment(self.final, False)] if self.final else segments

    def render_plain(self, turns: Sequence[tuple[str, str]], tokenizer: Any = None) -> list[str] | None:
        # A subclass with its own render (a system turn folded in, a refusal) renders plain turns that way too.
        if type(self).render is not TurnTemplate.render:
            return None
        pieces = self._pieces([(r, t.strip()) for r, t in turns] if self.trim else turns, tokenizer)
        pieces[-1] += self.final
        return pieces

    def _turns(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        messages = self._trimmed(as_messages(messages))
        self._refuse_tools(messages)
        pieces = self._pieces([(m.role, m.content) for m in messages], tokenizer)
        return [Segment(text, i % 2 == 1) for i, text in enumerate(pieces) if text]

    def _pieces(self, turns: Sequence[tuple[str, str]], tokenizer: Any) -> list[str]:
        """The text of ``(role, content)`` turns as texts alternating untrained and trained, the first untrained."""
        eot = end_of_turn(self, tokenizer)
        head = self.bos
        if self.default_system is not None and (not turns or turns[0][0] != "system"):
            head += self.system.prefix + self.default_system + self.system.suffix
        pieces: list[str] = []
        untrained = [head]  # what lies between two answers, joined once
        for role, content in turns:
            if role == "assistant":
                pieces += ("".join(untrained) + self.assistant.prefix, content + eot)
                untrained = [self.assistant.suffix]
            else:
                turn = self._turn(role)
                untrained += (turn.prefix, content, turn.suffix)
        pieces.append("".join(untrained))
        return pieces

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return segments_text(self._turns(messages, tokenizer)) + self.assistant.prefix

    def jinja(self, tokenizer: Any = None) -> str:
        eot = end_of_turn(self, tokenizer)
        lit = _jinja_literal
        parts = [lit(self.bos)]
        if self.default_system is not None:
            parts.append("{% if not messages or messages[0]['role'] != 'system' %}"
                         + lit(self.system.prefix + self.default_system + self.system.suffix) + "{% endif %}")
        content = "{{ message['content']" + (" | trim" if self.trim else "") + " }}"
        parts.append("{% for message in messages %}")
        parts.append("{% if message['role'] == 'system' %}" + lit(self.system.prefix)
                     + content + lit(self.system.suffix))
        parts.append("{% elif message['role'] == 'user' %}" + lit(self.user.prefix)
                     + content + lit(self.user.suffix))
        parts.append("{% elif message['role'] == 'assistant' %}" + lit(self.assistant.prefix)
                     + content + lit(eot + self.assistant.suffix))
        parts.append("{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}")
        parts.append("{% endfor %}")
        parts.append("{% if add_generation_prompt %}" + lit(self.assistant.prefix)
                     + ("{% else %}" + lit(self.final) if self.final else "") + "{% endif %}")
        return "".join(parts)

    def ollama_bos(self, tokenizer: Any = None) -> str:
        """The BOS text an Ollama TEMPLATE writes: ``bos``, unless llama.cpp adds exactly that token itself."""
        if tokenizer is None or (tokenizer.bos_token == self.bos and adds_bos(tokenizer)):
            return ""
        return self.bos

    def ollama_template(self, tokenizer: Any = None) -> str:
        """Ollama's Go template, walking ``.Messages``.

        The BOS is written only when llama.cpp will not add it: llama.cpp adds the
        tokenizer's own BOS when the GGUF's ``add_bos_token`` says so (:func:`adds_bos`), so
        a template whose ``bos`` is that token leaves it out, and one whose ``bos`` is other
        text (llama3's ``<|begin_of_text|>`` on SmolLM2, which trained it as text) writes it,
        as training did. The last assistant message gets no EOT so a prefilled answer
        continues; a last user message is followed by the assistant prefix (the generation prompt).
        """
        eot = end_of_turn(self, tokenizer)
        bos = self.ollama_bos(tokenizer)
        sys_default = ""
        if self.default_system is not None:
            sys_default = "{{ else }}" + self.system.prefix + self.default_system + self.system.suffix
        return (
            bos + "{{ if .System }}" + self.system.prefix + "{{ .System }}" + self.system.suffix + sys_default + "{{ end }}"
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{ if eq .Role "user" }}' + self.user.prefix + "{{ .Content }}" + self.user.suffix
            + "{{ if $last }}" + self.assistant.prefix + "{{ end }}"
            '{{ else if eq .Role "assistant" }}' + self.assistant.prefix + "{{ .Content }}"
            + "{{ if not $last }}" + eot + self.assistant.suffix + "{{ end }}"
            "{{ end }}{{ end }}"
        )

    def _trimmed(self, messages: Sequence[Message]) -> Sequence[Message]:
        """``messages`` with their contents trimmed when the format trims them."""
        if not self.trim:
            return messages
        from dataclasses import replace

        trimmed = [replace(m, content=m.content.strip()) for m in messages]
        tools = tools_of(messages)
        return Conversation(trimmed, tools) if tools else trimmed  # the row's tools stay with it

    def _refuse_tools(self, messages: Sequence[Message]) -> None:
        """A prefix/suffix template has no tool-call or reasoning format: say so rather than drop them."""
        what = ("tools" if tools_of(messages) else
                "tool calls" if any(m.tool_calls or m.role == "tool" for m in messages) else
                "reasoning" if any(map(has_reasoning, messages)) else None)
        if what == "reasoning":
            raise SftError(f"chat template '{self.name}' has no format for reasoning (a reasoning_content field or a "
                           f"<think> block in an assistant's content); choose one that has "
                           f"(qwen3, or tokenizer with a reasoning model's own template: Qwen3, gpt-oss, Nemotron 3)")
        if what:
            raise SftError(f"chat template '{self.name}' has no format for {what}; choose one that has "
                           f"(qwen, qwen3, hermes, llama31, mistral-v3, or tokenizer with a model whose template does)")

    def _turn(self, role: str) -> Turn:
        if role not in ("system", "user", "assistant"):
            raise SftError(f"chat template '{self.name}' cannot render role '{role}'")
        return getattr(self, role)


def adds_bos(tokenizer: Any) -> bool:
    """True when ``tokenizer`` puts its BOS token in front of what it encodes (the GGUF's ``add_bos_token``)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def encode_rendered(
    tokenizer: Any,
    rendered: Sequence[Sequence[Segment]],
    train_on: str = "assistant",
) -> list[tuple[list[int], list[int]]]:
    """Tokenize rendered conversations and compute each one's trained-token mask.

    Args:
        tokenizer: a *fast* Hugging Face tokenizer (offsets are needed).
        rendered: one list of segments per conversation.
        train_on: ``assistant`` trains the tokens overlapping trained segments; ``assistant_no_reasoning``
            the same except reasoning segments; ``all`` trains every token.

    Returns:
        ``(input_ids, mask)`` per conversation, ``mask[i] == 1`` where token ``i`` is trained.
        The answer is tokenized as the model produces it at inference: after its prompt. Where
        BPE would merge the end of a prompt with the start of an answer (``[/INST]`` + ``"Hard"``
        into ``]"``, ``x=`` + ``=y`` into ``==``), the text is encoded in pieces split at that
        answer's start, so the prompt's tokens are those of the generation prompt and the first
        trained token is the answer's own. When encoding in pieces would change the text (a
        SentencePiece tokenizer that prefixes each piece with a word boundary), the whole text is
        encoded and the straddling token is trained, because it produces trained text. Elsewhere
        (an answer's end merging with what follows) a straddling token is trained too.
    """
    import numpy as np

    if not getattr(tokenizer, "is_fast", False):
        raise SftError(
            f"loss masking needs a fast tokenizer (with offsets); {type(tokenizer).__name__} is not one")
    texts = [segments_text(segs) for segs in rendered]
    if not texts:
        return []
    batch = _encode_batch(tokenizer, texts)
    out: list[tuple[list[int], list[int]]] = []
    for segs, text, (ids, offsets) in zip(rendered, texts, batch):
        if train_on == "all":
            out.append((list(ids), [1] * len(ids)))
            continue
        # Per character: 1 where a trained segment lies (each segment's flag repeated over its text).
        trained = [s.trained and not (s.reasoning and train_on == "assistant_no_reasoning") for s in segs]
        flags = np.repeat(np.array(trained, dtype=np.int32), [len(s.text) for s in segs])
        spans = _spans(offsets)
        cuts = _straddled_answer_starts(flags, spans)
        pieces = _encode_in_pieces(tokenizer, text, ids, cuts) if cuts else None
        if pieces is not None:
            ids, spans = pieces
        out.append((ids if isinstance(ids, list) else list(ids), _trained_mask(flags, spans)))
    return out


def _spans(offsets: Sequence[tuple[int, int]]) -> Any:
    """Offsets (a list of ``(start, end)`` tuples) as an ``(n, 2)`` int array.

    Through one flat iterator: ``np.asarray`` on a list of tuples probes each tuple for its shape
    first, which took twice as long as the tokenizing it follows.
    """
    import numpy as np
    from itertools import chain

    return np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)


def _straddled_answer_starts(flags: Any, spans: Any) -> list[int]:
    """The answer starts (untrained -> trained) that some token's span crosses."""
    import numpy as np

    if len(flags) < 2 or not len(spans):
        return []
    starts = np.flatnonzero((flags[1:] == 1) & (flags[:-1] == 0)) + 1
    # One pass for all answer starts (rather than a scan of every span per start): with the spans
    # ordered by start, the spans beginning before b are a prefix, and one of them crosses b when the
    # furthest end in that prefix lies past b. Sorted, so no order of the offsets is assumed.
    order = np.argsort(spans[:, 0], kind="stable")
    reach = np.maximum.accumulate(spans[order, 1])
    before = np.searchsorted(spans[order, 0], starts, side="left")  # how many spans start before b
    crossed = (before > 0) & (reach[np.maximum(before - 1, 0)] > starts)
    return starts[crossed].tolist()


def _encode_in_pieces(tokenizer: Any, text: str, ids: Sequence[int], cuts: list[int]) -> tuple[list[int], Any] | None:
    """``(ids, spans)`` of ``text`` encoded piece by piece, split at ``cuts``; None if that changes the text."""
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    piece_ids: list[int] = []
    piece_spans: list[tuple[int, int]] = []
    for start, (p_ids, p_offsets) in zip(bounds, _encode_batch(tokenizer, pieces)):
        piece_ids.extend(p_ids)
        piece_spans.extend((start + a, start + b) for a, b in p_offsets)
    if tokenizer.decode(piece_ids) != tokenizer.decode(list(ids)):
        return None
    return piece_ids, _spans(piece_spans)


def _trained_mask(flags: Any, spans: Any) -> list[int]:
    """1 for each token (character span) that covers some trained character."""
    import numpy as np

    # Per-character trained flags as a prefix sum: token (a, b) is trained when
    # cum[b] - cum[a] > 0, i.e. some character in [a, b) is trained.
    cum = np.concatenate(([0], np.cumsum(flags)))
    starts, ends = spans[:, 0], spans[:, 1]
    mask = (cum[ends] - cum[starts]) > 0
    # Zero-width spans carry no characters; they follow the character they sit on.
    empty = starts == ends
    if empty.any() and len(flags):
        at = np.minimum(starts[empty], len(flags) - 1)
        mask[empty] = flags[at] > 0
    return mask.view(np.int8).tolist()  # a bool array viewed as 0/1 bytes, not copied


def direct_backend(tokenizer: Any) -> Any:
    """``tokenizer``'s Rust tokenizer when texts may go straight through it (no truncation or padding set), else
    None. Encoding through it skips the BatchEncoding the transformers wrapper builds per row (~20% of the time)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and backend.truncation is None and backend.padding is None else None


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """``(ids, offsets)`` per text, without special tokens: through :func:`direct_backend` where it may."""
    backend = direct_backend(tokenizer)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))
