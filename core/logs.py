"""Logging: one structured line per request, JSON (or key=value text) output, and a
redaction filter that every log record passes through.

Redaction works on two levels, because a secret can reach a log line from anywhere
(an exception message, an upstream error body that quotes the key it was sent, a
config echoed in a warning):

- *known secrets*: every client key, upstream `api_key`, channel header value and the
  admin key from the config are replaced by `[REDACTED]` wherever they appear;
  `update_secrets` adds the new ones on reload;
- *shapes*: `Bearer <token>`, `sk-…`-style keys, `api_key=…`/`"x-api-key": "…"` pairs
  and `?key=…` query parameters are masked even when the value is not one we know
  (keys created through the admin API, keys a caller mistyped).

The filter sits on the handlers `setup_logging` installs (a logger-level filter would
miss records from child loggers), and rewrites the record itself: message with its
arguments merged, exception text, stack text and any `extra` fields.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import orjson

from switchboard.core.config import Config
from switchboard.core.usage import UsageRecord

REDACTED = "[REDACTED]"
ACCESS_LOGGER = "switchboard.access"

# Shapes of secrets we mask even when we do not know the value.
_SHAPES = [
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{4,}"), rf"\1{REDACTED}"),
    (re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"), REDACTED),  # Google API keys
    # `name: value` pairs. An auth scheme word (`Authorization: Bearer <token>`) stays and
    # only the credential after it goes; the scheme itself and a `<placeholder>` (our own
    # hints say "Send it as `Authorization: Bearer <key>`") are not secrets.
    (re.compile(r"(?i)((?:api[_-]?key|x-api-key|x-goog-api-key|admin[_-]?key|authorization)"
                r"[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
                r"(?!\[REDACTED\]|<|(?:bearer|basic|token)\b)[^\s\"',;&}]{4,}"), rf"\1{REDACTED}"),
    (re.compile(r"(?i)([?&]key=)[^\s&\"']+"), rf"\1{REDACTED}"),
]
# Secrets shorter than this are not matched literally: masking "abc" everywhere would
# wreck log lines without protecting anything (config keys are at least 8 characters).
_MIN_SECRET = 6


class Redactor:
    """Masks known secrets and secret-shaped strings. Thread-safe; cheap when clean."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._literal: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if s and len(s) >= _MIN_SECRET}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets |= new
            # Longest first, so a key that contains another is masked whole.
            alts = sorted(self._secrets, key=len, reverse=True)
            self._literal = re.compile("|".join(re.escape(s) for s in alts))

    def redact(self, text: str) -> str:
        literal = self._literal
        if literal is not None:
            text = literal.sub(REDACTED, text)
        for pattern, repl in _SHAPES:
            text = pattern.sub(repl, text)
        return text

    def redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_value(v) for v in value]
        return value


def config_secrets(config: Config) -> list[str]:
    """Every secret a config holds: client keys, upstream keys, header values, admin key."""
    out = [config.admin_key]
    out += [k.key for k in config.keys]
    for c in config.channels:
        out.append(c.api_key)
        out += list(c.headers.values())
    return [s for s in out if s]


# The process-wide redactor: the filter on every handler uses it.
REDACTOR = Redactor()


def update_secrets(config: Config) -> None:
    REDACTOR.add(config_secrets(config))


# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RedactionFilter(logging.Filter):
    """Rewrites each record with its secrets masked. Never drops a record."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        r = self.redactor
        if getattr(record, "_sb_redacted", False):
            return True  # an access line: log_request masked its one free-text field itself
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = r.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = r.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = r.redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and not name.startswith("_"):
                setattr(record, name, r.redact_value(value))
        record._sb_redacted = True
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "_sb_fields", None)
    if fields is not None:  # an access line: its fields arrive as one dict (cheaper)
        return fields
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the `extra` fields."""

    _second = -1
    _stamp = ""

    def _ts(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once per second, not once per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable: the classic line, then the `extra` fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={v}" for k, v in _extras(record).items() if v is not None]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {' '.join(extras)}{sep}{tail}"


def make_handler(fmt: str = "json", stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactionFilter())
    return handler


def setup_logging(config: Config, stream: Any = None) -> None:
    """Replace the root handlers with one redacting handler in the configured format."""
    update_secrets(config)
    obs = config.observability
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(make_handler(obs.log_format, stream))
    root.setLevel(obs.log_level.upper())
    _access.disabled = not obs.access_log
    # Fields no line of ours prints; each costs a lookup on every record.
    logging.logMultiprocessing = logging.logProcesses = logging.logThreads = False


def install_redaction() -> None:
    """Put the redaction filter on every handler already installed (e.g. by pytest or an
    embedding application), so no record reaches an output unredacted."""
    for logger in [logging.getLogger(), *[lg for lg in logging.root.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger)]]:
        for h in logger.handlers:
            if not any(isinstance(f, RedactionFilter) for f in h.filters):
                h.addFilter(RedactionFilter())


_access = logging.getLogger(ACCESS_LOGGER)


def log_request(rec: UsageRecord, *, error: str | None = None, attempts: int | None = None) -> None:
    """The one log line per request (logger `switchboard.access`; silence it with
    `observability.access_log: false` or by setting that logger's level above INFO)."""
    if not _access.isEnabledFor(logging.INFO) or _access.disabled:
        return
    fields: dict[str, Any] = {
        "request_id": rec.request_id, "key_name": rec.key_name,
        # A model nobody serves is whatever the caller typed: mask it like free text.
        "model": rec.model if rec.status == "OK" else REDACTOR.redact(rec.model),
        "channel": rec.channel, "surface": rec.surface, "stream": rec.stream,
        "status": rec.status, "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens, "latency_ms": round(rec.latency_ms, 2),
        "ttft_ms": round(rec.ttft_ms, 2) if rec.ttft_ms is not None else None,
    }
    if rec.cached_tokens:
        fields["cached_tokens"] = rec.cached_tokens
    if rec.reasoning_tokens:
        fields["reasoning_tokens"] = rec.reasoning_tokens
    if attempts is not None:
        fields["attempts"] = attempts
    if error:
        fields["error"] = REDACTOR.redact(error)
    # The other fields are names, numbers and ids we produced: no secret can be in them.
    # makeRecord + handle skips Logger._log's caller lookup (a stack walk per request).
    record = _access.makeRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, "request", (), None,
                                extra={"_sb_fields": fields, "_sb_redacted": True})
    _access.handle(record)
