"""Structured JSON logs with a request id, and a last line of defence against card data and secrets.

Code never logs a PAN, CVC, API key or signature on purpose; the redacting formatter also masks any
13-19 digit run that passes Luhn (keeping at most first 6 + last 4) and the values of fields named
like secrets, in case a bug or a library tries.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from stdnum import luhn

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_DIGITS = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
_SECRET_KEYS = re.compile(r"(authorization|api[_-]?key|secret|password|token|signature|cvc|cvv|card_number|pan)", re.I)
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def mask_pans(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if luhn.is_valid(digits):
            return f"{digits[:6]}{'*' * (len(digits) - 10)}{digits[-4:]}"
        return m.group(0)

    return _DIGITS.sub(sub, text)


def _clean(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key):
        return "[redacted]"
    if isinstance(value, str):
        return mask_pans(value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_pans(record.getMessage()),
        }
        rid = request_id.get()
        if rid:
            doc["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                doc[k] = _clean(k, v)
        if record.exc_info:
            doc["exc"] = mask_pans(self.formatException(record.exc_info))
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
