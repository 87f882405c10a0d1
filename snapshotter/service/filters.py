"""containerd's filter syntax, as List receives it.

    filter    := selector ("," selector)*          (comma = AND)
    selector  := fieldpath [("==" | "!=" | "~=") value]
    fieldpath := field ("." field)*                field: identifier or quoted string
    value     := quoted string | run of characters up to "," or whitespace

Several filter strings in one request are ORed, as ``filters.ParseAll`` does; no filters
selects everything. Snapshot fields: ``name``, ``parent``, ``kind``, ``labels.<key>``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter.service.errors import InvalidArgument
from snapshotter.service.model import Info

__all__ = ["Selector", "parse_filter", "compile_filters"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-/]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/"}


@dataclass(slots=True, frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None  # None: presence test
    value: str = ""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.s!r}: {what} at position {self.i}: invalid argument")

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def quoted(self) -> str:
        quote = self.s[self.i]
        self.i += 1
        out: list[str] = []
        while self.i < len(self.s):
            ch = self.s[self.i]
            self.i += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and self.i < len(self.s):
                esc = self.s[self.i]
                self.i += 1
                out.append(_ESCAPES.get(esc, "\\" + esc))
            else:
                out.append(ch)
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        self.skip_ws()
        if self.peek() in ('"', "'"):
            return self.quoted()
        m = _IDENT.match(self.s, self.i)
        if not m:
            raise self.error("expected a field name")
        self.i = m.end()
        return m.group(0)

    def value(self) -> str:
        self.skip_ws()
        if self.peek() in ('"', "'"):
            return self.quoted()
        start = self.i
        while self.i < len(self.s) and self.s[self.i] != "," and not self.s[self.i].isspace():
            self.i += 1
        if self.i == start:
            raise self.error("expected a value")
        return self.s[start:self.i]


def parse_filter(text: str) -> list[Selector]:
    """One filter string → its selectors (all must match)."""
    sc = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [sc.field()]
        while sc.peek() == ".":
            sc.i += 1
            path.append(sc.field())
        sc.skip_ws()
        op = sc.peek(2)
        if op in ("==", "!=", "~="):
            sc.i += 2
            selectors.append(Selector(tuple(path), op, sc.value()))
        else:
            selectors.append(Selector(tuple(path)))
        sc.skip_ws()
        if sc.i >= len(sc.s):
            return selectors
        if sc.peek() != ",":
            raise sc.error("expected ',' or an operator")
        sc.i += 1


def _field(info: Info, path: tuple[str, ...]) -> str | None:
    head = path[0]
    if head == "labels":
        if len(path) < 2:
            return None
        return info.labels.get(".".join(path[1:]))
    if len(path) != 1:
        return None
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent
    if head == "kind":
        return info.kind.name.lower()
    return None


def _match(sel: Selector, info: Info) -> bool:
    actual = _field(info, sel.path)
    if sel.op is None:
        return actual is not None
    expected = sel.value.lower() if sel.path == ("kind",) else sel.value
    if sel.op == "==":
        return actual == expected
    if sel.op == "!=":
        return actual != expected
    if actual is None:
        return False
    try:
        return re.search(expected, actual) is not None
    except re.error as exc:
        raise InvalidArgument(f"filter regexp {expected!r}: {exc}: invalid argument") from None


def compile_filters(filters: Sequence[str]) -> Callable[[Info], bool]:
    """A predicate for List: any filter matches (each = all its selectors); none = all."""
    parsed = [parse_filter(f) for f in filters if f.strip()]
    if not parsed:
        return lambda info: True
    return lambda info: any(all(_match(s, info) for s in sels) for sels in parsed)
