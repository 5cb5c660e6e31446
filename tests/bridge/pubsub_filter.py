"""A test stand-in for Pub/Sub's subscription filter language, written from its documented grammar, because the
Pub/Sub emulator stores a subscription's ``filter`` without applying it (tests/bridge/test_targeted_delivery.py
shows this). It is not Google's implementation: it covers what the documentation describes —

- ``attributes:KEY`` (the key is present), ``attributes.KEY = "v"``, ``attributes.KEY != "v"`` (a message without
  the key matches ``!=``), ``hasPrefix(attributes.KEY, "p")``;
- ``AND``, ``OR``, ``NOT`` (or ``-``), parentheses; ``AND`` and ``OR`` are not mixed without parentheses;
- a key of letters, digits, ``-`` and ``_`` unquoted, any other as a string literal; string literals in double
  quotes with backslash escapes; at most 256 bytes —

and refuses anything else, so a filter our hosts create that strays from that grammar fails here."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

MAX_FILTER_BYTES = 256
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>!=|[=:().,-])|(?P<word>[A-Za-z0-9_-]+))')

Predicate = Callable[[Mapping[str, str]], bool]


class FilterSyntaxError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise FilterSyntaxError(f"unexpected {text[pos:pos + 10]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _unquote(literal: str) -> str:
    return literal[1:-1].encode().decode("unicode_escape")


class _Parser:
    def __init__(self, text: str):
        self.t = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            raise FilterSyntaxError(f"expected {value or kind}, got {tok}")
        self.i += 1
        return tok[1]

    def expr(self) -> Predicate:
        first = self.term()
        tok = self.peek()
        if tok is None or tok[1] not in ("AND", "OR"):
            return first
        joiner = tok[1]
        parts = [first]
        while (tok := self.peek()) is not None and tok[1] in ("AND", "OR"):
            if tok[1] != joiner:
                raise FilterSyntaxError("AND and OR mixed without parentheses")
            self.take()
            parts.append(self.term())
        if joiner == "AND":
            return lambda a: all(p(a) for p in parts)
        return lambda a: any(p(a) for p in parts)

    def term(self) -> Predicate:
        tok = self.peek()
        if tok is not None and tok[1] in ("NOT", "-"):
            self.take()
            inner = self.term()
            return lambda a: not inner(a)
        if tok is not None and tok[1] == "(":
            self.take("(")
            inner = self.expr()
            self.take(")")
            return inner
        if tok is not None and tok[1] == "hasPrefix":
            self.take()
            self.take("(")
            key = self.attribute(".")
            self.take(",")
            prefix = _unquote(self.take(kind="str"))
            self.take(")")
            return lambda a: key in a and a[key].startswith(prefix)
        self.take("attributes", kind="word")
        sep = self.take()
        if sep == ":":
            key = self.key()
            return lambda a: key in a
        if sep != ".":
            raise FilterSyntaxError(f"expected . or : after attributes, got {sep!r}")
        key = self.key()
        op = self.take()
        value = _unquote(self.take(kind="str"))
        if op == "=":
            return lambda a: a.get(key) == value
        if op == "!=":
            return lambda a: a.get(key) != value
        raise FilterSyntaxError(f"unknown operator {op!r}")

    def attribute(self, sep: str) -> str:
        self.take("attributes", kind="word")
        self.take(sep)
        return self.key()

    def key(self) -> str:
        tok = self.peek()
        if tok is not None and tok[0] == "str":
            return _unquote(self.take())
        return self.take(kind="word")


def compile_filter(text: str) -> Predicate:
    """A predicate over a message's attributes; FilterSyntaxError for what the grammar does not allow."""
    if len(text.encode()) > MAX_FILTER_BYTES:
        raise FilterSyntaxError(f"filter longer than {MAX_FILTER_BYTES} bytes")
    parser = _Parser(text)
    predicate = parser.expr()
    if parser.peek() is not None:
        raise FilterSyntaxError(f"trailing {parser.peek()}")
    return predicate
