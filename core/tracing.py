"""Optional OpenTelemetry tracing: W3C trace context on entries, a span per publish and per handled order.

Off, at the cost of one check per chunk or per batch and an empty `with` per order, unless
opentelemetry-api is installed and the service configured a tracer provider
(trace.set_tracer_provider, or opentelemetry-instrument). The wire format is always W3C trace
context (`traceparent`, and `tracestate` when there is one), whatever OTEL_PROPAGATORS says, so
any client in any language can continue a trace, and baggage (which may carry personal data)
never lands in the stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

try:  # optional: without it every hook here is the constant no-op path
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised where opentelemetry-api is not installed
    INSTALLED = False
else:
    INSTALLED = True
    _W3C = TraceContextTextMapPropagator()

# Longer values are ignored, not decoded: entries from other clients are untrusted.
# W3C's limits: a traceparent is 55 characters; opentelemetry takes a tracestate up to 8192.
_MAX_TRACEPARENT = 512
_MAX_TRACESTATE = 8192
_NO_FIELDS: AbstractContextManager[Sequence[str]] = nullcontext(())


@functools.lru_cache(maxsize=4)
def _tracer_of(provider: TracerProvider) -> Tracer:
    return provider.get_tracer("orders")


def _tracer() -> Tracer | None:
    """The configured provider's tracer; None without opentelemetry or without a provider."""
    if not INSTALLED:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return _tracer_of(provider)


def sending(stream: str, count: int) -> AbstractContextManager[Sequence[str]]:
    """A PRODUCER span `send STREAM` around handing `count` orders to Redis, the current span its parent.

    Yields the fields to add to each of those entries: name, value, name, value (the span's
    trace context); nothing when tracing is off. An exception inside marks the span failed.
    """
    tracer = _tracer()
    return _NO_FIELDS if tracer is None else _send_span(tracer, stream, count)


@contextmanager
def _send_span(tracer: Tracer, stream: str, count: int) -> Iterator[Sequence[str]]:
    attributes: dict[str, str | int] = {
        "messaging.system": "redis",
        "messaging.destination.name": stream,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    with tracer.start_as_current_span(f"send {stream}", kind=SpanKind.PRODUCER, attributes=attributes):
        carrier: dict[str, str] = {}
        _W3C.inject(carrier)
        yield [item for pair in carrier.items() for item in pair]


class Processing:
    """CONSUMER spans `process STREAM` for one group's consumer, each continuing its entry's trace."""

    def __init__(self, tracer: Tracer, stream: str, group: str, consumer: str) -> None:
        self.tracer = tracer
        self.name = f"process {stream}"
        self.attributes = {
            "messaging.system": "redis",
            "messaging.destination.name": stream,
            "messaging.consumer.group.name": group,
            "messaging.client.id": consumer,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
        }
        # The entries of one chunk carry one trace context: parsed once, not once per entry.
        self.carried: tuple[bytes | None, bytes | None] = (None, None)
        self.parent = Context()

    def span(self, entry_id: bytes, fields: Mapping[bytes, bytes]) -> AbstractContextManager[Span]:
        """The span of one order's handler, current while it runs (its own spans are children).

        Its parent is the entry's trace context; without one, or with one that is not valid
        W3C trace context (another client's), it starts a new trace. An exception inside is
        recorded on it, status error, and raised on.
        """
        carried = fields.get(b"traceparent"), fields.get(b"tracestate")
        if carried != self.carried:
            self.carried, self.parent = carried, _parent(*carried)
        span: AbstractContextManager[Span] = self.tracer.start_as_current_span(
            self.name,
            context=self.parent,
            kind=SpanKind.CONSUMER,
            attributes={**self.attributes, "messaging.message.id": entry_id.decode()},
        )
        return span


def processing(stream: str, group: str, consumer: str) -> Processing | None:
    """Once per batch: the maker of its orders' spans, or None when tracing is off."""
    tracer = _tracer()
    return None if tracer is None else Processing(tracer, stream, group, consumer)


def _parent(traceparent: bytes | None, tracestate: bytes | None) -> Context:
    """The trace context of an entry's fields; an empty one (a new trace) when it has none or a bad one."""
    if traceparent is None or len(traceparent) > _MAX_TRACEPARENT:
        return Context()
    carrier = {"traceparent": traceparent.decode(errors="replace")}
    if tracestate is not None and len(tracestate) <= _MAX_TRACESTATE:
        carrier["tracestate"] = tracestate.decode(errors="replace")
    return _W3C.extract(carrier)
