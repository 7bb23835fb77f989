"""``model.from_run`` (``sft run --from RUN``): a new run that continues a finished one.

:func:`continued_run` is what the front door hands :func:`sft.engine.configuration.load_config` as its
``from_run``: it reads the finished run's ``config.yaml`` beneath the values given (the base
model, the LoRA shape, the template: :data:`CONTINUED_KEYS`), and refuses, at validation and
before anything is written, a run that is not finished or a base or template other than its
own. The run itself (:mod:`sft.engine.run`) then loads that run's tokenizer and adapter.
"""

from __future__ import annotations

from pathlib import Path

from .configuration import deep_merge, read_yaml
from sft.core.errors import ConfigError, ConfigProblem
from sft.core.rundir import RunDir

__all__ = ["CONTINUED_KEYS", "FIXED_BY_SOURCE", "continued_run"]


#: What a run continued with ``model.from_run`` takes from the finished run, beneath the values
#: given: the base model and how it was loaded, the LoRA shape its adapter has, the template.
CONTINUED_KEYS = {
    "model": ("name", "revision", "gguf_file", "method", "dtype", "max_seq_length", "trust_remote_code",
              "add_tokens", "add_special_tokens", "new_token_init", "new_token_descriptions"),
    "lora": None,  # every key: the adapter being continued has that shape
    "template": None,
}
#: Keys a continued run may not change: the adapter and the tokenizer belong to them.
FIXED_BY_SOURCE = ("model.name", "model.revision", "model.gguf_file", "template.name")


def continued_run(raw: dict, problems: list[ConfigProblem]) -> dict:
    """``model.from_run``: the finished run's model, LoRA and template settings beneath the values
    given; a run that is not finished, or a base or template other than that run's, is a problem
    (found here, at validation, before anything is written)."""
    source = (raw.get("model") or {}).get("from_run") if isinstance(raw.get("model"), dict) else None
    if source is None:
        return raw
    run = RunDir.of(Path(str(source)).expanduser())
    where = f"model.from_run={source}"
    if not run.config.is_file():
        problems.append(ConfigProblem("model.from_run", f"{source} is not a run directory (no config.yaml)"))
        return raw
    status = run.read_summary().get("status")
    if status != "ok" or not run.has_trained_model():
        state = f"its status is {status}" if status and status != "ok" else "it has no summary.json" if not status \
            else "its adapter/ is missing"
        problems.append(ConfigProblem("model.from_run", f"{source} is not a finished run ({state}); finish it first "
                                                         f"(sft run --resume with its config) or continue another run"))
        return raw
    try:
        earlier = read_yaml(str(run.config))
    except ConfigError as exc:
        problems += exc.problems
        return raw
    taken: dict = {}
    for section, keys in CONTINUED_KEYS.items():
        values = earlier.get(section) or {}
        taken[section] = {k: v for k, v in values.items() if keys is None or k in keys}
    given_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if taken["model"].get("trust_remote_code") is True and given_model.get("trust_remote_code") is not True:
        # A run folder cannot allow its model's code to run by itself (it may come from someone else).
        problems.append(ConfigProblem("model.trust_remote_code", f"{source}/config.yaml sets it to true, which runs the "
                                                                  f"model's own Python files; set "
                                                                  f"model.trust_remote_code=true yourself if you trust that code"))
        return raw
    for key in FIXED_BY_SOURCE:
        section, leaf = key.split(".")
        given = (raw.get(section) or {}).get(leaf) if isinstance(raw.get(section), dict) else None
        theirs = taken.get(section, {}).get(leaf)
        if given is not None and given != theirs:
            problems.append(ConfigProblem(key, f"{given!r} differs from {theirs!r}, which {source} was trained with; "
                                               f"{where} continues that run's adapter, so it keeps its {key} "
                                               f"(drop {key}, or train from the base without model.from_run)"))
    if (earlier.get("model") or {}).get("method") == "full":
        # A full fine-tune's adapter/ is the whole model: it becomes the base the new adapter trains on.
        taken["model"]["name"] = str(run.adapter)
    return deep_merge(taken, raw)
