"""API keys: who is calling and what they may use.

Keys are never held in clear: each is stored as its SHA-256 digest, looked up by
digest and confirmed with a constant-time compare. Static keys come from the config;
the key store (issue 5) adds keys created through the admin API.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from functools import lru_cache

import grpc

from core.config import KeyConfig
from core.errors import GatewayError


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """What the gateway knows about a caller's key (never the secret itself)."""

    name: str
    key_hash: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    prefix: str = ""
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def allows(self, model: str) -> bool:
        return _glob(self.models).match(model) is not None


@lru_cache(maxsize=1024)
def _glob(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def bearer_token(authorization: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` value ('' when absent)."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


_MISSING = GatewayError(
    grpc.StatusCode.UNAUTHENTICATED,
    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
    code="invalid_api_key",
)


class KeyRing:
    """Static keys from the config, looked up by digest."""

    def __init__(self, keys: tuple[KeyConfig, ...]) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        for k in keys:
            digest = hash_key(k.key)
            self._by_hash[digest] = KeyRecord(
                name=k.name, key_hash=digest, models=k.models, rpm=k.rpm, tpm=k.tpm,
                max_concurrent=k.max_concurrent, prefix=k.key[:6],
            )

    def lookup(self, digest: str) -> KeyRecord | None:
        record = self._by_hash.get(digest)
        if record is not None and hmac.compare_digest(record.key_hash, digest):
            return record
        return None

    async def authenticate(self, secret: str) -> KeyRecord:
        """The caller's key record, or UNAUTHENTICATED. Async because store-backed
        lookups (core/store) go to the database on a cache miss."""
        if not secret:
            raise _MISSING
        record = self.lookup(hash_key(secret))
        if record is None:
            raise GatewayError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"Incorrect API key provided: {_redact(secret)}.",
                code="invalid_api_key",
            )
        return record


def _redact(secret: str) -> str:
    return f"{secret[:3]}...{secret[-2:]}" if len(secret) > 8 else "***"


def check_model_allowed(key: KeyRecord, model: str) -> None:
    if not key.allows(model):
        raise GatewayError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"The API key '{key.name}' is not allowed to use model `{model}`.",
            code="model_not_allowed",
            param="model",
        )
