"""Secret masking, one leaf both edges and the logs share: known secrets (keys from the
config, added by core/logs.py's `update_secrets`) and secret-shaped strings are replaced
by `[REDACTED]`. `public()` is the explicit scrubbing step every error passes on its way
out of the gateway (the gRPC interceptor in core/edge.py, the REST renderer in
facade/app.py). It imports nothing from the core but the error type, so the façade may
depend on it."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

from switchboard.core.errors import GatewayError

REDACTED = "[REDACTED]"

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


# The process-wide redactor: the log filter and the edges use it.
REDACTOR = Redactor()


def public(err: GatewayError) -> GatewayError:
    """The error as it may leave the gateway: its message with secrets masked (known
    keys and secret-shaped strings). A copy when anything changed, so an error object
    shared between calls keeps its text."""
    clean = REDACTOR.redact(err.message)
    return err if clean == err.message else err.with_message(clean)
