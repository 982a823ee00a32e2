"""YAML configuration → typed, validated config objects.

The whole config is described once, as pydantic models (one per section, unknown keys
rejected); the reference in docs/configuration.md is generated from them
(scripts/gen_config_docs.py), so the two cannot drift. Each provider module declares its
own channel `options` model (core/providers/__init__.py lists them), validated here when
the config loads, not when a request arrives.

`${NAME}` and `${NAME:-default}` are substituted from the environment before any
value is read, so secrets never need to sit in the file. Every problem is reported
as a `ConfigError` naming the file, the path inside it (e.g. `channels[1].provider`)
and what is wrong; a config either loads whole or not at all.

With no file at all, `demo_config()` gives the embedded default: one `echo` demo
channel and a well-known demo key, listening on loopback only.

Why pydantic (v2): its error locations (`('channels', 1, 'provider')`) map directly onto
our `file: path: problem` messages, its JSON Schema export describes the same models the
reference is generated from, and it was already installed with the providers' SDKs.
The models are built once per load; the hot path only reads their attributes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from switchboard.core.providers.base import ProviderClient

DEMO_KEY = "sk-switchboard-demo"


class ConfigError(Exception):
    """A config problem: `file: path: message`."""


# ------------------------------------------------------------------ problems ----


def problem(message: str, *at: str | int) -> PydanticCustomError:
    """A config error raised inside a validator: `message` is shown as is, `at` extends
    the path pydantic reports (e.g. the index of a bad list item)."""
    return PydanticCustomError("config", "{problem}", {"problem": message, "at": at})


def where(loc: Sequence[str | int]) -> str:
    """('channels', 1, 'provider') -> 'channels[1].provider'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def first_problem(err: ValidationError) -> tuple[tuple[str | int, ...], str]:
    """The first error of a validation as (path, problem), in our words."""
    e = err.errors(include_url=False, include_input=False)[0]
    loc = tuple(e["loc"])
    ctx = e.get("ctx") or {}
    if e["type"] == "config":
        return loc + tuple(ctx.get("at", ())), str(ctx["problem"])
    if e["type"] == "missing":
        return loc, "is required"
    if e["type"] == "extra_forbidden":
        return loc, "unknown setting"
    return loc, str(e["msg"])


# --------------------------------------------------------- value checkers ----
# Each check does the whole job and returns the final Python value, so pydantic's own
# checks behind it never fail and every message is ours.


def _string(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise problem(f"expected a string, got {type(v).__name__}")


def _number(minimum: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise problem(f"expected a number, got {v!r}")
        if v < minimum:
            raise problem(f"must be >= {minimum:g}, got {v!r}")
        return float(v)
    return check


def _whole(minimum: int | None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise problem(f"expected a whole number, got {v!r}")
        if minimum is not None and v < minimum:
            raise problem(f"must be >= {minimum}, got {v!r}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise problem(f"expected true or false, got {v!r}")
    return v


def one_of(*allowed: str, message: str = "", lower: bool = False) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _string(v).lower() if lower else _string(v)
        if s not in allowed:
            raise problem(f"{message or 'expected one of ' + ', '.join(allowed)}, got {s!r}")
        return s
    return check


def _list(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return v
    raise problem(f"expected a list, got {type(v).__name__}")


def _mapping(v: Any) -> Any:
    if isinstance(v, dict):
        return v
    raise problem(f"expected a mapping, got {type(v).__name__}")


def _str_map(v: Any) -> dict[str, str]:
    return {str(k): str(x) for k, x in _mapping(v).items()}


def _str_keys(v: Any) -> dict[str, Any]:
    return {str(k): x for k, x in _mapping(v).items()}


def _str_list(v: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in _list(v))


def _or(default: float) -> Callable[[Any], Any]:
    """0 means the default (kept from the hand-written reader: `max_attempts: 0` is 1)."""
    def after(v: Any) -> Any:
        return v or default
    return after


# The value types the models use; their names say what a YAML value must be.
Str = Annotated[str, BeforeValidator(_string)]
Num = Annotated[float, BeforeValidator(_number(0.0))]
OptNum = Annotated[float | None, BeforeValidator(_number(0.0))]
Whole = Annotated[int, BeforeValidator(_whole(0))]
OptWhole = Annotated[int | None, BeforeValidator(_whole(0))]
AtLeastOne = Annotated[int, BeforeValidator(_whole(0)), AfterValidator(_or(1))]
Int = Annotated[int, BeforeValidator(_whole(None))]
Bool = Annotated[bool, BeforeValidator(_bool)]
OptBool = Annotated[bool | None, BeforeValidator(_bool)]
StrMap = Annotated[dict[str, str], BeforeValidator(_str_map)]
StrList = Annotated[tuple[str, ...], BeforeValidator(_str_list)]
AnyMap = Annotated[dict[str, Any], BeforeValidator(_mapping)]


class Section(BaseModel):
    """A mapping in the config file. Absent and `null` keys take their defaults; unknown
    keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True,
                              validate_by_alias=True)
    # key -> why it is gone, for settings that were replaced
    retired: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _raw(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, BaseModel):
            return data
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise problem(f"expected a mapping, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if v is not None}
        for key, why in cls.retired.items():
            if key in data:
                raise problem(why, key)
        # From a file only the YAML keys count; code may also use the Python names.
        allowed = set(cls.yaml_keys()) if info.context else {
            n for name, f in cls.model_fields.items() for n in (name, f.alias) if n}
        extra = sorted(str(k) for k in data if k not in allowed)
        if extra:
            raise problem(f"unknown setting (expected one of: {', '.join(sorted(cls.yaml_keys()))})",
                          extra[0])
        return data

    @classmethod
    def yaml_keys(cls) -> dict[str, str]:
        """YAML key -> field name, for the keys a file may set."""
        return {f.alias or name: name for name, f in cls.model_fields.items() if not f.exclude}


# ------------------------------------------------------------------ sections ----


class Listen(Section):
    """Listen addresses (`HOST:PORT`; port 0 picks a free port). `--http` / `--grpc`
    override them."""

    http: Str = Field(default="127.0.0.1:8080", description="REST/SSE (OpenAI) surface")
    grpc: Str = Field(default="127.0.0.1:50051", description="gRPC API")


class Timeouts(Section):
    """Seconds; 0 disables a timeout. The caller's deadline wins when shorter."""

    connect: Num = Field(default=10.0, description="connecting to the upstream")
    first_token: Num = Field(default=60.0, description="from the request to the first token")
    idle: Num = Field(default=60.0, description="longest silence between two streamed chunks")
    total: Num = Field(default=600.0, description="the whole upstream call")


class ProviderOptions(Section):
    """Base of each provider's channel `options` model (declared in its module)."""

    @classmethod
    def of(cls, channel: ChannelConfig) -> Self:
        """The channel's options as this provider's model (validated when it loaded)."""
        opts = channel.options
        if not isinstance(opts, cls):
            raise TypeError(f"channel {channel.name!r} has {type(opts).__name__} options, "
                            f"not {cls.__name__}")
        return opts


@dataclass(frozen=True)
class ProviderSpec:
    """What a provider module declares: the name channels use in `provider:`, the
    upstream URL a channel gets when it sets none, its `options` model and its client."""

    name: str
    default_base_url: str
    options: type[ProviderOptions]
    client: type[ProviderClient]
    # False for providers without an upstream (the echo demo): no URL to check.
    upstream: bool = True


def provider_specs() -> Mapping[str, ProviderSpec]:
    """The provider registry (core/providers/__init__.py). Imported when a channel is
    validated, not at import time: the provider modules import this module for
    ChannelConfig and ProviderOptions."""
    from switchboard.core.providers import SPECS

    return SPECS


def _model_names(v: Any) -> Any:
    if isinstance(v, dict):  # built in code: already public -> upstream
        return v
    models: dict[str, str] = {}
    for i, m in enumerate(_list(v)):
        if not isinstance(m, str) or not m:
            raise problem(f"expected a model name, got {m!r}", i)
        models[m] = m
    return models


def _model_map(v: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for public, upstream in _mapping(v).items():
        if not isinstance(upstream, str) or not upstream:
            raise problem(f"expected an upstream model name, got {upstream!r}", str(public))
        out[str(public)] = upstream
    return out


class ChannelConfig(Section):
    """One upstream: a provider, where it is, its key and the models it serves."""

    name: Str = Field(description="unique name (logs, metrics, errors)")
    provider: Str = Field(description="the wire format upstream; one of the providers below")
    base_url: Str = Field(default=None, validate_default=True,
                          description="upstream base URL; default: the provider's")
    api_key: Str = Field(default="", description="the upstream's key (use `${ENV}`)")
    # public model name -> upstream model name (`models` and `model_map` together)
    models: Annotated[dict[str, str], BeforeValidator(_model_names)] = Field(
        default_factory=dict, json_schema_extra={"yaml_type": "list of strings", "yaml_default": "[]"},
        description="public model names served as-is (a channel serves at least one model, "
                    "here or in `model_map`)")
    model_map: Annotated[dict[str, str], BeforeValidator(_model_map)] = Field(
        default_factory=dict, description="public name -> a different upstream model name")
    weight: Num = Field(default=1.0, description="weighted choice between channels of one tier")
    priority: Int = Field(default=0, description="higher tiers are tried first")
    headers: StrMap = Field(default_factory=dict, description="extra headers sent upstream")
    timeouts: Timeouts = Field(default_factory=Timeouts,
                               description="per-channel; keys not set come from the top-level `timeouts`")
    # Provider-specific settings: the provider module's Options model.
    options: ProviderOptions = Field(default=None, validate_default=True,
                                     description="provider-specific settings (see Providers)")
    owned_by: Str = Field(default=None, validate_default=True,
                          description="`owned_by` in /v1/models; default: the provider name")

    @field_validator("provider")
    @classmethod
    def _known(cls, v: str) -> str:
        specs = provider_specs()
        if v not in specs:
            raise problem(f"unknown provider {v!r} (expected one of: {', '.join(specs)})")
        return v

    @field_validator("base_url", mode="before")
    @classmethod
    def _default_url(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            spec = provider_specs().get(info.data.get("provider", ""))
            return spec.default_base_url if spec else ""
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        v = v.rstrip("/")
        spec = provider_specs().get(info.data.get("provider", ""))
        if spec is not None and spec.upstream and not re.match(r"^https?://", v):
            raise problem(f"expected an http(s) URL, got {v!r}")
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any, info: ValidationInfo) -> Any:
        spec = provider_specs().get(info.data.get("provider", ""))
        if spec is None:  # the provider is already reported
            return ProviderOptions()
        if isinstance(v, spec.options):
            return v
        try:
            return spec.options.model_validate(v if v is not None else {}, context=info.context)
        except ValidationError as err:
            loc, message = first_problem(err)
            raise problem(message, *loc) from None

    @field_validator("owned_by", mode="before")
    @classmethod
    def _owner(cls, v: Any, info: ValidationInfo) -> Any:
        return info.data.get("provider", "") if v is None else v

    @model_validator(mode="after")
    def _served(self) -> Self:
        if self.model_map:
            # Frozen to callers; filled in once here, while the model is being built.
            self.__dict__["models"] = {**self.models, **self.model_map}
        return self


def _cidrs(v: Any) -> tuple[str, ...]:
    out = []
    for i, c in enumerate(_list(v)):
        try:
            out.append(str(ipaddress.ip_network(str(c), strict=False)))
        except ValueError:
            raise problem(f"expected a CIDR such as 10.0.0.0/8, got {c!r}", i) from None
    return tuple(out)


def _key_models(v: Any) -> tuple[str, ...]:
    return _str_list(v) or ("*",)


class KeyConfig(Section):
    """A static API key (held as a SHA-256 digest) and its limits."""

    name: Str = Field(description="shown in logs, usage and errors")
    key: Str = Field(description="the secret, at least 8 characters (use `${ENV}`)")
    models: Annotated[tuple[str, ...], BeforeValidator(_key_models)] = Field(
        default=("*",), description="model names or globs the key may use")
    rpm: OptWhole = Field(default=None, description="requests per minute")
    tpm: OptWhole = Field(default=None, description="tokens per minute")
    max_concurrent: OptWhole = Field(default=None, description="requests in flight at once")
    budget: OptNum = Field(default=None, description="spend allowed per `budget_period`, in `budget_unit`")
    budget_unit: Annotated[Literal["tokens", "usd"], BeforeValidator(one_of("tokens", "usd"))] = Field(
        default="tokens", description="what `budget` counts")
    budget_period: Annotated[Literal["day", "month", "total"],
                             BeforeValidator(one_of("day", "month", "total"))] = Field(
        default="total", description="when the budget starts afresh (UTC)")
    allowed_cidrs: Annotated[tuple[str, ...], BeforeValidator(_cidrs)] = Field(
        default=(), description="client networks the key may be used from; empty: any")

    @field_validator("key")
    @classmethod
    def _long_enough(cls, v: str) -> str:
        if len(v) < 8:
            raise problem("is shorter than 8 characters")
        return v


class LimitSettings(Section):
    """`limits: memory | redis://…`, or this mapping (core/limits.py)."""

    backend: Str = Field(default="memory", description="`memory`, or a `redis://` / `rediss://` URL shared "
                                               "by replicas (limits and circuit state)")
    on_error: Annotated[Literal["closed", "open"], BeforeValidator(one_of("closed", "open"))] = Field(
        default="closed", description="when Redis is unreachable: `closed` refuses requests (UNAVAILABLE), "
                              "`open` lets them through unlimited")
    key_prefix: Str = Field(default="switchboard", description="Redis key prefix (letters, digits, `_.:-`)")
    default_max_tokens: AtLeastOne = Field(
        default=1024, description="completion tokens reserved when a request names no max_tokens")
    lease_s: Annotated[float, BeforeValidator(_number(1.0))] = Field(
        default=900.0, description="how long a concurrency slot outlives a replica that died holding it")
    redis_timeout_s: Annotated[float, BeforeValidator(_number(0.0)), AfterValidator(_or(0.5))] = Field(
        default=0.5, description="per Redis call; 0 means the default")
    # core/redis_pool.py: a request waits for a free connection rather than opening more;
    # idle ones are closed, so the descriptors a burst opened are given back.
    redis_max_connections: AtLeastOne = Field(
        default=32, description="connections each Redis client (limiter, circuit breaker) keeps at "
                                "most; a request waits for a free one")
    redis_idle_s: Num = Field(default=60.0, description="Redis connections idle this long are closed")

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", v):
            raise problem("use letters, digits and _.:- only")
        return v

    @model_validator(mode="after")
    def _backend(self) -> Self:
        if self.backend != "memory" and not re.match(r"^rediss?://", self.backend):
            raise problem(f"expected memory or a redis:// URL, got {self.backend!r}")
        return self


class Price(Section):
    """US dollars per million tokens (and per generated image)."""

    prompt: Num = Field(default=0.0, description="per million prompt tokens")
    completion: Num = Field(default=0.0, description="per million completion tokens")
    cached_prompt: OptNum = Field(default=None, description="per million cached prompt tokens; "
                                                    "default: the `prompt` price")
    image: Num = Field(default=0.0, description="per generated image")


def _targets(v: Any) -> tuple[str, ...]:
    targets = _str_list(v)
    if not targets:
        raise problem("a route needs at least one target model")
    return targets


class RouteConfig(Section):
    """A public model name that tries other model names in order (alias or fallback chain)."""

    model: Str = Field(description="the name clients ask for")
    targets: Annotated[tuple[str, ...], BeforeValidator(_targets)] = Field(
        description="model names (served by a channel, or other routes), tried in order")
    hedge_after_ms: OptNum = Field(default=None, description="start the next target too if the first has "
                                                     "no first token after this long")


class CircuitSettings(Section):
    """A channel is cooled down for `cooldown_s` when, within the last `window_s`, at
    least `min_requests` requests reached it and at least `failure_ratio` of them
    failed; then up to `half_open_requests` trials at a time decide whether it closes
    again (core/circuit.py, which also says why these defaults)."""

    retired: ClassVar[dict[str, str]] = {
        "threshold": "replaced by failure_ratio + min_requests (the circuit now opens on a "
                     "failure ratio; docs/failure-contract.md)"}

    failure_ratio: Num = Field(default=0.5, description="share of failed requests that opens the circuit "
                                                "(more than 0, at most 1)")
    min_requests: AtLeastOne = Field(default=20, description="requests in the window before it is judged")
    window_s: Num = Field(default=30.0, description="the sliding window, seconds")
    cooldown_s: Num = Field(default=30.0, description="how long an open circuit keeps the channel out")
    half_open_requests: AtLeastOne = Field(default=1,
                                           description="trial requests at a time after the cooldown")

    @field_validator("failure_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise problem("must be more than 0 and at most 1")
        return v


class RouterSettings(Section):
    """Retries and failover between channels (core/router.py)."""

    max_attempts: AtLeastOne = Field(default=3, description="channels tried per request")
    backoff_ms: Num = Field(default=50.0, description="pause before a retry")
    max_retry_after_s: Num = Field(default=2.0, description="honour an upstream 429's Retry-After only "
                                                    "when it is at most this long")
    circuit: CircuitSettings = Field(default_factory=CircuitSettings,
                                     description="the per-channel circuit breaker")


class ServerSettings(Section):
    """What one client may cost a listener (facade/guard.py, core/server.py). A request's
    line and headers must arrive within `header_timeout_s` of the connection opening or
    of its first byte, its body within `body_timeout_s` after that; otherwise the client
    gets 408 and the connection is closed. A keep-alive connection with no request is
    closed after `idle_timeout_s`. Beyond `max_connections` open connections a listener
    answers new ones with 503 and closes them at once. 0 disables a setting."""

    header_timeout_s: Num = Field(default=10.0, description="request line and headers (408 after)")
    body_timeout_s: Num = Field(default=60.0, description="the body, after the headers (408 after)")
    idle_timeout_s: Num = Field(default=75.0, description="a keep-alive connection with no request")
    max_connections: Whole = Field(default=10000, description="open connections per listener "
                                                              "(503 beyond)")


def _endpoint(v: Any) -> str:
    s = _string(v).rstrip("/")
    if s and not re.match(r"^https?://", s):
        raise problem(f"expected an http(s) URL, got {s!r}")
    return s


def _ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise problem("expected a number between 0 and 1")
    return float(v)


class ObservabilityConfig(Section):
    """Logs, metrics and traces (docs/operations.md). Tracing is off unless
    `otel_endpoint` is set (needs the `otel` extra)."""

    log_format: Annotated[Literal["json", "text"],
                          BeforeValidator(one_of("json", "text", message="expected json or text"))] = Field(
        default="json", description="log line format")
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(
        one_of("debug", "info", "warning", "error", "critical", lower=True,
                message="expected debug, info, warning or error"))] = Field(
        default="info", description="log level")
    access_log: Bool = Field(default=True, description="one line per request (logger switchboard.access)")
    otel_endpoint: Annotated[str, BeforeValidator(_endpoint)] = Field(
        default="", description="OTLP/HTTP base URL, e.g. http://otel-collector:4318; empty: tracing off")
    service_name: Str = Field(default="switchboard", description="`service.name` of traces")
    trace_sample_ratio: Annotated[float, BeforeValidator(_ratio)] = Field(
        default=1.0, description="share of requests traced, 0 to 1")


def _limits(v: Any) -> Any:
    return {"backend": v or "memory"} if isinstance(v, str) else v


def _admin_key(v: Any) -> str:
    key = _string(v)
    if key and len(key) < 8:
        raise problem("is shorter than 8 characters")
    return key


def _store(v: Any) -> str:
    dsn = _string(v)
    if not dsn.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise problem("expected sqlite:///path/to/file.db or a postgresql:// DSN")
    return dsn


class Config(Section):
    """The top level of the config file."""

    listen: Listen = Field(default_factory=Listen, description="listen addresses")
    store: Annotated[str, BeforeValidator(_store)] = Field(
        default="sqlite:///./switchboard.db", description="keys and usage: `sqlite:///path/to/file.db` or a "
                                                  "`postgresql://` DSN (several replicas)")
    limit_settings: Annotated[LimitSettings, BeforeValidator(_limits)] = Field(
        default_factory=LimitSettings, alias="limits",
        json_schema_extra={"yaml_type": "`memory`, a `redis://` URL, or a mapping"},
        description="where limits and circuit state live, and how limits behave")
    admin_key: Annotated[str, BeforeValidator(_admin_key)] = Field(
        default="", description="bearer key of the admin API (at least 8 characters); empty: admin API off")
    keys: Annotated[tuple[KeyConfig, ...], BeforeValidator(_list)] = Field(
        default=(), description="static API keys")
    timeouts: Timeouts = Field(default_factory=Timeouts,
                               description="defaults for every channel's `timeouts`")
    channels: Annotated[tuple[ChannelConfig, ...], BeforeValidator(_list)] = Field(
        default=(), description="upstream channels")
    routes: Annotated[tuple[RouteConfig, ...], BeforeValidator(_list)] = Field(
        default=(), description="aliases and ordered fallback chains")
    router: RouterSettings = Field(default_factory=RouterSettings, description="retries and failover")
    max_body_bytes: Whole = Field(default=20 * 1024 * 1024,
                                  description="largest REST request body (413 above)")
    shutdown_grace_s: Num = Field(default=30.0,
                                  description="on SIGTERM, how long in-flight requests may finish")
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig,
                                               description="logs, metrics and traces")
    server: ServerSettings = Field(default_factory=ServerSettings,
                                   description="what one client may cost a listener")
    # model name or glob -> price; the first matching entry in file order wins.
    price_table: Annotated[dict[str, Price], BeforeValidator(_str_keys)] = Field(
        default_factory=dict, alias="prices",
        json_schema_extra={"yaml_type": "mapping of model name or glob → [price](#prices)"},
        description="prices for usage costs and `usd` budgets; the first matching entry in file "
                    "order wins")
    # Store-backed keys are cached this long: revocation, disabling and edits reach every
    # replica within it (expiry is checked on every request).
    key_cache_s: Num = Field(default=2.0, description="how long store-backed keys are cached: revocation "
                                              "and edits reach every replica within it")
    source: str = Field(default="<builtin>", exclude=True, description="where the config came from")

    @field_validator("channels", mode="before")
    @classmethod
    def _channel_timeouts(cls, v: Any, info: ValidationInfo) -> Any:
        """Each channel's timeouts start from the top-level `timeouts`."""
        base = info.data.get("timeouts")
        if not isinstance(base, Timeouts) or not isinstance(v, (list, tuple)):
            return v
        defaults = base.model_dump()
        out = []
        for raw in v:
            if isinstance(raw, dict):
                own = raw.get("timeouts")
                if own is None:
                    raw = {**raw, "timeouts": defaults}
                elif isinstance(own, dict):
                    raw = {**raw, "timeouts": {**defaults, **{k: x for k, x in own.items()
                                                               if x is not None}}}
            out.append(raw)
        return out

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[ChannelConfig, ...]) -> tuple[ChannelConfig, ...]:
        seen: set[str] = set()
        for i, c in enumerate(v):
            if not c.models:
                raise problem("a channel must serve at least one model", i, "models")
            if c.name in seen:
                raise problem(f"duplicate channel name {c.name!r}", i, "name")
            seen.add(c.name)
        return v

    @model_validator(mode="after")
    def _route_targets(self) -> Self:
        served = {m for c in self.channels for m in c.models}
        aliases = {x.model for x in self.routes}
        for i, route in enumerate(self.routes):
            for j, target in enumerate(route.targets):
                if target not in served and target not in aliases:
                    raise problem(f"no channel serves model {target!r}", "routes", i, "targets", j)
        return self

    # The shapes the rest of the code reads.
    @property
    def listen_http(self) -> str:
        return self.listen.http

    @property
    def listen_grpc(self) -> str:
        return self.listen.grpc

    @property
    def limits(self) -> str:
        """The limits backend: `memory` or a redis:// URL."""
        return self.limit_settings.backend

    @property
    def prices(self) -> tuple[tuple[str, Price], ...]:
        return tuple(self.price_table.items())


# ------------------------------------------------------------------- loading ----

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, source: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ${NAME} / ${NAME:-default}; an unset variable without default is an error."""
    values: Mapping[str, str] = os.environ if env is None else env

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in values:
            return values[name]
        if default is not None:
            return default
        line = text.count("\n", 0, match.start()) + 1
        raise ConfigError(f"{source}: line {line}: environment variable {name} is not set "
                          f"(use ${{{name}:-default}} to give a default)")

    return _ENV.sub(repl, text)


def parse_config(data: Any, source: str) -> Config:
    """Build a Config from parsed YAML; raises ConfigError naming what is wrong."""
    try:
        config = Config.model_validate(data, context={"file": source})
    except ValidationError as err:
        loc, message = first_problem(err)
        path = where(loc)
        raise ConfigError(f"{source}: {path}: {message}" if path else f"{source}: {message}") from None
    return config.model_copy(update={"source": source})


def load_config_text(text: str, source: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        data = yaml.safe_load(substitute_env(text, source, env))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark is not None else "parse"
        raise ConfigError(f"{source}: {at}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, source)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
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
