"""containerd's filter language for Walk (List), parsed and matched without I/O.

A filter string is a comma-separated list of selectors that must all match; a list of filter
strings matches when any of them does (no strings: everything matches)::

    selector  := fieldpath [ operator value ]
    fieldpath := field ( "." field )*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | run of characters up to "," or white space
    quoted    := "..." (Go escapes); after "~=" also /.../ and |...|

A selector without an operator tests that the field is present. Snapshot fields are ``name``,
``parent``, ``kind`` (``active``, ``view``, ``committed``) and ``labels.KEY`` (the key's dots
join the path again, so ``labels."a.b"`` and ``labels.a.b`` name the same label).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lazyfs.errors import ConfigError

_QUOTES = '"/|'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}

Fields = Callable[[tuple[str, ...]], "str | None"]  # a field's value, or None when absent


@dataclass(frozen=True, slots=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?", "==", "!=", "~="
    value: str = ""

    def matches(self, fields: Fields) -> bool:
        value = fields(self.fieldpath)
        if self.operator == "?":
            return value is not None
        if self.operator == "==":
            return value is not None and value == self.value
        if self.operator == "!=":
            return (value or "") != self.value  # an absent field is "" here, as in containerd
        return re.search(self.value, value or "") is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """Alternatives (any matches) of conjunctions (all match)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, fields: Fields) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(fields) for s in conj) for conj in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"filter {self.text!r} at {self.pos}: {what}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self, allow_alternates: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not allow_alternates:
            raise self.fail(f"{quote} quotes only after ~=")
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise self.fail("quoted literal not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            if self.pos >= len(self.text):
                raise self.fail("escape at the end")
            esc = self.text[self.pos]
            self.pos += 1
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc in "'\"/|":
                out.append(esc)
            elif esc in "xuU":
                n = {"x": 2, "u": 4, "U": 8}[esc]
                digits = self.text[self.pos:self.pos + n]
                if len(digits) != n or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.fail(f"bad \\{esc} escape")
                out.append(chr(int(digits, 16)))
                self.pos += n
            elif esc in "01234567":
                digits = esc + self.text[self.pos:self.pos + 2]
                if len(digits) != 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                    raise self.fail("bad octal escape")
                out.append(chr(int(digits, 8)))
                self.pos += 2
            else:
                raise self.fail(f"unknown escape \\{esc}")

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted(False)
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isascii() and
                                             (self.text[self.pos].isalnum() or self.text[self.pos] == "_")):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a field name or a quoted string")
        return self.text[start:self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), "?")
        op = self.text[self.pos:self.pos + 2]
        if op not in ("==", "!=", "~="):
            raise self.fail('expected an operator ("==", "!=" or "~=")')
        self.pos += 2
        ch = self.peek()
        if ch and ch in _QUOTES:
            value = self.quoted(op == "~=")
        else:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
                self.pos += 1
            if self.pos == start:
                raise self.fail("expected a value")
            value = self.text[start:self.pos]
        if op == "~=":
            try:
                re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression {value!r}: {exc}") from None
        return Selector(tuple(path), op, value)

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(out)
            if ch != ",":
                raise self.fail(f"unexpected {ch!r}")
            self.pos += 1
            out.append(self.selector())


def parse_filters(texts: Sequence[str]) -> Filter:
    """Parse Walk's filter strings (ConfigError on bad syntax); an empty string matches everything."""
    alternatives = []
    for text in texts:
        if text == "":
            return Filter(())
        alternatives.append(_Parser(text).selectors())
    return Filter(tuple(alternatives))


def snapshot_fields(name: str, parent: str, kind: str, labels: dict[str, str]) -> Fields:
    """The field lookup of one snapshot, as containerd's snapshot adaptor defines it."""
    def lookup(path: tuple[str, ...]) -> str | None:
        head = path[0]
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "kind":
            return kind
        if head == "labels" and labels:
            return labels.get(".".join(path[1:]))
        return None
    return lookup
