"""Config reload, one code path for every trigger: SIGHUP (core/composition/cli.py),
`Runtime.reload()` and the admin API's ReloadConfig.

The file is re-read off the event loop and validated whole; `Gateway.reload` then
builds the new router and key set before swapping anything, so a config that does
not load or build is rejected (ConfigError, logged, `switchboard_config_reloads_total
{result="error"}`) and the running one keeps serving. Requests in flight finish on the
router they started with: reload never drops a stream.

What a reload applies: channels, keys, routes, router settings including
`router.circuit` (the breaker is kept, with its state, and takes the new settings: open
circuits stay open, and the new thresholds judge from the next request). What it does
not: listen addresses, store, limits backend, observability settings, body size limit
(logged as a warning when changed).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from switchboard.core.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from switchboard.core.gateway import Gateway

log = logging.getLogger("switchboard.reload")

RESTART_ONLY = ("listen_http", "listen_grpc", "store", "limits", "observability", "max_body_bytes")


async def reload_from_file(gateway: Gateway, path: str | None = None) -> Config:
    """Re-read `path` (default: the file the gateway's config came from) and apply it."""
    old = gateway.config
    source = path or old.source
    try:
        if source.startswith("<"):
            raise ConfigError(f"{source}: the config was not loaded from a file; nothing to reload")
        new = await asyncio.to_thread(load_config, source)
        gateway.reload(new)
    except Exception as exc:
        gateway.observer.metrics.reloaded(False)
        log.error("config reload rejected, the current config keeps serving: %s", exc)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: {exc}") from None
    pending = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if pending:
        log.warning("config reload: %s changed; these apply after a restart", ", ".join(pending))
    gateway.observer.metrics.reloaded(True)
    log.info("config reloaded from %s: %d channels, %d keys, %d routes", source,
             len(new.channels), len(new.keys), len(new.routes))
    return new
