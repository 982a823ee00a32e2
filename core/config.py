"""YAML configuration → typed, validated config objects.

`${NAME}` and `${NAME:-default}` are substituted from the environment before any
value is read, so secrets never need to sit in the file. Every problem is reported
as a `ConfigError` naming the file, the path inside it (e.g. `channels[1].provider`)
and what is wrong; a config either loads whole or not at all.

With no file at all, `demo_config()` gives the embedded default: one `echo` demo
channel and a well-known demo key, listening on loopback only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEMO_KEY = "sk-switchboard-demo"
KNOWN_PROVIDERS = ("openai", "anthropic", "gemini", "ollama", "echo", "azure")


class ConfigError(Exception):
    """A config problem: `file: path: message`."""


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 disables a timeout. The caller's deadline wins when shorter."""

    connect: float = 10.0
    first_token: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    provider: str
    base_url: str
    api_key: str = ""
    # public model name -> upstream model name
    models: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Provider-specific settings (e.g. anthropic `version`, echo `delay_ms`).
    options: dict[str, Any] = field(default_factory=dict)
    owned_by: str = ""


@dataclass(frozen=True)
class KeyConfig:
    name: str
    key: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget: float | None = None
    budget_unit: str = "tokens"  # tokens | usd
    budget_period: str = "total"  # day | month | total
    allowed_cidrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitSettings:
    """How limits behave (core/limits.py). `on_error`: what a request meets when the
    limits backend (Redis) is unreachable — "closed" refuses it (503-class UNAVAILABLE),
    "open" lets it through unlimited. `default_max_tokens`: the completion tokens reserved
    when a request names no max_tokens. `lease_s`: how long a concurrency slot outlives a
    replica that died holding it."""

    on_error: str = "closed"
    key_prefix: str = "switchboard"
    default_max_tokens: int = 1024
    lease_s: float = 900.0
    redis_timeout_s: float = 0.5
    # Each Redis client (the limiter's, the circuit breaker's) keeps at most this many
    # connections; a request waits for a free one rather than opening more
    # (core/redis_pool.py). Connections idle this long are closed, so the descriptors a
    # burst opened are given back.
    redis_max_connections: int = 32
    redis_idle_s: float = 60.0


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens (and per generated image)."""

    prompt: float = 0.0
    completion: float = 0.0
    cached_prompt: float | None = None  # None: same as prompt
    image: float = 0.0


@dataclass(frozen=True)
class RouteConfig:
    model: str
    targets: tuple[str, ...]
    # Start the next channel if the first has no first token after this long.
    hedge_after_ms: float | None = None


@dataclass(frozen=True)
class CircuitSettings:
    """A channel is cooled down for `cooldown_s` when, within the last `window_s`, at
    least `min_requests` requests reached it and at least `failure_ratio` of them
    failed; then up to `half_open_requests` trials at a time decide whether it closes
    again (core/circuit.py, which also says why these defaults)."""

    failure_ratio: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    cooldown_s: float = 30.0
    half_open_requests: int = 1


@dataclass(frozen=True)
class RouterSettings:
    max_attempts: int = 3
    backoff_ms: float = 50.0
    # Honour an upstream 429's Retry-After only when it is at most this long.
    max_retry_after_s: float = 2.0
    circuit: CircuitSettings = field(default_factory=CircuitSettings)


@dataclass(frozen=True)
class ServerSettings:
    """What one client may cost a listener (facade/guard.py, core/server.py). A request's
    line and headers must arrive within `header_timeout_s` of the connection opening or
    of its first byte, its body within `body_timeout_s` after that; otherwise the client
    gets 408 and the connection is closed. A keep-alive connection with no request is
    closed after `idle_timeout_s`. Beyond `max_connections` open connections a listener
    answers new ones with 503 and closes them at once. 0 disables a setting."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 75.0
    max_connections: int = 10000


@dataclass(frozen=True)
class ObservabilityConfig:
    """Logs, metrics and traces (docs/operations.md). Tracing is off unless
    `otel_endpoint` is set (needs the `otel` extra)."""

    log_format: str = "json"  # json | text
    log_level: str = "info"
    access_log: bool = True  # one line per request (logger switchboard.access)
    otel_endpoint: str = ""  # OTLP/HTTP base URL, e.g. http://otel-collector:4318
    service_name: str = "switchboard"
    trace_sample_ratio: float = 1.0


@dataclass(frozen=True)
class Config:
    listen_http: str = "127.0.0.1:8080"
    listen_grpc: str = "127.0.0.1:50051"
    store: str = "sqlite:///./switchboard.db"
    limits: str = "memory"
    admin_key: str = ""
    keys: tuple[KeyConfig, ...] = ()
    channels: tuple[ChannelConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    router: RouterSettings = field(default_factory=RouterSettings)
    max_body_bytes: int = 20 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    server: ServerSettings = field(default_factory=ServerSettings)
    limit_settings: LimitSettings = field(default_factory=LimitSettings)
    # model name or glob -> price; the first matching entry in file order wins.
    prices: tuple[tuple[str, Price], ...] = ()
    # Store-backed keys are cached this long: revocation, disabling and edits reach every
    # replica within it (expiry is checked on every request).
    key_cache_s: float = 2.0
    source: str = "<builtin>"


_DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://127.0.0.1:11434",
    "echo": "",
}

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Reader:
    """Walks the parsed YAML, keeping the path for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        where = f"{self.source}: {path}" if path else self.source
        return ConfigError(f"{where}: {message}")

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def seq(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {type(value).__name__}")
        return value

    def str_(self, d: dict[str, Any], key: str, path: str, default: str | None = None) -> str:
        value = d.get(key, default)
        if value is None:
            raise self.fail(f"{path}.{key}" if path else key, "is required")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.fail(f"{path}.{key}" if path else key,
                            f"expected a string, got {type(value).__name__}")
        return str(value)

    def num(self, d: dict[str, Any], key: str, path: str, default: float | None,
            minimum: float = 0.0) -> float | None:
        value = d.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{path}.{key}", f"expected a number, got {value!r}")
        if value < minimum:
            raise self.fail(f"{path}.{key}", f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    def int_(self, d: dict[str, Any], key: str, path: str, default: int | None) -> int | None:
        value = d.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{path}.{key}", f"expected a whole number, got {value!r}")
        if value < 0:
            raise self.fail(f"{path}.{key}", f"must be >= 0, got {value!r}")
        return value

    def unknown(self, d: dict[str, Any], allowed: set[str], path: str) -> None:
        extra = sorted(set(d) - allowed)
        if extra:
            where = f"{path}.{extra[0]}" if path else str(extra[0])
            raise self.fail(where, f"unknown setting (expected one of: {', '.join(sorted(allowed))})")


def substitute_env(text: str, source: str, env: dict[str, str] | None = None) -> str:
    """Replace ${NAME} / ${NAME:-default}; an unset variable without default is an error."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        line = text.count("\n", 0, match.start()) + 1
        raise ConfigError(f"{source}: line {line}: environment variable {name} is not set "
                          f"(use ${{{name}:-default}} to give a default)")

    return _ENV.sub(repl, text)


def _timeouts(r: _Reader, raw: Any, path: str, base: Timeouts) -> Timeouts:
    d = r.mapping(raw, path)
    r.unknown(d, {"connect", "first_token", "idle", "total"}, path)
    return Timeouts(**{k: r.num(d, k, path, getattr(base, k)) for k in  # type: ignore[arg-type]
                       ("connect", "first_token", "idle", "total")})


def _channel(r: _Reader, raw: Any, path: str, default_timeouts: Timeouts) -> ChannelConfig:
    d = r.mapping(raw, path)
    r.unknown(d, {"name", "provider", "base_url", "api_key", "models", "model_map", "weight",
                  "priority", "headers", "timeouts", "options", "owned_by"}, path)
    name = r.str_(d, "name", path)
    provider = r.str_(d, "provider", path)
    if provider not in KNOWN_PROVIDERS:
        raise r.fail(f"{path}.provider",
                     f"unknown provider {provider!r} (expected one of: {', '.join(KNOWN_PROVIDERS)})")
    base_url = r.str_(d, "base_url", path, _DEFAULT_BASE_URLS.get(provider)).rstrip("/")
    if provider != "echo" and not re.match(r"^https?://", base_url):
        raise r.fail(f"{path}.base_url", f"expected an http(s) URL, got {base_url!r}")
    models: dict[str, str] = {}
    for i, m in enumerate(r.seq(d.get("models"), f"{path}.models")):
        if not isinstance(m, str) or not m:
            raise r.fail(f"{path}.models[{i}]", f"expected a model name, got {m!r}")
        models[m] = m
    for public, upstream in r.mapping(d.get("model_map"), f"{path}.model_map").items():
        if not isinstance(upstream, str) or not upstream:
            raise r.fail(f"{path}.model_map.{public}", f"expected an upstream model name, got {upstream!r}")
        models[str(public)] = upstream
    if not models:
        raise r.fail(f"{path}.models", "a channel must serve at least one model")
    weight = r.num(d, "weight", path, 1.0)
    priority = d.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise r.fail(f"{path}.priority", f"expected a whole number, got {priority!r}")
    headers = {str(k): str(v) for k, v in r.mapping(d.get("headers"), f"{path}.headers").items()}
    return ChannelConfig(
        name=name, provider=provider, base_url=base_url,
        api_key=r.str_(d, "api_key", path, ""), models=models,
        weight=weight if weight is not None else 1.0, priority=priority, headers=headers,
        timeouts=_timeouts(r, d.get("timeouts"), f"{path}.timeouts", default_timeouts),
        options=dict(r.mapping(d.get("options"), f"{path}.options")),
        owned_by=r.str_(d, "owned_by", path, provider),
    )


def _key(r: _Reader, raw: Any, path: str) -> KeyConfig:
    d = r.mapping(raw, path)
    r.unknown(d, {"name", "key", "models", "rpm", "tpm", "max_concurrent", "budget", "budget_unit",
                  "budget_period", "allowed_cidrs"}, path)
    key = r.str_(d, "key", path)
    if len(key) < 8:
        raise r.fail(f"{path}.key", "is shorter than 8 characters")
    models = tuple(str(m) for m in r.seq(d.get("models", ["*"]), f"{path}.models"))
    return KeyConfig(
        name=r.str_(d, "name", path), key=key, models=models or ("*",),
        rpm=r.int_(d, "rpm", path, None), tpm=r.int_(d, "tpm", path, None),
        max_concurrent=r.int_(d, "max_concurrent", path, None),
        budget=r.num(d, "budget", path, None),
        budget_unit=_choice(r, d, "budget_unit", path, ("tokens", "usd"), "tokens"),
        budget_period=_choice(r, d, "budget_period", path, ("day", "month", "total"), "total"),
        allowed_cidrs=_cidrs(r, d.get("allowed_cidrs"), f"{path}.allowed_cidrs"),
    )


def _choice(r: _Reader, d: dict[str, Any], key: str, path: str, allowed: tuple[str, ...],
            default: str) -> str:
    value = r.str_(d, key, path, default)
    if value not in allowed:
        raise r.fail(f"{path}.{key}", f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _cidrs(r: _Reader, raw: Any, path: str) -> tuple[str, ...]:
    import ipaddress

    out = []
    for i, c in enumerate(r.seq(raw, path)):
        try:
            out.append(str(ipaddress.ip_network(str(c), strict=False)))
        except ValueError:
            raise r.fail(f"{path}[{i}]", f"expected a CIDR such as 10.0.0.0/8, got {c!r}") from None
    return tuple(out)


def _limits(r: _Reader, raw: Any) -> tuple[str, LimitSettings]:
    """`limits: memory | redis://…`, or a mapping with `backend` and the settings."""
    if raw is None or isinstance(raw, str):
        backend, d = raw or Config.limits, {}
    else:
        d = r.mapping(raw, "limits")
        r.unknown(d, {"backend", "on_error", "key_prefix", "default_max_tokens", "lease_s",
                      "redis_timeout_s", "redis_max_connections", "redis_idle_s"}, "limits")
        backend = r.str_(d, "backend", "limits", Config.limits)
    if backend != "memory" and not re.match(r"^rediss?://", backend):
        raise r.fail("limits", f"expected memory or a redis:// URL, got {backend!r}")
    base = LimitSettings()
    prefix = r.str_(d, "key_prefix", "limits", base.key_prefix)
    if not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", prefix):
        raise r.fail("limits.key_prefix", "use letters, digits and _.:- only")
    return backend, LimitSettings(
        on_error=_choice(r, d, "on_error", "limits", ("closed", "open"), base.on_error),
        key_prefix=prefix,
        default_max_tokens=int(r.int_(d, "default_max_tokens", "limits", base.default_max_tokens)
                               or 1),
        lease_s=r.num(d, "lease_s", "limits", base.lease_s, minimum=1) or base.lease_s,
        redis_timeout_s=r.num(d, "redis_timeout_s", "limits", base.redis_timeout_s)
        or base.redis_timeout_s,
        redis_max_connections=int(r.int_(d, "redis_max_connections", "limits",
                                         base.redis_max_connections) or 1),
        redis_idle_s=r.num(d, "redis_idle_s", "limits", base.redis_idle_s) or 0.0,
    )


def _server(r: _Reader, raw: Any) -> ServerSettings:
    d = r.mapping(raw, "server")
    r.unknown(d, {"header_timeout_s", "body_timeout_s", "idle_timeout_s", "max_connections"},
              "server")
    base = ServerSettings()
    return ServerSettings(
        header_timeout_s=r.num(d, "header_timeout_s", "server", base.header_timeout_s) or 0.0,
        body_timeout_s=r.num(d, "body_timeout_s", "server", base.body_timeout_s) or 0.0,
        idle_timeout_s=r.num(d, "idle_timeout_s", "server", base.idle_timeout_s) or 0.0,
        max_connections=int(r.int_(d, "max_connections", "server", base.max_connections) or 0),
    )


def _admin_key(r: _Reader, d: dict[str, Any]) -> str:
    """Empty or absent disables the admin API; a set key must be hard to guess."""
    if d.get("admin_key") in (None, ""):
        return ""
    key = r.str_(d, "admin_key", "")
    if len(key) < 8:
        raise r.fail("admin_key", "is shorter than 8 characters")
    return key


def _store(r: _Reader, d: dict[str, Any]) -> str:
    dsn = r.str_(d, "store", "", Config.store)
    if not dsn.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise r.fail("store", "expected sqlite:///path/to/file.db or a postgresql:// DSN")
    return dsn


def _prices(r: _Reader, raw: Any) -> tuple[tuple[str, Price], ...]:
    out = []
    for model, spec in r.mapping(raw, "prices").items():
        path = f"prices.{model}"
        d = r.mapping(spec, path)
        r.unknown(d, {"prompt", "completion", "cached_prompt", "image"}, path)
        out.append((str(model), Price(
            prompt=r.num(d, "prompt", path, 0.0) or 0.0,
            completion=r.num(d, "completion", path, 0.0) or 0.0,
            cached_prompt=r.num(d, "cached_prompt", path, None),
            image=r.num(d, "image", path, 0.0) or 0.0)))
    return tuple(out)


def _route(r: _Reader, raw: Any, path: str) -> RouteConfig:
    d = r.mapping(raw, path)
    r.unknown(d, {"model", "targets", "hedge_after_ms"}, path)
    targets = tuple(str(t) for t in r.seq(d.get("targets"), f"{path}.targets"))
    if not targets:
        raise r.fail(f"{path}.targets", "a route needs at least one target model")
    return RouteConfig(model=r.str_(d, "model", path), targets=targets,
                       hedge_after_ms=r.num(d, "hedge_after_ms", path, None))


def _observability(r: _Reader, raw: Any) -> ObservabilityConfig:
    path = "observability"
    d = r.mapping(raw, path)
    r.unknown(d, {"log_format", "log_level", "access_log", "otel_endpoint", "service_name",
                  "trace_sample_ratio"}, path)
    base = ObservabilityConfig()
    fmt = r.str_(d, "log_format", path, base.log_format)
    if fmt not in ("json", "text"):
        raise r.fail(f"{path}.log_format", f"expected json or text, got {fmt!r}")
    level = r.str_(d, "log_level", path, base.log_level).lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise r.fail(f"{path}.log_level", f"expected debug, info, warning or error, got {level!r}")
    endpoint = r.str_(d, "otel_endpoint", path, "").rstrip("/")
    if endpoint and not re.match(r"^https?://", endpoint):
        raise r.fail(f"{path}.otel_endpoint", f"expected an http(s) URL, got {endpoint!r}")
    ratio = r.num(d, "trace_sample_ratio", path, base.trace_sample_ratio)
    if ratio is None or not 0 <= ratio <= 1:
        raise r.fail(f"{path}.trace_sample_ratio", "expected a number between 0 and 1")
    access_log = d.get("access_log", True)
    if not isinstance(access_log, bool):
        raise r.fail(f"{path}.access_log", f"expected true or false, got {access_log!r}")
    return ObservabilityConfig(log_format=fmt, log_level=level, access_log=access_log,
                               otel_endpoint=endpoint,
                               service_name=r.str_(d, "service_name", path, base.service_name),
                               trace_sample_ratio=ratio)


def parse_config(data: Any, source: str) -> Config:
    """Build a Config from parsed YAML; raises ConfigError naming what is wrong."""
    r = _Reader(source)
    d = r.mapping(data, "")
    r.unknown(d, {"listen", "store", "limits", "admin_key", "keys", "channels", "routes",
                  "timeouts", "router", "max_body_bytes", "shutdown_grace_s", "observability",
                  "prices", "key_cache_s", "server"}, "")
    listen = r.mapping(d.get("listen"), "listen")
    r.unknown(listen, {"http", "grpc"}, "listen")
    default_timeouts = _timeouts(r, d.get("timeouts"), "timeouts", Timeouts())
    channels = tuple(_channel(r, c, f"channels[{i}]", default_timeouts)
                     for i, c in enumerate(r.seq(d.get("channels"), "channels")))
    names = [c.name for c in channels]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise r.fail(f"channels[{i}].name", f"duplicate channel name {n!r}")
    keys = tuple(_key(r, k, f"keys[{i}]") for i, k in enumerate(r.seq(d.get("keys"), "keys")))
    routes = tuple(_route(r, x, f"routes[{i}]") for i, x in enumerate(r.seq(d.get("routes"), "routes")))
    served = {m for c in channels for m in c.models}
    aliases = {x.model for x in routes}
    for i, route in enumerate(routes):
        for j, target in enumerate(route.targets):
            if target not in served and target not in aliases:
                raise r.fail(f"routes[{i}].targets[{j}]", f"no channel serves model {target!r}")
    rd = r.mapping(d.get("router"), "router")
    r.unknown(rd, {"max_attempts", "backoff_ms", "max_retry_after_s", "circuit"}, "router")
    cd = r.mapping(rd.get("circuit"), "router.circuit")
    if "threshold" in cd:
        raise r.fail("router.circuit.threshold", "replaced by failure_ratio + min_requests "
                     "(the circuit now opens on a failure ratio; docs/failure-contract.md)")
    r.unknown(cd, {"failure_ratio", "min_requests", "window_s", "cooldown_s",
                   "half_open_requests"}, "router.circuit")
    ratio = r.num(cd, "failure_ratio", "router.circuit", 0.5)
    if ratio is not None and not 0 < ratio <= 1:
        raise r.fail("router.circuit.failure_ratio", "must be more than 0 and at most 1")
    router = RouterSettings(
        max_attempts=int(r.int_(rd, "max_attempts", "router", 3) or 1),
        backoff_ms=r.num(rd, "backoff_ms", "router", 50.0) or 0.0,
        max_retry_after_s=r.num(rd, "max_retry_after_s", "router", 2.0) or 0.0,
        circuit=CircuitSettings(
            failure_ratio=ratio or 0.5,
            min_requests=int(r.int_(cd, "min_requests", "router.circuit", 20) or 1),
            window_s=r.num(cd, "window_s", "router.circuit", 30.0) or 0.0,
            cooldown_s=r.num(cd, "cooldown_s", "router.circuit", 30.0) or 0.0,
            half_open_requests=int(r.int_(cd, "half_open_requests", "router.circuit", 1) or 1),
        ),
    )
    limits_backend, limit_settings = _limits(r, d.get("limits"))
    return Config(
        listen_http=r.str_(listen, "http", "listen", Config.listen_http),
        listen_grpc=r.str_(listen, "grpc", "listen", Config.listen_grpc),
        store=_store(r, d),
        limits=limits_backend, limit_settings=limit_settings, prices=_prices(r, d.get("prices")),
        key_cache_s=r.num(d, "key_cache_s", "", Config.key_cache_s) or 0.0,
        admin_key=_admin_key(r, d),
        keys=keys, channels=channels, routes=routes, router=router,
        max_body_bytes=int(r.int_(d, "max_body_bytes", "", Config.max_body_bytes) or 0),
        shutdown_grace_s=r.num(d, "shutdown_grace_s", "", Config.shutdown_grace_s) or 0.0,
        observability=_observability(r, d.get("observability")),
        server=_server(r, d.get("server")),
        source=source,
    )


def load_config_text(text: str, source: str, env: dict[str, str] | None = None) -> Config:
    try:
        data = yaml.safe_load(substitute_env(text, source, env))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "parse"
        raise ConfigError(f"{source}: {where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, source)


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate a config file (called once at start-up, before the loop runs)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return load_config_text(text, str(p), env)


def demo_config() -> Config:
    """The embedded default: the echo demo provider and a well-known key, loopback only."""
    return Config(
        keys=(KeyConfig(name="demo", key=DEMO_KEY),),
        channels=(ChannelConfig(name="echo", provider="echo", base_url="",
                                models={"echo": "echo", "echo-image": "echo-image"},
                                owned_by="switchboard-demo"),),
        store="sqlite://:memory:",  # the demo leaves no file behind
        source="<demo>",
    )
