"""Generation with a trained run: ``sft generate``, ``sft chat`` and the quick check after training.

Everything goes through :func:`generate_reply`, so the quick generation that training prints
and stores in ``summary.json`` renders and stops exactly like ``sft generate`` does: the
run's chat template builds the prompt (:meth:`ChatTemplate.generation_prompt`), decoding is
greedy, and it stops at the template's stop tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import SftError
from .interfaces import Conversation, Message, tools_of

if TYPE_CHECKING:
    from .interfaces import ChatTemplate

__all__ = ["generate_reply", "load_run", "generate_from_run", "chat_with_run", "first_user_prompt", "read_tools"]


def first_user_prompt(conversations: Sequence[Sequence[Message]]) -> list[Message] | None:
    """The messages up to and including the first user turn of the first conversation (system turn and tools kept)."""
    for conversation in conversations:
        for i, message in enumerate(conversation):
            if message.role == "user":
                return conversation[: i + 1]  # a Conversation's slice keeps its tools
    return None


def _stop_ids(tokenizer: Any, stops: Sequence[str]) -> tuple[list[int], list[str]]:
    """Stop strings that are one token become ids (fast); the others stay strings."""
    ids, strings = [], []
    for stop in stops:
        encoded = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            strings.append(stop)
    return ids, strings


def generate_reply(model: Any, tokenizer: Any, template: "ChatTemplate", messages: Sequence[Message],
                   max_new_tokens: int = 128, stream: bool = False) -> str:
    """Greedy-decode the next assistant turn for ``messages``; return its text without stop tokens.

    With ``stream``, the text is printed to stdout as it is produced (``TextStreamer``).
    """
    import torch

    prompt = template.generation_prompt(Conversation(messages, tools_of(messages)), tokenizer)  # a copy, tools kept
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    stops = template.stop_tokens(tokenizer)
    stop_ids, stop_strings = _stop_ids(tokenizer, stops)
    kwargs: dict[str, Any] = {}
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                # Sampling knobs from the model's generation_config would only raise warnings.
                temperature=None, top_p=None, top_k=None,
                eos_token_id=stop_ids or tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                use_cache=True,
                **kwargs,
            )
    finally:
        if was_training:
            model.train()
    new = output[0, encoded["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=False)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    text = text[:cut]
    for special in (tokenizer.pad_token, tokenizer.eos_token):
        if special:
            text = text.replace(special, "")
    return text.strip()


def load_run(run_dir: str | Path) -> tuple[Any, Any, "ChatTemplate", Any]:
    """Load ``(model, tokenizer, template, cfg)`` of a finished run: the base model plus the run's adapter.

    The tokenizer comes from ``adapter/`` (it carries the template's chat_template and any
    added tokens); the template is the one the run's ``config.yaml`` configures, validated
    like any config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .config import load_config
    from .env import current_environment, quiet_known_warnings
    from .models import forget_gguf_quantization, pretrained_kwargs, resolve_model
    from .rundir import RunDir
    from .templating import resolve_template

    run = RunDir.of(run_dir)
    if not run.config.is_file():
        raise SftError(f"{run.root}: not a run directory (no config.yaml)")
    if not run.adapter.is_dir():
        raise SftError(f"{run.root}: the run has no adapter/ yet (did training finish?)")
    cfg = load_config(str(run.config))
    # The answer streams to the terminal; a "Loading weights" bar in front of it is noise.
    hf_logging.disable_progress_bar()
    quiet_known_warnings()
    template = resolve_template(cfg)
    env = current_environment()
    dtype = torch.float32 if not env.cuda else (torch.bfloat16 if env.bf16 else torch.float16)
    # The run's own files (adapter/) need the base model's remote code too, never its revision or GGUF file.
    own = {"trust_remote_code": bool(cfg.model.trust_remote_code)}
    tokenizer = AutoTokenizer.from_pretrained(run.adapter, **own)
    if (run.adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name), dtype=dtype,
                                                    **pretrained_kwargs(cfg.model))
        if cfg.model.gguf_file:
            forget_gguf_quantization(base)
        if base.get_input_embeddings().num_embeddings < len(tokenizer):
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, run.adapter)
    else:  # full fine-tuning saves the whole model there
        model = AutoModelForCausalLM.from_pretrained(run.adapter, dtype=dtype, **own)
    if env.cuda:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, template, cfg


def generate_from_run(run_dir: str | Path, prompt: str, max_new_tokens: int = 128,
                      tools: Sequence[Any] | None = None) -> str:
    """``sft generate RUN_DIR PROMPT [--tools FILE]``: stream the run's answer to ``prompt`` and return it.

    With ``tools`` (OpenAI function specs) the prompt declares them as training rows did, so a
    model trained on tool calls answers with one in its template's format.
    """
    model, tokenizer, template, _cfg = load_run(run_dir)
    messages: list[Message] = Conversation([Message("user", prompt)], tools or ())
    return generate_reply(model, tokenizer, template, messages, max_new_tokens, stream=True)


def read_tools(path: str | Path) -> list[dict[str, Any]]:
    """The tool specs in a JSON file (a list, or one spec), in OpenAI form; a clear error when it is not."""
    import json

    from .errors import DataError
    from .formats import parse_tools

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path), line=exc.lineno) from None
    except OSError as exc:
        raise DataError(f"cannot read the tools file: {exc.strerror}", source=str(path)) from None
    try:
        return parse_tools(value, "tools")
    except DataError as exc:
        raise exc.located(source=str(path)) from None


def chat_with_run(run_dir: str | Path, max_new_tokens: int = 256) -> None:
    """``sft chat RUN_DIR``: a terminal chat; an empty line or end of input quits."""
    model, tokenizer, template, _cfg = load_run(run_dir)
    history: list[Message] = []
    print(f"Chatting with {Path(run_dir)} (template {template.name}). Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append(Message("user", line))
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        reply = generate_reply(model, tokenizer, template, history, max_new_tokens, stream=True)
        history.append(Message("assistant", reply))
