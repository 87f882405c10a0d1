"""Structured logging: one event per line as ``key=value`` pairs, credentials redacted.

Every package logs through :func:`get_logger`; ``logger.info("prepare", key=k, parent=p)``
prints ``ts=… level=info logger=lazysnap.service event=prepare key=… parent=…``. A filter on
the handler (:class:`RedactFilter`) scrubs secrets from field values and from free text
(Authorization headers, URL user-info, presigned-URL signatures), so no call site can leak
a credential by mistake.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["KVFormatter", "RedactFilter", "StructLogger", "configure", "get_logger", "format_kv", "redact"]

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|authorization|auth|credential|cookie|signature|api[_-]?key)",
                         re.IGNORECASE)
_TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer xxx / Basic xxx (headers or free text)
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # scheme://user:password@host
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + REDACTED + "@"),
    # presigned URLs and token-ish query parameters
    (re.compile(r"(?i)([?&](x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
                r"access_token|password)=)[^&\s\"']+"), r"\1" + REDACTED),
    # key=value / "key": "value" pairs inside free text
    (re.compile(r"(?i)(\"?(password|passwd|secret|token|access_token|refresh_token|authorization)\"?\s*[:=]\s*\"?)"
                r"[^\s\",&]+"), r"\1" + REDACTED),
)


def redact(text: str) -> str:
    """Remove credentials from free text."""
    for pat, repl in _TEXT_PATTERNS:
        text = pat.sub(repl, text)
    return text


def _quote(value: Any) -> str:
    s = value if isinstance(value, str) else str(value)
    if s == "" or any(c in s for c in ' "=\n\t\\'):
        return json.dumps(s, ensure_ascii=False)
    return s


def format_kv(fields: Mapping[str, Any]) -> str:
    """``k1=v1 k2="v 2"``: values with spaces, quotes or ``=`` are JSON-quoted."""
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class RedactFilter(logging.Filter):
    """Scrub secrets from the event fields and message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.__dict__["fields"] = {k: (REDACTED if _SECRET_KEY.search(k) and v not in (None, "") else
                                             redact(v) if isinstance(v, str) else v)
                                         for k, v in fields.items()}
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            extra = dict(getattr(record, "fields", {}) or {})
            extra["error"] = redact(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
            record.__dict__["fields"] = extra
            record.exc_info = None
        return True


class KVFormatter(logging.Formatter):
    """One line per record: ts, level, logger, event, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        head = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None) or {}
        return format_kv({**head, **fields}).replace("\n", "\\n")


class StructLogger:
    """A thin wrapper: ``log.info("event", key=value, …)``."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            exc = fields.pop("exc_info", None)
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str) -> StructLogger:
    """A structured logger below the ``lazysnap`` hierarchy."""
    if not name.startswith("lazysnap"):
        name = f"lazysnap.{name}"
    return StructLogger(logging.getLogger(name))


def configure(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Install one key=value handler with redaction on the ``lazysnap`` logger."""
    root = logging.getLogger("lazysnap")
    for h in list(root.handlers):
        if getattr(h, "_lazysnap", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KVFormatter())
    handler.addFilter(RedactFilter())
    handler._lazysnap = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    return handler
