"""OpenTelemetry tracing: on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, free when not.

``configure`` installs an SDK tracer provider exporting over OTLP/HTTP; the SDK
reads the standard ``OTEL_*`` variables (``OTEL_TRACES_SAMPLER``,
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*``, headers, timeouts). Without it,
``enabled()`` is False and the stages skip every tracing step: no span, no
header, no context, on any message.

A job's trace context travels as a W3C ``traceparent`` Kafka record header on
every topic it crosses (``inject`` / ``extract``, the SDK's W3C propagator).
Stages that handle a micro-batch make each job's span after the fact, with the
batch's start and end times (``start_time`` / ``end_time``, ``now_ns``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from kontext.settings import Settings

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
Headers = list[tuple[str, bytes]]

_provider: object | None = None


def configure(settings: Settings, services: Sequence[str]) -> bool:
    """Export this process's spans when an OTLP endpoint is configured; returns whether.
    The service name is ``OTEL_SERVICE_NAME``, else ``kontext-<service>`` (``kontext``
    for a process running several)."""
    global _provider
    if _provider is not None:
        return True
    endpoint = settings.otel_exporter_otlp_endpoint
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    default = f"kontext-{services[0]}" if len(services) == 1 else "kontext"
    resource = Resource.create({SERVICE_NAME: settings.otel_service_name or default})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER(_ARG)
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        endpoint.rstrip("/") + "/v1/traces"
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces)))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing to %s", traces)
    return True


def enabled() -> bool:
    """Whether this process exports spans (guard every tracing step with it)."""
    return _provider is not None


def shutdown() -> None:
    """Export what is buffered and stop (a process's last step)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()  # type: ignore[attr-defined]
        _provider = None


def tracer() -> trace.Tracer:
    return trace.get_tracer("kontext")


def now_ns() -> int:
    """A span timestamp for now."""
    return time.time_ns()


class _Getter:
    def get(self, carrier: dict[str, bytes], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value.decode(errors="replace")] if value is not None else None

    def keys(self, carrier: dict[str, bytes]) -> list[str]:
        return list(carrier)


class _Setter:
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_GETTER = _Getter()
_SETTER = _Setter()


def inject(headers: Headers, context: Context | None = None) -> None:
    """Add the trace context (``context``, else the current one) to Kafka ``headers``."""
    propagate.inject(headers, context=context, setter=_SETTER)  # type: ignore[arg-type]


def headers_for(span: trace.Span) -> Headers:
    """Kafka headers carrying ``span`` as the parent of the next hop."""
    headers: Headers = []
    inject(headers, trace.set_span_in_context(span))
    return headers


def extract(headers: Iterable[tuple[str, bytes]] | None) -> Context:
    """The trace context a record's headers carry (an empty one when none)."""
    found = {key: value for key, value in headers or () if key in (TRACEPARENT, "tracestate")}
    if not found:
        return otel_context.Context()
    return propagate.extract(found, getter=_GETTER)  # type: ignore[arg-type]


def from_traceparent(traceparent: str | None) -> Context:
    """The context a stored ``traceparent`` names (an empty one when None)."""
    if not traceparent:
        return otel_context.Context()
    return extract([(TRACEPARENT, traceparent.encode())])


def traceparent_of(span: trace.Span) -> str | None:
    """``span``'s W3C ``traceparent``, to store beside the work it leads to."""
    for key, value in headers_for(span):
        if key == TRACEPARENT:
            return value.decode()
    return None


def span_context(headers: Iterable[tuple[str, bytes]] | None) -> trace.SpanContext | None:
    """The span a record's ``traceparent`` names, for a link; None when it has none."""
    found = trace.get_current_span(extract(headers)).get_span_context()
    return found if found.is_valid else None


def start(
    name: str,
    parent: Context | None,
    *,
    start_time: int | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    links: Sequence[trace.Link] | None = None,
) -> trace.Span:
    """A span under ``parent`` (None: the current context); end it with ``span.end()``."""
    return tracer().start_span(
        name,
        context=parent,
        kind=kind,
        attributes=attributes,
        links=links,
        start_time=start_time,
    )


def fail(span: trace.Span, code: str, message: str) -> None:
    """Mark ``span`` failed with a job's error code and message."""
    span.set_attribute("kontext.error.code", code)
    span.set_status(trace.Status(trace.StatusCode.ERROR, message))
