"""Ollama's Modelfile parser (ollama/ollama parser/parser.go, ``ParseFile``), state for state, in Python.

Written from the Go source so the tests read a Modelfile the way ``ollama create`` does:
there are no escapes; a value ends at the first line break after which its text, trimmed,
is a complete quoted string (``"..."`` or ``\"\"\"...\"\"\"``) or is unquoted; spaces never end it;
runes that are not printable are dropped (spaces, tabs and line breaks inside a value stay).
Returns the commands as ``(name, args)`` pairs, ``FROM`` as ``model``.
"""

from __future__ import annotations

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)


class ModelfileError(ValueError):
    pass


def _space(r: str) -> bool:
    return r in " \t"


def _newline(r: str) -> bool:
    return r in "\r\n"


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def _alpha(r: str) -> bool:
    return r.isascii() and r.isalpha()


def _parse_rune(r: str, state: int) -> tuple[int, str]:
    """parseRuneForState: the next state and the rune to keep ("" for Go's 0)."""
    if state == NIL:
        if r == "#":
            return COMMENT, ""
        return (NIL, "") if (_space(r) or _newline(r)) else (NAME, r)
    if state == NAME:
        if _alpha(r):
            return NAME, r
        if _space(r):
            return VALUE, ""
        raise ModelfileError("command must be one of " + ", ".join(sorted(COMMANDS)))
    if state == VALUE:
        return (NIL, r) if (_newline(r) or _space(r)) else (VALUE, r)
    if state == PARAMETER:
        if _alpha(r) or r.isdigit() and r.isascii() or r == "_":
            return PARAMETER, r
        if _space(r):
            return VALUE, ""
        raise ModelfileError("unexpected EOF")
    if state == MESSAGE:
        if _alpha(r):
            return MESSAGE, r
        if _space(r):
            return VALUE, ""
        raise ModelfileError("unexpected EOF")
    return (NIL, "") if _newline(r) else (COMMENT, "")


def _printable(r: str) -> bool:  # Go's strconv.IsPrint: printable runes and the ASCII space
    return r == " " or (r.isprintable() and not r.isspace())


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    commands: list[tuple[str, str]] = []
    state, buf, name, role = NIL, "", "", ""
    for r in text:
        nxt, kept = _parse_rune(r, state)
        if nxt != state:
            if state == NAME:
                if buf.lower() not in COMMANDS:
                    raise ModelfileError(f"invalid command {buf!r}")
                s = buf.lower()
                if s == "from":
                    name = "model"
                elif s == "parameter":
                    nxt = PARAMETER
                elif s == "message":
                    nxt, name = MESSAGE, s
                else:
                    name = s
            elif state == PARAMETER:
                name = buf
            elif state == MESSAGE:
                if buf not in ("system", "user", "assistant"):
                    raise ModelfileError("invalid message role")
                role = buf
            elif state == VALUE:
                value, ok = _unquote(buf.strip())
                if not ok or _space(kept):
                    buf += kept
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buf = ""
            state = nxt
        if kept and _printable(kept):
            buf += kept
    if state == VALUE:
        value, ok = _unquote(buf.strip())
        if not ok:
            raise ModelfileError("unexpected EOF")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF")
    if not any(n == "model" for n, _ in commands):
        raise ModelfileError("no FROM line")
    return commands
