"""A small interpreter for the subset of Go's text/template that Ollama TEMPLATEs use.

Enough to render the templates `sft` generates and the usual hand-written ones, so tests can
check that an Ollama template produces exactly the text the model was trained on:
literal text, ``{{ .Field }}``, ``{{ $.Field }}``, ``{{ $var }}``, ``{{ $x := expr }}``,
``if``/``else if``/``else``/``end``, ``range [$i, $v :=] .List``, trim markers ``{{-``/``-}}``,
``$var.Field`` and ``(expr).Field``, ``$x = expr`` assigning an outer variable (as Go does across
``range`` iterations), and the functions ``eq``, ``ne``, ``not``, ``and``, ``or``, ``len``,
``slice``, ``index``, ``json`` (Go's ``json.Marshal``: compact, map keys sorted). Anything else
raises, so a template using more than this fails the test loudly. Values that Ollama prints
through a ``String()`` method (a tool's ``.Function``, a call's ``.Function.Arguments``) print as
compact JSON when given as :class:`GoJSON`.
"""

from __future__ import annotations

import json
import re
from collections import ChainMap
from typing import Any

__all__ = ["render_go_template", "GoJSON", "go_json"]


def go_json(value: Any) -> str:
    """What Go's ``json.Marshal`` writes for plain data: compact, map keys sorted."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


class GoJSON(dict):
    """A dict that prints as Go's ``json.Marshal`` output (Ollama's ``String()`` methods on tools and arguments).

    Its fields read as Go's exported names: ``.Function.Name`` finds the ``function`` / ``name`` keys.
    """

    def __str__(self) -> str:
        return go_json(self)

    def get(self, key, default=None):
        if key not in self and key[:1].lower() + key[1:] in self:
            key = key[:1].lower() + key[1:]
        value = super().get(key, default)
        return GoJSON(value) if isinstance(value, dict) and not isinstance(value, GoJSON) else value

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def _parse(template: str) -> list:
    """A list of nodes: str (text) or ("out", expr) / ("set", var, expr) / ("if", [(cond, body)], else) / ("range", ...)."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1) == "-":
            text = text.rstrip()
        pieces.append(("text", text))
        pieces.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3) == "-":
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    pieces.append(("text", template[pos:]))
    nodes, i = _block(pieces, 0, top=True)
    return nodes


def _block(pieces, i, top=False):
    nodes: list = []
    while i < len(pieces):
        kind, value = pieces[i]
        if kind == "text":
            if value:
                nodes.append(value)
            i += 1
            continue
        head = value.split(None, 1)[0] if value else ""
        if head in ("end", "else"):
            if top:
                raise ValueError(f"unexpected {{{{ {value} }}}}")
            return nodes, i
        if head == "if":
            branches = []
            cond = value[2:].strip()
            while True:
                body, i = _block(pieces, i + 1)
                branches.append((cond, body))
                action = pieces[i][1]
                if action == "end":
                    nodes.append(("if", branches, []))
                    break
                if action.startswith("else if "):
                    cond = action[len("else if "):].strip()
                    continue
                if action == "else":
                    other, i = _block(pieces, i + 1)
                    if pieces[i][1] != "end":
                        raise ValueError("expected {{ end }}")
                    nodes.append(("if", branches, other))
                    break
                raise ValueError(f"unexpected {{{{ {action} }}}}")
            i += 1
            continue
        if head == "range":
            spec = value[len("range"):].strip()
            names: list[str] = []
            if ":=" in spec:
                left, spec = (s.strip() for s in spec.split(":=", 1))
                names = [n.strip() for n in left.split(",")]
            body, i = _block(pieces, i + 1)
            if pieces[i][1] != "end":
                raise ValueError("range without {{ end }}")
            nodes.append(("range", names, spec, body))
            i += 1
            continue
        m = re.match(r"^(\$\w+)\s*(:?=)\s*(.*)$", value)
        if m:
            nodes.append(("set", m.group(1), m.group(3), m.group(2) == "="))
        else:
            nodes.append(("out", value))
        i += 1
    if not top:
        raise ValueError("missing {{ end }}")
    return nodes, i


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr)


def _eval(expr: str, dot: Any, root: Any, env: dict) -> Any:
    tokens = _tokens(expr)
    value, rest = _call(tokens, 0, dot, root, env)
    if rest != len(tokens):
        raise ValueError(f"cannot parse {expr!r}")
    return value


def _operand(tokens, i, dot, root, env):
    token = tokens[i]
    if token == "(":
        value, i = _call(tokens, i + 1, dot, root, env)
        if tokens[i] != ")":
            raise ValueError("missing )")
        if i + 1 < len(tokens) and tokens[i + 1].startswith(".") and tokens[i + 1] != ".":
            return _field(value, tokens[i + 1][1:]), i + 2
        return value, i + 1
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), i + 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), i + 1
    if token in ("true", "false"):
        return token == "true", i + 1
    if token.startswith("$."):
        return _field(root, token[2:]), i + 1
    if token.startswith("$"):
        name, _, path = token.partition(".")
        return (_field(env[name], path) if path else env[name]), i + 1
    if token == ".":
        return dot, i + 1
    if token.startswith("."):
        return _field(dot, token[1:]), i + 1
    raise ValueError(f"unsupported token {token!r}")


def _field(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *a: all(a),
    "or": lambda *a: any(a),
    "len": len,
    "slice": lambda s, i=0, j=None: s[i:j],  # Go: slice x 1 2 is x[1:2]
    "index": lambda s, i: s[i],
    "json": go_json,
}


def _call(tokens, i, dot, root, env):
    if tokens[i] in _FUNCS:
        name = tokens[i]
        i += 1
        args = []
        while i < len(tokens) and tokens[i] != ")":
            value, i = _operand(tokens, i, dot, root, env)
            args.append(value)
        return _FUNCS[name](*args), i
    return _operand(tokens, i, dot, root, env)


def _run(nodes: list, dot: Any, root: Any, env: dict, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, root, env)))
        elif node[0] == "set":
            value = _eval(node[2], dot, root, env)
            if node[3]:  # `$x = v` assigns the variable where it was declared
                scope = next((m for m in env.maps if node[1] in m), None) if isinstance(env, ChainMap) else env
                if scope is None:
                    raise ValueError(f"assignment to undeclared {node[1]}")
                scope[node[1]] = value
            else:
                env[node[1]] = value
        elif node[0] == "if":
            for cond, body in node[1]:
                if _eval(cond, dot, root, env):
                    _run(body, dot, root, env, out)
                    break
            else:
                _run(node[2], dot, root, env, out)
        elif node[0] == "range":
            _, names, spec, body = node
            for index, item in enumerate(_eval(spec, dot, root, env) or ()):  # Go ranges over nil as empty
                scope = env.new_child() if isinstance(env, ChainMap) else ChainMap({}, env)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = index, item
                elif len(names) == 1:
                    scope[names[0]] = item
                _run(body, item, root, scope, out)


def render_go_template(template: str, data: dict) -> str:
    """Render ``template`` with ``data`` (e.g. ``{"System": "...", "Messages": [{"Role": "user", "Content": "..."}]}``)."""
    out: list[str] = []
    _run(_parse(template), data, data, ChainMap({}), out)
    return "".join(out)
