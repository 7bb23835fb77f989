"""Generation with a trained run: ``sft generate``, ``sft chat`` and the quick check after training.

Everything goes through :func:`generate_reply`, so the quick generation that training prints
and stores in ``summary.json`` renders and stops exactly like ``sft generate`` does: the
run's chat template builds the prompt (:meth:`ChatTemplate.generation_prompt`), and it
stops at the template's stop tokens. Decoding is greedy unless a ``temperature`` above 0 asks
for sampling (``top_p``, and a ``seed`` that makes a sampled answer repeatable).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sft.core.errors import SftError
from sft.core.interfaces import Conversation, Message, tools_of

if TYPE_CHECKING:
    from sft.core.interfaces import ChatTemplate

__all__ = ["generate_reply", "load_run", "generate_from_run", "chat_with_run", "first_user_prompt", "read_tools",
           "export_answerer"]


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


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """``generate()`` arguments: greedy at temperature 0, else sampling with ``top_p``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise SftError(f"temperature must be >= 0 and top_p in (0, 1]; got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        # Sampling knobs from the model's generation_config would only raise warnings.
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": None}


def with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    """``messages`` with ``system`` as the first (system) turn, replacing one already there (tools kept)."""
    if not system:
        return messages if isinstance(messages, list) else list(messages)
    rest = list(messages[1:] if messages and messages[0].role == "system" else messages)
    return Conversation([Message("system", system), *rest], tools_of(messages))


def generate_reply(model: Any, tokenizer: Any, template: "ChatTemplate", messages: Sequence[Message],
                   max_new_tokens: int = 128, stream: bool = False, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None) -> str:
    """Decode the next assistant turn for ``messages``; return its text without stop tokens.

    Greedy by default; ``temperature`` > 0 samples (with ``top_p``), from ``seed`` when given.
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
    kwargs.update(sampling_kwargs(temperature, top_p))
    if seed is not None:
        from transformers import set_seed

        set_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=int(max_new_tokens),
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


def load_run(run_dir: str | Path, cfg: Any = None, template: "ChatTemplate | None" = None,
             pm: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any, "ChatTemplate", Any]:
    """Load ``(model, tokenizer, template, cfg)`` of a finished run: the base model plus the run's adapter.

    The tokenizer comes from ``adapter/`` (it carries the template's chat_template and any
    added tokens); ``cfg`` defaults to the run's ``config.yaml`` (validated like any config;
    its ``model.trust_remote_code`` needs ``trust_remote_code``, the ``--trust-remote-code``
    flag) and ``template`` to the one it configures. A caller that already holds both
    (``sft eval``) hands them in, so the template is resolved once.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .configuration import load_run_config
    from sft.core.env import current_environment
    from .libraries import quiet_known_warnings
    from .model_files import check_model_folder
    from .models import forget_gguf_quantization, pretrained_kwargs, resolve_model
    from sft.core.rundir import RunDir
    from sft.core.templating import resolve_template

    run = RunDir.of(run_dir)
    if not run.config.is_file():
        raise SftError(f"{run.root}: not a run directory (no config.yaml)")
    if not run.adapter.is_dir():
        raise SftError(f"{run.root}: the run has no adapter/ yet (did training finish?)")
    if cfg is None:
        cfg = load_run_config(run.config, pm=pm, trust_remote_code=trust_remote_code)
    # The answer streams to the terminal; a "Loading weights" bar in front of it is noise.
    hf_logging.disable_progress_bar()
    quiet_known_warnings()
    if template is None:
        template = resolve_template(cfg, pm)
    env = current_environment()
    dtype = torch.float32 if not env.cuda else (torch.bfloat16 if env.bf16 else torch.float16)
    # The run's own files (adapter/) need the base model's remote code too, never its revision or GGUF file.
    own = {"trust_remote_code": bool(cfg.model.trust_remote_code)}
    check_model_folder(run.adapter)
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


def read_tools(path: str | Path) -> list[dict[str, Any]]:
    """The tool specs in a JSON file (a list, or one spec), in OpenAI form; a clear error when it is not."""
    import json

    from sft.core.errors import DataError
    from sft.core.formats import parse_tools

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


def export_answerer(run_dir: str | Path, exporter: str, file: str | None = None, pm: Any = None) -> Any:
    """``answer(messages, settings) -> str`` from the run's ``exporter`` export (``sft chat --export``):
    the exporter's own :meth:`~sft.core.interfaces.Exporter.answer`, on the files its export wrote
    (or on ``file``)."""
    from sft.core.plugins import get_plugin_manager
    from sft.core.rundir import RunDir

    run = RunDir.of(run_dir)
    plugin = (pm or get_plugin_manager()).get("exporter", exporter, "--export")
    record = (run.read_summary().get("exports") or {}).get(exporter) or {}
    if file is not None:
        paths = [str(Path(file).expanduser())]
    elif record.get("ok"):
        paths = list(record.get("paths") or [])
    else:
        raise SftError(f"{run.root} has no {exporter} export yet; make one with: sft export {run.root} --exporter {exporter}")

    def answer(messages: Sequence[Message], settings: dict[str, Any]) -> str:
        try:
            return plugin.answer(paths, [{"role": m.role, "content": m.content} for m in messages], settings)
        except NotImplementedError as exc:
            raise SftError(str(exc)) from None

    return answer


def generate_from_run(run_dir: str | Path, prompt: str, max_new_tokens: int = 128, *, system: str | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                      stream: bool = True, export: str | None = None, file: str | None = None,
                      tools: Sequence[Any] | None = None, trust_remote_code: bool = False) -> str:
    """``sft generate RUN_DIR PROMPT [--tools FILE]``: stream the run's answer to ``prompt`` and return it.

    With ``tools`` (OpenAI function specs) the prompt declares them as training rows did, so a
    model trained on tool calls answers with one in its template's format.

    With ``export`` (``--gguf`` is ``export="gguf"``), the answer comes from that export's
    files through the exporter (llama.cpp for a GGUF), printed when it is complete."""
    sampling_kwargs(temperature, top_p)  # a bad value fails before the model loads
    messages = with_system(Conversation([Message("user", prompt)], tools or ()), system)
    if export is not None:
        text = export_answerer(run_dir, export, file)(messages, {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                                                 "top_p": top_p, "seed": seed})
        if stream:
            print(text, flush=True)
        return text
    model, tokenizer, template, _cfg = load_run(run_dir, trust_remote_code=trust_remote_code)
    return generate_reply(model, tokenizer, template, messages, max_new_tokens, stream=stream,
                          temperature=temperature, top_p=top_p, seed=seed)


def chat_with_run(run_dir: str | Path, max_new_tokens: int = 256, *, system: str | None = None,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  export: str | None = None, file: str | None = None, trust_remote_code: bool = False) -> None:
    """``sft chat RUN_DIR``: a terminal chat; an empty line or end of input quits. With
    ``export``, with that export's files (``--gguf``: the GGUF in llama.cpp)."""
    sampling_kwargs(temperature, top_p)
    if export is not None:
        answer = export_answerer(run_dir, export, file)
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}

        def exported_reply(history: list[Message]) -> str:
            text = answer(with_system(history, system), settings)
            print(f"bot> {text}", flush=True)
            return text

        chat_loop(f"the {export} export of {Path(run_dir)}", exported_reply)
        return
    model, tokenizer, template, _cfg = load_run(run_dir, trust_remote_code=trust_remote_code)

    def reply(history: list[Message]) -> str:
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        return generate_reply(model, tokenizer, template, with_system(history, system), max_new_tokens,
                              stream=True, temperature=temperature, top_p=top_p, seed=seed)

    chat_loop(f"{Path(run_dir)} (template {template.name})", reply)


def chat_loop(what: str, reply: Any) -> None:
    """The terminal chat of ``sft chat``: ``reply(history)`` answers (and prints) each turn."""
    history: list[Message] = []
    print(f"Chatting with {what}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append(Message("user", line))
        history.append(Message("assistant", reply(history)))
