"""Prometheus metrics for one gateway, exposed at GET /metrics on the HTTP port.

Names follow Prometheus conventions (base units, `_total` counters) and, where one
exists, the OpenTelemetry GenAI semantic-convention metric translated the way the
OTel→Prometheus exporter does it (`gen_ai.server.request.duration` →
`gen_ai_server_request_duration_seconds`). Labels are the same everywhere:
`model` (the model the caller asked for), `channel` (the upstream channel that served
it, "" when none did), `surface` (rest | grpc), `status` (the gRPC status name, which
maps 1:1 to the HTTP status by core/errors.py).

    switchboard_requests_total{model,channel,surface,status}      counter
    gen_ai_server_request_duration_seconds{model,channel,surface,status}  histogram
    gen_ai_server_time_to_first_token_seconds{model,channel,surface}     histogram
    switchboard_tokens_total{model,channel,type}   counter, type = input | output
                                                   (OTel gen_ai.token.type values)
    switchboard_upstream_errors_total{channel,reason}   counter (per failed attempt)
    switchboard_circuit_state{channel}   gauge: 0 closed, 1 half-open, 2 open
    switchboard_circuit_panic_total{model}   counter: requests sent to open channels
                                             because every candidate was open
    switchboard_in_flight_requests{surface} / switchboard_in_flight_streams{surface}
    switchboard_limiter_rejections_total{reason}   requests refused by our own limits
    switchboard_config_reloads_total{result}       result = ok | error

Circuit state is read from the breaker (which may live in Redis) when /metrics is
scraped, not on the request path. Each Gateway owns its registry (tests run several
in one process); the process collectors (CPU, RSS, fds) are added to it as well. A model name nobody serves is
reported as "(unknown)" so that callers cannot grow the label set without bound.
With `--workers N` each worker has its own registry: a scrape sees one worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from switchboard.core.usage import UsageRecord

# OTel GenAI semantic-convention bucket advice for these two histograms.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
UNKNOWN_MODEL = "(unknown)"


class Metrics:
    def __init__(self, *, known_model: Callable[[str], bool] | None = None,
                 process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        self.known_model = known_model or (lambda m: True)
        r = self.registry
        labels = ["model", "channel", "surface", "status"]
        self.requests = Counter("switchboard_requests", "Requests handled, by outcome.",
                                labels, registry=r)
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "Time from receiving a request to its last byte.",
                                  labels, buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                              "Time from receiving a request to the first output token.",
                              ["model", "channel", "surface"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("switchboard_tokens", "Tokens reported by upstreams.",
                              ["model", "channel", "type"], registry=r)
        self.upstream_errors = Counter("switchboard_upstream_errors",
                                       "Failed upstream attempts, by channel and reason.",
                                       ["channel", "reason"], registry=r)
        self.in_flight = Gauge("switchboard_in_flight_requests",
                               "Requests being served now (streams included).", ["surface"],
                               registry=r)
        self.in_flight_streams = Gauge("switchboard_in_flight_streams",
                                       "Streaming responses open now.", ["surface"], registry=r)
        self.limiter_rejections = Counter("switchboard_limiter_rejections",
                                          "Requests refused by the gateway's own limits.",
                                          ["reason"], registry=r)
        self.reloads = Counter("switchboard_config_reloads", "Config reloads, by result.",
                               ["result"], registry=r)
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.circuit = Gauge("switchboard_circuit_state",
                             "Circuit breaker state per channel: 0 closed, 1 half-open, 2 open.",
                             ["channel"], registry=r)
        self.circuit_panic = Counter("switchboard_circuit_panic",
                                     "Requests routed to open channels because every candidate "
                                     "of the request was open (panic routing).", ["model"],
                                     registry=r)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def model_label(self, model: str) -> str:
        return model if model and self.known_model(model) else UNKNOWN_MODEL

    def _series(self, model: str, channel: str, surface: str, status: str) -> tuple[Any, ...]:
        # labels() takes a lock and builds a key on every call: keep the children per
        # label set (bounded: model names are known ones or "(unknown)").
        key = (model, channel, surface, status)
        series = self._children.get(key)
        if series is None:
            series = (self.requests.labels(*key), self.duration.labels(*key),
                      self.ttft.labels(model, channel, surface),
                      self.tokens.labels(model, channel, "input"),
                      self.tokens.labels(model, channel, "output"))
            self._children[key] = series
        return series

    def observe(self, rec: UsageRecord) -> None:
        """Everything one finished request contributes."""
        requests, duration, ttft, tokens_in, tokens_out = self._series(
            self.model_label(rec.model), rec.channel, rec.surface, rec.status)
        requests.inc()
        duration.observe(rec.latency_ms / 1000.0)
        if rec.ttft_ms is not None:
            ttft.observe(rec.ttft_ms / 1000.0)
        if rec.prompt_tokens:
            tokens_in.inc(rec.prompt_tokens)
        if rec.completion_tokens:
            tokens_out.inc(rec.completion_tokens)

    def upstream_error(self, channel: str, reason: str) -> None:
        self.upstream_errors.labels(channel, reason).inc()

    def circuit_panicked(self, model: str) -> None:
        self.circuit_panic.labels(self.model_label(model)).inc()

    def limiter_rejected(self, reason: str) -> None:
        self.limiter_rejections.labels(reason).inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "error").inc()

    def set_circuits(self, states: Iterable[tuple[str, str]]) -> None:
        """Refreshed just before each scrape (breaker state may live in Redis: async)."""
        self.circuit.clear()  # channels removed by a reload disappear
        for channel, state in states:
            self.circuit.labels(channel).set(CIRCUIT_VALUES.get(state, 0))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def process_only_metrics() -> Metrics:
    """For a façade-only process: no requests are served here, only process metrics."""
    return Metrics()
