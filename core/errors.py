"""Errors that `sft` shows to users.

Every error a user can cause says *where* (file, line, row, field or config key) and,
where one fits, offers a did-you-mean. The CLI prints these without a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "SftError",
    "ConfigError",
    "ConfigProblem",
    "DataError",
    "PluginError",
    "UnknownPluginError",
    "did_you_mean",
    "as_user_error",
    "refused_pickle",
]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest candidate, case aside (GGUF, ChatML), or "" when none is close."""
    by_lower = {str(c).lower(): str(c) for c in candidates}
    matches = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[matches[0]]}'?)" if matches else ""


class SftError(Exception):
    """Base class of errors that carry a user-facing message. Exit code 1 unless overridden."""

    exit_code = 1


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: the dotted key it concerns and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(SftError):
    """Every problem found in a config, reported at once. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: Sequence[ConfigProblem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} config error(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(SftError):
    """A problem with the training data, located as precisely as the source allows.

    Args:
        message: what is wrong.
        source: file path or hub dataset name.
        line: 1-based line in ``source`` (JSON/JSONL), when known.
        row: 0-based row index within the source, when known.
        field: the column or key concerned, when there is one.
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ):
        self.message = message
        self.source = source
        self.line = line
        self.row = row
        self.field = field
        super().__init__(self._render())

    def located(self, **where) -> "DataError":
        """Return a copy with the given location parts filled in where still unknown."""
        parts = {k: getattr(self, k) for k in ("source", "line", "row", "field")}
        for key, value in where.items():
            if parts.get(key) is None:
                parts[key] = value
        return DataError(self.message, **parts)

    def _render(self) -> str:
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line is not None else "")
        bits = [b for b in (where, f"row {self.row}" if self.row is not None else "") if b]
        if self.field:
            bits.append(f"field '{self.field}'")
        prefix = ", ".join(bits)
        return f"{prefix}: {self.message}" if prefix else self.message


class PluginError(SftError):
    """A plugin is broken or two plugins clash."""


class UnknownPluginError(PluginError, ConfigError):
    """A config names a plugin that is not registered."""

    def __init__(self, kind: str, name: str, available: Sequence[str], key: str):
        msg = f"unknown {kind} '{name}'{did_you_mean(name, available)}; available: {', '.join(sorted(available)) or 'none'}"
        ConfigError.__init__(self, [ConfigProblem(key, msg)])


def as_user_error(exc: BaseException) -> SftError | None:
    """The one-line :class:`SftError` for a library exception that a user's input or setup caused, else None.

    The CLI prints these instead of a traceback: remote code the config did not allow, a chat
    template that the Jinja sandbox stopped, a pickle that ``torch.load(weights_only=True)``
    refused, a folder that cannot be written. Recognised by type name, so nothing heavy is imported.
    """
    import pickle

    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return SftError(f"model.trust_remote_code: the model needs its own Python code to load, and the config does "
                        f"not allow it; set model.trust_remote_code=true only if you trust that code ({text})")
    if name == "SecurityError" and type(exc).__module__.startswith("jinja2"):
        return SftError(f"a chat template tried something the Jinja sandbox forbids, so it was stopped: {text}")
    if isinstance(exc, pickle.UnpicklingError):
        return refused_pickle(exc, "a pickle file")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (13, 28, 30)):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return SftError(f"cannot write{where}: {exc.strerror or text}")
    if isinstance(exc, OSError) and exc.filename and exc.strerror:  # a path that is not what sft needs there
        also = f" (-> {exc.filename2})" if exc.filename2 else ""
        return SftError(f"{exc.filename}{also}: {exc.strerror}")
    return None


def refused_pickle(exc: BaseException, where: str) -> SftError:
    """One line for a pickle that ``torch.load(weights_only=True)`` refused: the file and what it asks
    for, never torch's own advice (to load it again with ``weights_only=False``, running its code)."""
    import re

    wants = re.search(r"GLOBAL ([\w.]+)", str(exc))
    asks = f"it asks for {wants.group(1)}, which weights never need" if wants else "it holds more than weights"
    return SftError(f"refused to load {where}: {asks}; it was not written by sft, so it is not loaded")
