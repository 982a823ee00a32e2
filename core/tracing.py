"""OpenTelemetry tracing, optional: off unless `observability.otel_endpoint` is set, and
this module imports and runs without opentelemetry installed (install the `otel`
extra: `pip install 'switchboard[otel]'`).

Spans (GenAI semantic conventions where they fit):

- one SERVER span per request, named `{operation} {model}` (e.g. `chat gpt-4o`), whose
  parent is the caller's W3C `traceparent` (REST header, or gRPC metadata key
  `traceparent`); attributes gen_ai.operation.name, gen_ai.request.model,
  gen_ai.usage.input_tokens/output_tokens, switchboard.request_id / key_name /
  channel / surface, rpc.grpc.status_code, error.type when it failed;
- one CLIENT child span per upstream attempt, named `{operation} {upstream model}`, with
  gen_ai.provider.name, switchboard.channel and error.type when the attempt failed.
  For a stream the attempt span ends when the first chunk arrives (that is the part a
  failover can retry); the request span covers the whole stream.

Each gateway has its own TracerProvider (no global state, so an embedding application
keeps its own); spans go through a BatchSpanProcessor to OTLP/HTTP at
`{otel_endpoint}/v1/traces`, exported from the SDK's worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from switchboard.core.config import ObservabilityConfig

log = logging.getLogger("switchboard.tracing")

try:  # the optional extra
    from opentelemetry import trace as _trace
    from opentelemetry.sdk.resources import Resource as _Resource
    from opentelemetry.sdk.trace import SpanProcessor as _SpanProcessor
    from opentelemetry.sdk.trace import TracerProvider as _TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor as _BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased as _ParentBased
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased as _TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import (
        TraceContextTextMapPropagator as _Propagator,
    )
    HAVE_OTEL = True
except ImportError:  # pragma: no cover - exercised by a subprocess test without the extra
    HAVE_OTEL = False


class Tracing:
    """The tracer a gateway uses; `enabled` is False when tracing is off."""

    def __init__(self, provider: Any = None, service_name: str = "switchboard") -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer = provider.get_tracer("switchboard") if provider is not None else None
        self._propagator = _Propagator() if self.enabled else None

    @classmethod
    def build(cls, obs: ObservabilityConfig, *, processor: Any = None) -> Tracing:
        """From config; `processor` (an SDK SpanProcessor) replaces the OTLP exporter —
        an embedding application or a test can collect spans its own way."""
        if not obs.otel_endpoint and processor is None:
            return cls()
        if not HAVE_OTEL:
            log.warning("observability.otel_endpoint is set but OpenTelemetry is not installed "
                        "(pip install 'switchboard[otel]'); tracing stays off")
            return cls()
        provider = _TracerProvider(
            resource=_Resource.create({"service.name": obs.service_name}),
            sampler=_ParentBased(_TraceIdRatioBased(obs.trace_sample_ratio)))
        if processor is None:
            processor = _otlp_processor(obs.otel_endpoint)
        provider.add_span_processor(processor)
        return cls(provider, obs.service_name)

    def start_request(self, name: str, traceparent: str, attributes: dict[str, Any]) -> Any:
        """A SERVER span for one request (None when tracing is off)."""
        if self.tracer is None:
            return None
        parent = None
        if traceparent and self._propagator is not None:
            parent = self._propagator.extract({"traceparent": traceparent})
        return self.tracer.start_span(name, context=parent, kind=_trace.SpanKind.SERVER,
                                      attributes=attributes)

    def start_attempt(self, parent: Any, name: str, attributes: dict[str, Any]) -> Any:
        if self.tracer is None or parent is None:
            return None
        return self.tracer.start_span(name, context=_trace.set_span_in_context(parent),
                                      kind=_trace.SpanKind.CLIENT, attributes=attributes)

    @staticmethod
    def end(span: Any, error_type: str | None = None, description: str = "",
            attributes: dict[str, Any] | None = None) -> None:
        if span is None:
            return
        if attributes:
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error_type:
            span.set_attribute("error.type", error_type)
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, description[:200]))
        span.end()

    async def close(self) -> None:
        if self.provider is not None:
            # shutdown() flushes the batch synchronously: keep it off the event loop.
            await asyncio.to_thread(self.provider.shutdown)


def _otlp_processor(endpoint: str) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("opentelemetry-exporter-otlp-proto-http is not installed; spans are dropped")
        return _SpanProcessor()
    return _BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
