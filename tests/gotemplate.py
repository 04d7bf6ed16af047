"""A small interpreter for the part of Go's text/template that Ollama's chat templates use, so the
tests can render a Modelfile's TEMPLATE (no Go toolchain or Ollama here).

Follows the text/template documentation (https://pkg.go.dev/text/template): text and ``{{ }}``
actions; ``{{- `` trims the white space before an action, `` -}}`` the white space after it;
``if`` / ``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $m :=``), variables declared with
``:=`` and assigned with ``=`` (scoped to the enclosing control structure), ``$`` for the data;
fields ``.A.B`` and ``$x.A``; string, number and boolean literals; parenthesised calls of the
built-in functions ``eq ne and or not len slice index`` and Ollama's ``currentDate``; Go's
truth (false, 0, nil and empty strings, slices and maps are false). Anything else raises
``TemplateSyntaxError``, so an unsupported construct fails the test instead of rendering wrongly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable


class TemplateSyntaxError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:\\.|[^"\\])*")|(:=|=|,|\(|\))|(\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)'
                    r"|(\.(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?)|(-?\d+)|([A-Za-z_][A-Za-z0-9_]*))")


def _lex(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = src[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        out.append(("text", text))
    if "{{" in "".join(t for k, t in out if k == "text"):
        raise TemplateSyntaxError("unclosed action")
    return out


def _tokens(s: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise TemplateSyntaxError(f"cannot read {s[pos:]!r}")
        kinds = ("str", "punct", "var", "field", "num", "ident")
        kind = next(k for k, g in zip(kinds, m.groups()) if g is not None)
        out.append((kind, m.group(m.lastindex)))
        pos = m.end()
    return out


@dataclass
class Node:
    kind: str  # text, out, if, range, set
    value: Any = None
    branches: list = field(default_factory=list)  # if: [(cond tokens | None, body)]
    body: list = field(default_factory=list)
    names: tuple = ()
    declare: bool = False


def _parse(items: list[tuple[str, str]]) -> list[Node]:
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list[Node], str | None]:
        nonlocal pos
        nodes: list[Node] = []
        while pos < len(items):
            kind, s = items[pos]
            pos += 1
            if kind == "text":
                nodes.append(Node("text", s))
                continue
            word = s.split(None, 1)[0] if s else ""
            if word in ("end", "else"):
                if word not in stop:
                    raise TemplateSyntaxError(f"unexpected {{{{ {s} }}}}")
                return nodes, s
            if word == "if":
                n = Node("if")
                cond = _tokens(s[2:])
                while True:
                    body, ended = block(("end", "else"))
                    n.branches.append((cond, body))
                    if ended is None:
                        raise TemplateSyntaxError("if without end")
                    if ended == "end":
                        break
                    rest = ended[4:].strip()
                    if rest.startswith("if "):
                        cond = _tokens(rest[3:])
                    elif rest == "":
                        cond = None
                    else:
                        raise TemplateSyntaxError(f"bad else: {ended!r}")
                nodes.append(n)
            elif word == "range":
                rest = s[5:].strip()
                names: tuple = ()
                m = re.match(r"(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)$", rest, re.S)
                if m:
                    names = tuple(x for x in (m.group(1), m.group(2)) if x)
                    rest = m.group(3)
                body, ended = block(("end",))
                if ended != "end":
                    raise TemplateSyntaxError("range without end")
                nodes.append(Node("range", _tokens(rest), body=body, names=names))
            elif word in ("with", "define", "template", "block", "break", "continue"):
                raise TemplateSyntaxError(f"{word} is not supported by this interpreter")
            else:
                m = re.match(r"(\$\w+)\s*(:=|=)\s*(.*)$", s, re.S)
                if m:
                    nodes.append(Node("set", _tokens(m.group(3)), names=(m.group(1),), declare=m.group(2) == ":="))
                else:
                    nodes.append(Node("out", _tokens(s)))
        if stop:
            raise TemplateSyntaxError(f"missing {{{{ end }}}} (expected one of {stop})")
        return nodes, None

    nodes, _ = block(())
    return nodes


def truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "<no value>"
    return str(v)


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise TemplateSyntaxError(f"undefined variable {name}")

    def declare(self, name: str, v: Any) -> None:
        self.frames[-1][name] = v

    def assign(self, name: str, v: Any) -> None:
        for f in reversed(self.frames):
            if name in f:
                f[name] = v
                return
        raise TemplateSyntaxError(f"assignment to undeclared variable {name}")


def _field(v: Any, names: list[str]) -> Any:
    for n in names:
        if isinstance(v, dict):
            if n not in v:
                raise TemplateSyntaxError(f"no field {n} in {sorted(v)}")
            v = v[n]
        else:
            raise TemplateSyntaxError(f"field {n} of a non-struct {v!r}")
    return v


def _funcs(extra: dict[str, Callable]) -> dict[str, Callable]:
    def eq(a, *bs):
        return any(a == b for b in bs)

    def and_(*xs):
        for x in xs:
            if not truth(x):
                return x
        return xs[-1]

    def or_(*xs):
        for x in xs:
            if truth(x):
                return x
        return xs[-1]

    def slice_(x, *idx):
        if len(idx) == 1:
            return x[idx[0]:]
        if len(idx) == 2:
            return x[idx[0]:idx[1]]
        return x

    f = {"eq": eq, "ne": lambda a, b: a != b, "and": and_, "or": or_, "not": lambda x: not truth(x),
         "len": len, "slice": slice_, "index": lambda x, i: x[i]}
    f.update(extra)
    return f


def _eval(toks: list[tuple[str, str]], dot: Any, scope: _Scope, funcs: dict[str, Callable]) -> Any:
    pos = 0

    def operand() -> Any:
        nonlocal pos
        kind, s = toks[pos]
        pos += 1
        if kind == "punct" and s == "(":
            v = command(stop=")")
            if pos >= len(toks) or toks[pos] != ("punct", ")"):
                raise TemplateSyntaxError("unbalanced parenthesis")
            pos += 1
            return v
        if kind == "str":
            return json.loads(s)
        if kind == "num":
            return int(s)
        if kind == "field":
            return dot if s == "." else _field(dot, s[1:].split("."))
        if kind == "var":
            name, *names = s.split(".")
            return _field(scope.get(name), names)
        if kind == "ident":
            if s in ("true", "false"):
                return s == "true"
            if s == "nil":
                return None
            if s in funcs:
                return ("func", s)
            raise TemplateSyntaxError(f"function {s!r} not defined")
        raise TemplateSyntaxError(f"unexpected {s!r}")

    def command(stop: str | None = None) -> Any:
        nonlocal pos
        args = []
        while pos < len(toks) and not (stop and toks[pos] == ("punct", stop)):
            args.append(operand())
        if not args:
            raise TemplateSyntaxError("empty command")
        head = args[0]
        if isinstance(head, tuple) and head[:1] == ("func",):
            return funcs[head[1]](*args[1:])
        if len(args) > 1:
            raise TemplateSyntaxError(f"can't give argument to non-function {head!r}")
        return head

    v = command()
    if pos != len(toks):
        raise TemplateSyntaxError(f"unexpected {toks[pos:]!r}")
    return v


def _run(nodes: list[Node], dot: Any, scope: _Scope, funcs: dict[str, Callable], out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.value)
        elif n.kind == "out":
            out.append(_show(_eval(n.value, dot, scope, funcs)))
        elif n.kind == "set":
            v = _eval(n.value, dot, scope, funcs)
            (scope.declare if n.declare else scope.assign)(n.names[0], v)
        elif n.kind == "if":
            for cond, body in n.branches:
                if cond is None or truth(_eval(cond, dot, scope, funcs)):
                    scope.frames.append({})
                    _run(body, dot, scope, funcs, out)
                    scope.frames.pop()
                    break
        elif n.kind == "range":
            seq = _eval(n.value, dot, scope, funcs)
            for i, item in enumerate(seq or []):
                scope.frames.append({})
                if len(n.names) == 2:
                    scope.declare(n.names[0], i)
                    scope.declare(n.names[1], item)
                elif len(n.names) == 1:
                    scope.declare(n.names[0], item)
                _run(n.body, item, scope, funcs, out)
                scope.frames.pop()


def render(src: str, data: dict[str, Any], **funcs: Callable) -> str:
    """``src`` executed on ``data`` (``{"System": ..., "Messages": [{"Role", "Content", ...}]}``)."""
    nodes = _parse(_lex(src))
    out: list[str] = []
    _run(nodes, data, _Scope(data), _funcs(funcs), out)
    return "".join(out)


def ollama_data(messages: list[dict[str, str]], system: str | None = None) -> dict[str, Any]:
    """The values Ollama gives a template for a chat: ``.System`` (the system messages, joined)
    and ``.Messages`` (all of them, system ones included) with Role, Content and Thinking."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += list(messages)
    sys_text = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return {"System": sys_text,
            "Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": m.get("reasoning", "")}
                         for m in msgs]}
