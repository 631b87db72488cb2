"""Reading JSON and TOML a user may have edited by hand, without recursion trouble.

Python's JSON and TOML parsers, and everything that walks a parsed value later, recurse once
per level of nesting: 20000 levels end in a RecursionError traceback. So text is scanned
first (a scan cannot recurse) and refused when it nests deeper than :data:`MAX_NESTING`, with
the key under which it does. :func:`load_json` also refuses ``NaN``, ``Infinity`` and
``1e400``: they are not JSON numbers, and ``info --json`` and capsules would write them back
out as invalid JSON. Used for trace metadata, capsules, scenario files and ``--set`` values.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# tdxtrace writes at most 3 levels (a scenario's costs.NAME.FIELD); 64 leaves room for any
# hand-made value while staying far from Python's recursion limit (1000).
MAX_NESTING = 64
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JSONValueError(ValueError):
    """Valid JSON syntax that tdxtrace does not read: see :func:`load_json`."""


def json_too_deep(text: str, limit: int = MAX_NESTING) -> str | None:
    """None when ``text``'s arrays and objects nest at most ``limit`` levels deep; else the
    top-level key under which they nest deeper ("" when not under one).

    A scan of the text, not a parse, so it cannot recurse; strings are skipped whole.
    """
    depth = 0
    last_string = top_key = ""
    in_object = False
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token[0] == '"':
            if depth == 1:
                last_string = token
        elif token in "[{":
            depth += 1
            if depth == 1:
                in_object = token == "{"
            elif depth == 2:  # in an object, the string before a value is its key
                top_key = last_string if in_object else ""
            if depth > limit:
                return _unquoted(top_key)
        else:
            depth -= 1
    return None


def _unquoted(token: str) -> str:
    try:
        key = json.loads(token) if token else ""
    except ValueError:
        return token
    return key if isinstance(key, str) else ""


def _refuse_constant(name: str) -> float:
    raise JSONValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONValueError(f"{text} is too large for a JSON number (it reads as infinity)")
    return value


def load_json(text: str) -> Any:
    """``json.loads(text)``, refusing what :mod:`tdxtrace.trace.metadata` says it refuses.

    :class:`JSONValueError` (a ValueError) says which: too deep (under which key), or which
    number. Any other ValueError is a syntax error.
    """
    deep = json_too_deep(text)
    if deep is not None:
        where = f" (under key {deep!r})" if deep else ""
        raise JSONValueError(f"values are nested more than {MAX_NESTING} levels deep{where}")
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


# TOML's strings (all four kinds) and comments are skipped whole; what is left are the brackets
# and braces that nest values, the "=" of each key, and line ends.
_TOML_TOKENS = re.compile(r'"""(?:[^\\]|\\[\s\S])*?"""' r"|'''[\s\S]*?'''"
                          r'|"(?:[^"\\\n]|\\.)*"' r"|'[^'\n]*'|#[^\n]*|[\[\]{}=\n]")


def toml_too_deep(text: str) -> tuple[int, str] | None:
    """(line, key) where TOML ``text``'s arrays or inline tables first nest deeper than
    MAX_NESTING; None when they never do (scenario files, ``--set`` values). A scan, not a
    parse: tomllib recurses once per level and a 5000-deep value ends it in a RecursionError,
    before it could say where."""
    depth, line, start, table, key = 0, 1, 0, "", ""
    for match in _TOML_TOKENS.finditer(text):
        token = match.group()
        if token == "=" and depth == 0:
            key = text[start:match.start()].strip()
        elif token in ("[", "{"):
            if depth == 0 and not text[start:match.start()].strip():  # a [table] header
                table, key = text[match.end():].split("\n", 1)[0].split("]", 1)[0].strip(), ""
            depth += 1
            if depth > MAX_NESTING:
                return line, ".".join(k for k in (table, key) if k) or "(top level)"
        elif token in ("]", "}"):
            depth = max(0, depth - 1)
        line += token.count("\n")
        if token == "\n" and depth == 0:
            start = match.end()
    return None


def deepest_key(value: Any, path: str = "") -> str | None:
    """The dotted key under which ``value`` nests deeper than MAX_NESTING, else None.

    For parsed TOML: dotted keys (``a.b.c = 1``) nest tables without any bracket; tomllib
    reads 5000 of them fine, but the values' checks (and their repr in error messages) recurse.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_NESTING:
            return where or "(top level)"
        if isinstance(node, dict):
            stack += [(v, f"{where}.{k}" if where else str(k), depth + 1)
                      for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, where, depth + 1) for v in node]
    return None
