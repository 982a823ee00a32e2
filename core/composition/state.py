"""Builds a Gateway with its state: the key store and usage ledger (core/store,
core/ledger.py) and the limiter (core/limits.py), as `switchboard serve|core` runs it.

Order on start: open the store (migrating it), start the ledger writer, connect the
limits backend. On stop (Gateway.close, after the runtime's drain): the ledger flushes,
pending reservation settlements finish, then the limits backend and the store close.
"""

from __future__ import annotations

import logging

from switchboard.core.config import Config
from switchboard.core.gateway import Gateway
from switchboard.core.keys import StoreKeyRing
from switchboard.core.ledger import Ledger, PriceTable
from switchboard.core.limits import Limits, open_backend
from switchboard.core.store import open_store

log = logging.getLogger("switchboard")


async def open_gateway(config: Config) -> Gateway:
    store = await open_store(config.store)
    try:
        ledger = Ledger(store)
        ledger.start()
        limits = Limits(open_backend(config.limits, config.limit_settings),
                        config.limit_settings, PriceTable(config.prices),
                        spent=store.spent, saturated=lambda: ledger.saturated)
        keyring = StoreKeyRing(config.keys, store, cache_s=config.key_cache_s)
    except BaseException:
        await store.close()
        raise
    log.info("state: store %s, limits %s (on error: fail %s), key cache %gs", store.label,
             "memory" if config.limits == "memory" else "redis", config.limit_settings.on_error,
             config.key_cache_s)
    return Gateway(config, usage=ledger, keyring=keyring, limits=limits, store=store)
