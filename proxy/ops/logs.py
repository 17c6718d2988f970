"""Logging setup: one JSON object (or one key=value line) per record.

The access log is the ``proxy.access`` logger: one record per connection,
whose fields travel in ``extra={"fields": {...}}``. Other loggers carry plain
messages and, where they absorb an error, the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

ACCESS = logging.getLogger("proxy.access")


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname.lower(), record.name, record.getMessage()]
        for key, value in (getattr(record, "fields", None) or {}).items():
            if value is None or value == "":
                continue
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or '=' in text or not text) else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Handler(logging.StreamHandler[TextIO]):
    """The handler setup_logging installs: the one whose format a reload may change."""


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def reconfigure_logging(level: str, fmt: str) -> None:
    """A reload's new ``log`` settings: the level, and the format of the handler ``setup_logging`` installed.

    The handler itself stays (same stream, nothing lost or reordered); handlers someone else added (a test's log
    capture, say) keep their own format. ``setLevel`` also clears every logger's cached ``isEnabledFor``, which
    the access log consults before building its line.
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, _Handler):
            handler.setFormatter(_formatter(fmt))
    root.setLevel(level.upper())
