"""Logging: stdlib logging, ids bound through a contextvar, JSON lines when asked for.

Log lines carry event, invitation and customer ids, never contact details or secrets.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("kaiku_log_context")


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Bind ids (event_id, invitation_id, customer_id, ...) to every log line in the block."""
    current = dict(_context.get({}))
    current.update({k: v for k, v in ids.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.kaiku = _context.get({})
        return True


_LINK_TOKEN = re.compile(r"/(s|u)/[A-Za-z0-9_-]{8,}")
_QUERY_SECRET = re.compile(r"([?&](?:token|secret|key|signature)=)[^&\s\"]+", re.IGNORECASE)


class _RedactLinkTokens(logging.Filter):
    """Survey and unsubscribe links carry a token that answers for a customer, and a webhook URL
    may carry a secret (``?token=``): keep both out of access logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY_SECRET.sub(r"\1<redacted>", _LINK_TOKEN.sub(r"/\1/<token>", a))
                if isinstance(a, str)
                else a
                for a in record.args
            )
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "kaiku", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = getattr(record, "kaiku", {})
        if ids:
            line += " " + " ".join(f"{k}={v}" for k, v in ids.items())
        return line


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter())
    handler.addFilter(_RedactLinkTokens())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
