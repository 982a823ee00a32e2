"""API keys: who is calling and what they may use.

Keys are never held in clear: each is stored as its SHA-256 digest, looked up by
digest and confirmed with a constant-time compare. Static keys come from the config;
the key store (core/store) adds keys created through the admin API.

Store-backed keys are cached per process for `key_cache_s` (config, default 2 s),
positive and negative answers alike, with one database query per digest in flight
(a burst of a new key costs one lookup). So a revocation, a disable or an edit reaches
every replica within `key_cache_s`; expiry is compared with the clock on every request
and takes effect at once. The cache holds at most `CACHE_MAX` digests.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import ipaddress
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import grpc

from switchboard.core.config import KeyConfig
from switchboard.core.contract import bearer_token as bearer_token  # shared with the façade
from switchboard.core.errors import GatewayError

if TYPE_CHECKING:
    from switchboard.core.store.base import StoredKey

CACHE_MAX = 10_000


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
    key_id: str = ""  # store id, or "static:<name>"
    owner: str = ""
    budget: float | None = None
    budget_unit: str = "tokens"
    budget_period: str = "total"
    expires_at: float | None = None
    cidrs: tuple[str, ...] = ()
    enabled: bool = True

    def allows(self, model: str) -> bool:
        return _glob(self.models).match(model) is not None


@lru_cache(maxsize=1024)
def _glob(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


_MISSING = GatewayError(
    grpc.StatusCode.UNAUTHENTICATED,
    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
    code="invalid_api_key",
)


class KeyLookup(Protocol):
    async def key_by_hash(self, digest: str) -> StoredKey | None: ...


def record_from_stored(k: StoredKey) -> KeyRecord:
    return KeyRecord(
        name=k.name, key_hash=k.key_hash, models=k.models or ("*",), rpm=k.rpm, tpm=k.tpm,
        max_concurrent=k.max_concurrent, prefix=k.prefix, key_id=k.id, owner=k.owner,
        budget=k.budget, budget_unit=k.budget_unit, budget_period=k.budget_period,
        expires_at=k.expires_at, cidrs=k.cidrs,
        enabled=k.enabled and k.revoked_at is None,
    )


class KeyRing:
    """Static keys from the config, looked up by digest."""

    def __init__(self, keys: tuple[KeyConfig, ...]) -> None:
        self._by_hash: dict[str, KeyRecord] = {}
        self.reload_static(keys)

    def reload_static(self, keys: tuple[KeyConfig, ...]) -> None:
        by_hash: dict[str, KeyRecord] = {}
        for k in keys:
            digest = hash_key(k.key)
            by_hash[digest] = KeyRecord(
                name=k.name, key_hash=digest, models=k.models, rpm=k.rpm, tpm=k.tpm,
                max_concurrent=k.max_concurrent, prefix=k.key[:6], key_id=f"static:{k.name}",
                budget=k.budget, budget_unit=k.budget_unit, budget_period=k.budget_period,
                cidrs=k.allowed_cidrs,
            )
        self._by_hash = by_hash

    async def _from_store(self, digest: str) -> KeyRecord | None:
        return None

    def forget(self, digest: str | None = None) -> None:
        return None

    def lookup(self, digest: str) -> KeyRecord | None:
        record = self._by_hash.get(digest)
        if record is not None and hmac.compare_digest(record.key_hash, digest):
            return record
        return None

    async def authenticate(self, secret: str) -> KeyRecord:
        """The caller's key record, or UNAUTHENTICATED. Async because store-backed
        lookups (StoreKeyRing) go to the database on a cache miss."""
        if not secret:
            raise _MISSING
        digest = hash_key(secret)
        record = self.lookup(digest)
        if record is None:
            record = await self._from_store(digest)
            if record is not None and not hmac.compare_digest(record.key_hash, digest):
                record = None
        if record is None:
            raise GatewayError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"Incorrect API key provided: {_redact(secret)}.",
                code="invalid_api_key",
            )
        if not record.enabled:
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED,
                               f"The API key '{record.name}' has been revoked or disabled.",
                               code="invalid_api_key")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED,
                               f"The API key '{record.name}' has expired.", code="invalid_api_key")
        return record


class StoreKeyRing(KeyRing):
    """Static keys first, then the key store through a short per-process cache."""

    def __init__(self, keys: tuple[KeyConfig, ...], store: KeyLookup, *,
                 cache_s: float = 2.0) -> None:
        super().__init__(keys)
        self.store = store
        self.cache_s = cache_s
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    def forget(self, digest: str | None = None) -> None:
        """Drop cached store answers (one digest, or all): the admin API calls this so
        its own replica sees a change at once."""
        if digest is None:
            self._cache.clear()
        else:
            self._cache.pop(digest, None)

    async def _from_store(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = fut
        try:
            stored = await self.store.key_by_hash(digest)
            record = record_from_stored(stored) if stored is not None else None
            self._cache[digest] = (time.monotonic(), record)
            self._cache.move_to_end(digest)
            while len(self._cache) > CACHE_MAX:
                self._cache.popitem(last=False)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[digest]


def _redact(secret: str) -> str:
    return f"{secret[:3]}...{secret[-2:]}" if len(secret) > 8 else "***"


def peer_ip(peer: str) -> str:
    """The client address from a REST remote ("10.0.0.1") or a gRPC peer
    ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000"); '' when there is none (unix sockets)."""
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    if peer.startswith("unix:"):
        return ""
    return peer.strip("[]")


@lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def check_client_network(key: KeyRecord, peer: str) -> None:
    """PERMISSION_DENIED unless the caller's address is inside one of the key's CIDRs."""
    if not key.cidrs:
        return
    try:
        addr = ipaddress.ip_address(peer_ip(peer))
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr is not None and any(addr in net for net in _networks(key.cidrs)):
        return
    raise GatewayError(grpc.StatusCode.PERMISSION_DENIED,
                       f"The API key '{key.name}' may not be used from this network.",
                       code="ip_not_allowed")


def check_model_allowed(key: KeyRecord, model: str) -> None:
    if not key.allows(model):
        raise GatewayError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"The API key '{key.name}' is not allowed to use model `{model}`.",
            code="model_not_allowed",
            param="model",
        )
