"""The part of Go's text/template that Ollama's chat templates use, rendered in Python, so an
exported Modelfile's TEMPLATE can be checked against the tokenizer's own chat template here,
where Ollama cannot be installed.

Covered, with Go's semantics: text, `{{ pipeline }}` output, `{{-` / `-}}` whitespace trimming,
`if` / `else if` / `else` / `end`, `range PIPE` and `range $i, $v := PIPE` (dot becomes the
element), fields (`.Role`, `$.System`, `$v.Content`), variables, string and number literals,
and the functions `eq`, `ne`, `and`, `or`, `not`, `len`, `slice`, `index` with parenthesised
calls. Anything else is refused (TemplateError), never guessed.
"""

from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.DOTALL)
TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(-?\d+)|'
                   r'(\$?[A-Za-z_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\$[A-Za-z_][A-Za-z0-9_]*|\$|\.)|([A-Za-z_][A-Za-z0-9_]*))')


class TemplateError(ValueError):
    """A template this renderer does not cover, or one Go would reject."""


def _tokens(text: str) -> list[str]:
    found, position = [], 0
    text = text.strip()
    while position < len(text):
        match = TOKEN.match(text, position)
        if not match or match.end() == position:
            raise TemplateError(f"cannot read {text[position:]!r} in {{{{ {text} }}}}")
        found.append(match.group(0).strip())
        position = match.end()
    return found


def _parse(text: str) -> list[Any]:
    """Nodes: ("text", s), ("out", tokens), ("if", [(tokens, body)...], else_body),
    ("range", names, tokens, body), ("set", name, tokens)."""
    pieces: list[tuple[str, Any]] = []
    last = 0
    for match in ACTION.finditer(text):
        before = text[last:match.start()]
        if match.group(1):
            before = before.rstrip(" \t\r\n")
        pieces.append(("text", before))
        pieces.append(("action", match.group(2).strip()))
        last = match.end()
        if match.group(3):
            rest = text[last:]
            last += len(rest) - len(rest.lstrip(" \t\r\n"))
    pieces.append(("text", text[last:]))
    nodes, index = _block(pieces, 0, top=True)
    return nodes


def _block(pieces, index: int, top: bool = False):
    nodes: list[Any] = []
    while index < len(pieces):
        kind, value = pieces[index]
        index += 1
        if kind == "text":
            if value:
                nodes.append(("text", value))
            continue
        words = value.split(None, 1)
        head = words[0] if words else ""
        if head in ("end", "else"):
            if top:
                raise TemplateError(f"{{{{ {value} }}}} without an open block")
            return nodes, index - 1
        if head == "if":
            branches, otherwise = [], []
            condition = _tokens(words[1])
            while True:
                body, index = _block(pieces, index)
                branches.append((condition, body))
                if index >= len(pieces):
                    raise TemplateError("an if block is not closed with {{ end }}")
                closing = pieces[index][1]
                index += 1
                if closing == "end":
                    break
                if closing.startswith("else if "):
                    condition = _tokens(closing[len("else if "):])
                    continue
                if closing == "else":
                    otherwise, index = _block(pieces, index)
                    if index >= len(pieces) or pieces[index][1] != "end":
                        raise TemplateError("an else block is not closed with {{ end }}")
                    index += 1
                    break
                raise TemplateError(f"unexpected {{{{ {closing} }}}}")
            nodes.append(("if", branches, otherwise))
        elif head == "range":
            spec = words[1]
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            body, index = _block(pieces, index)
            if index >= len(pieces) or pieces[index][1] != "end":
                raise TemplateError("a range block is not closed with {{ end }} (range ... else is not covered)")
            index += 1
            nodes.append(("range", names, _tokens(spec), body))
        elif value.startswith("$") and re.match(r"\$\w+\s*:?=", value):
            name, expression = re.split(r":?=", value, maxsplit=1)
            nodes.append(("set" if ":=" in value else "assign", name.strip(), _tokens(expression)))
        elif head in ("break", "continue") and len(words) == 1:
            nodes.append((head,))
        elif head in ("define", "template", "block", "with"):
            raise TemplateError(f"{{{{ {head} }}}} is not covered by this renderer")
        else:
            nodes.append(("out", _tokens(value)))
    if not top:
        raise TemplateError("a block is not closed with {{ end }}")
    return nodes, index


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (hasattr(value, "__len__") and len(value) == 0)


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "len": len, "index": lambda a, *keys: _index(a, keys), "slice": lambda a, *i: a[i[0]:(i[1] if len(i) > 1 else None)]
    if i else a,
}


def _index(value: Any, keys) -> Any:
    for key in keys:
        value = value[key]
    return value


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        if name not in value:
            raise TemplateError(f"no field {name}")
        return value[name]
    raise TemplateError(f"field {name} of a {type(value).__name__}")


class _Scope:
    def __init__(self, root: Any):
        self.root, self.variables = root, [{"$": root}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.variables):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")


def _evaluate(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    value, rest = _command(tokens, 0, dot, scope)
    if rest != len(tokens):
        raise TemplateError(f"cannot read {' '.join(tokens)}")
    return value


def _command(tokens: list[str], index: int, dot: Any, scope: _Scope, nested: bool = False):
    args: list[Any] = []
    name = tokens[index] if index < len(tokens) else ""
    if name in FUNCTIONS or name in ("and", "or"):
        index += 1
        while index < len(tokens) and tokens[index] != ")":
            value, index = _operand(tokens, index, dot, scope)
            args.append(value)
        if name == "and":
            result = next((a for a in args if not _truth(a)), args[-1] if args else None)
        elif name == "or":
            result = next((a for a in args if _truth(a)), args[-1] if args else None)
        else:
            result = FUNCTIONS[name](*args)
        return result, index
    value, index = _operand(tokens, index, dot, scope)
    if not nested and index < len(tokens):
        raise TemplateError(f"cannot read {' '.join(tokens)}")
    return value, index


def _operand(tokens: list[str], index: int, dot: Any, scope: _Scope):
    token = tokens[index]
    if token == "(":
        value, index = _command(tokens, index + 1, dot, scope, nested=True)
        if index >= len(tokens) or tokens[index] != ")":
            raise TemplateError("unbalanced parentheses")
        return value, index + 1
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), index + 1
    if re.fullmatch(r"-?\d+", token):
        return int(token), index + 1
    if token == ".":
        return dot, index + 1
    if token.startswith("$"):
        head, _, path = token.partition(".")
        value = scope.lookup(head)
        for part in filter(None, path.split(".")):
            value = _field(value, part)
        return value, index + 1
    if token.startswith("."):
        value = dot
        for part in token[1:].split("."):
            value = _field(value, part)
        return value, index + 1
    raise TemplateError(f"unknown function or value {token}")


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Jump(Exception):
    """{{ break }} or {{ continue }} inside a range."""


def _run(nodes: list[Any], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            out.append(_text(_evaluate(node[1], dot, scope)))
        elif kind == "set":
            scope.variables[-1][node[1]] = _evaluate(node[2], dot, scope)
        elif kind == "assign":  # $x = ...: the variable where it was declared
            frame = next((f for f in reversed(scope.variables) if node[1] in f), None)
            if frame is None:
                raise TemplateError(f"undefined variable {node[1]}")
            frame[node[1]] = _evaluate(node[2], dot, scope)
        elif kind in ("break", "continue"):
            raise _Jump(kind)
        elif kind == "if":
            scope.variables.append({})  # variables declared in a block live in it
            try:
                for condition, body in node[1]:
                    if _truth(_evaluate(condition, dot, scope)):
                        _run(body, dot, scope, out)
                        break
                else:
                    _run(node[2], dot, scope, out)
            finally:
                scope.variables.pop()
        elif kind == "range":
            items = _evaluate(node[2], dot, scope) or []
            for position, item in enumerate(items):
                scope.variables.append({})
                if len(node[1]) == 1:
                    scope.variables[-1][node[1][0]] = item
                elif len(node[1]) == 2:
                    scope.variables[-1].update({node[1][0]: position, node[1][1]: item})
                try:
                    _run(node[3], item, scope, out)
                except _Jump as jump:
                    if jump.args[0] == "break":
                        break
                finally:
                    scope.variables.pop()


def render(template: str, data: dict[str, Any]) -> str:
    """`template` rendered with `data` as dot, as Go's text/template would."""
    out: list[str] = []
    _run(_parse(template), data, _Scope(data), out)
    return "".join(out)
