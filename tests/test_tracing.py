"""Tracing: the producer's trace context travels in each entry and every group's handler continues it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing is optional: pip install opentelemetry-sdk")

from conftest import ROOT, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT
from test_pipeline import dead_letters, running

from config import Settings
from deadletter import redrive
from initialization_stream import initialize
from orders import Order, serialize
from producer import publish, publish_many, sample_orders
from status import caught_up
from stream_consumer import Handler

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer provider with an in-memory exporter, configured for this test only.

    The global provider can be set once per process; the tests of other files run without one.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    yield exporter
    provider.shutdown()


def of_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind == kind]


def traceparent_of(span: ReadableSpan) -> bytes:
    """The W3C traceparent of `span`."""
    assert span.context is not None
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()


async def fields_of(redis: Redis, stream: str) -> list[dict[bytes, bytes]]:
    entries: Any = await redis.xrange(stream)
    return [fields for _, fields in entries]


class Handled:
    """Both groups' handlers: which orders each ran, and the trace each ran in."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, trace.SpanContext]] = []

    def handler(self, group: str) -> Handler:
        async def handle(order: Order) -> None:
            # The handler runs inside its span: its own spans (an HTTP call, ...) are children.
            self.spans.append((group, order.order_id, trace.get_current_span().get_span_context()))

        return handle


async def test_one_trace_runs_from_publish_to_both_groups_handlers(
    redis: Redis, settings: Settings, exporter: InMemorySpanExporter
) -> None:
    await initialize(redis, settings)
    stream = settings.stream_key
    orders = sample_orders(3)
    ids = await publish_many(redis, stream, orders)
    [send] = of_kind(exporter, SpanKind.PRODUCER)  # one span for the chunk
    assert send.name == f"send {stream}"
    assert send.context is not None
    assert send.attributes is not None
    assert dict(send.attributes) == {
        "messaging.system": "redis",
        "messaging.destination.name": stream,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.batch.message_count": 3,
    }
    assert all(fields[b"traceparent"] == traceparent_of(send) for fields in await fields_of(redis, stream))

    handled = Handled()
    members = [(group, f"c-{group}", handled.handler(group)) for group in settings.groups]
    async with running(redis, settings, *members):
        await wait_until(lambda: caught_up(redis, stream, settings.groups), "both groups to finish")

    processed = of_kind(exporter, SpanKind.CONSUMER)
    assert len(processed) == len(orders) * len(settings.groups)
    for span in processed:
        assert span.name == f"process {stream}"
        assert span.context is not None
        assert span.context.trace_id == send.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == send.context.span_id
        assert span.status.status_code == StatusCode.UNSET
    by_group: dict[str, list[str]] = {}
    for span in processed:
        assert span.attributes is not None
        attributes = dict(span.attributes)
        assert attributes.keys() == {
            "messaging.system",
            "messaging.destination.name",
            "messaging.consumer.group.name",
            "messaging.client.id",
            "messaging.message.id",
            "messaging.operation.type",
            "messaging.operation.name",
        }
        assert attributes["messaging.system"] == "redis"
        assert attributes["messaging.destination.name"] == stream
        assert attributes["messaging.operation.type"] == attributes["messaging.operation.name"] == "process"
        group = str(attributes["messaging.consumer.group.name"])
        assert attributes["messaging.client.id"] == f"c-{group}"
        by_group.setdefault(group, []).append(str(attributes["messaging.message.id"]))
    assert by_group == dict.fromkeys(settings.groups, ids)
    # Each handler ran with its own consumer span current.
    current = {(group, context.span_id) for group, _, context in handled.spans}
    assert current == {
        (str((span.attributes or {})["messaging.consumer.group.name"]), span.context.span_id)
        for span in processed
        if span.context is not None
    }
    # No payload in any span: no e-mail address, no order id.
    everything = repr([(span.name, dict(span.attributes or {})) for span in exporter.get_finished_spans()])
    assert not any(order.customer_email in everything or order.order_id in everything for order in orders)


async def test_publish_continues_the_callers_trace(
    redis: Redis, settings: Settings, exporter: InMemorySpanExporter
) -> None:
    await initialize(redis, settings)
    tracer = trace.get_tracer_provider().get_tracer("test")
    with tracer.start_as_current_span("checkout") as checkout:
        entry_id = await publish(redis, settings.stream_key, sample_orders(1)[0])
    [send] = of_kind(exporter, SpanKind.PRODUCER)
    assert send.parent is not None
    assert send.parent.span_id == checkout.get_span_context().span_id
    assert send.attributes is not None
    assert "messaging.batch.message_count" not in send.attributes
    [fields] = await fields_of(redis, settings.stream_key)
    assert send.context is not None
    assert fields[b"traceparent"] == traceparent_of(send)
    assert entry_id


async def test_entries_without_or_with_a_bad_trace_context_are_handled_in_a_new_trace(
    redis: Redis, settings: Settings, exporter: InMemorySpanExporter
) -> None:
    await initialize(redis, settings)
    stream = settings.stream_key
    foreign: dict[str, dict[FieldT, EncodableT]] = {
        "none": {},
        "garbage": {"traceparent": "not a traceparent"},
        "zeros": {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},
        "binary": {"traceparent": b"\xff\xfe\x00", "tracestate": b"\xff"},
        "huge": {"traceparent": "00-" + "a" * 100_000},
        "bad tracestate": {"traceparent": TRACEPARENT, "tracestate": "=,=" * 5000},
    }
    orders = sample_orders(len(foreign))
    for order, extra in zip(orders, foreign.values(), strict=True):
        await redis.xadd(stream, {"data": serialize(order), **extra})
    handled = Handled()
    group = settings.fulfillment_group
    async with running(redis, settings, (group, "c", handled.handler(group))) as tasks:
        await wait_until(lambda: caught_up(redis, stream, [group]), "the group to finish")
        assert not tasks[0].done()
    assert [order_id for _, order_id, _ in handled.spans] == [order.order_id for order in orders]
    assert await redis.xlen(settings.dead_letter_stream) == 0
    processed = of_kind(exporter, SpanKind.CONSUMER)
    assert len(processed) == len(orders)
    assert [span.parent for span in processed[:5]] == [None] * 5
    # A valid traceparent beside a tracestate too long to keep is still continued.
    last = processed[5]
    assert last.parent is not None
    assert last.parent.trace_id == int(TRACEPARENT.split("-")[1], 16)
    assert len({span.context.trace_id for span in processed if span.context is not None}) == len(orders)


async def test_a_failed_handler_marks_its_span_and_a_redriven_dead_letter_continues_the_trace(
    redis: Redis, settings: Settings, exporter: InMemorySpanExporter
) -> None:
    await initialize(redis, settings)
    stream = settings.stream_key
    [order] = sample_orders(1)

    async def handle(order: Order) -> None:
        raise ValueError("no such SKU")

    await publish(redis, stream, order)
    await redis.xadd(stream, {"data": b"not json", "traceparent": TRACEPARENT, "tracestate": "k=v"})
    group = settings.fulfillment_group
    async with running(redis, settings, (group, "c", handle)):
        await wait_until(lambda: caught_up(redis, stream, [group]), "both entries to be dead-lettered")
    failed = of_kind(exporter, SpanKind.CONSUMER)
    assert len(failed) == settings.max_deliveries  # the invalid entry never reached a handler
    assert all(span.status.status_code == StatusCode.ERROR for span in failed)
    assert all(event.name == "exception" for span in failed for event in span.events)
    [send] = of_kind(exporter, SpanKind.PRODUCER)
    assert send.context is not None
    assert {span.context.trace_id for span in failed if span.context} == {send.context.trace_id}
    letters = {letter["error"].split(":")[0]: letter for letter in await dead_letters(redis, settings)}
    assert letters["invalid order"]["traceparent"] == TRACEPARENT
    assert letters["invalid order"]["tracestate"] == "k=v"
    assert letters["handler failed 3 times, last"]["traceparent"] == traceparent_of(send).decode()
    # Redriven, the order continues its first trace.
    records: Any = await redis.xrange(settings.dead_letter_stream)
    [failed_id] = [i for i, fields in records if fields[b"error"].startswith(b"handler failed")]
    await redrive(redis, settings, failed_id.decode())
    exporter.clear()
    handled = Handled()
    async with running(redis, settings, (group, "c", handled.handler(group))):
        await wait_until(lambda: handled.spans, "the redriven order")
    [again] = of_kind(exporter, SpanKind.CONSUMER)
    assert again.parent is not None
    assert again.parent.span_id == send.context.span_id


async def test_without_a_provider_nothing_is_injected(redis: Redis, settings: Settings) -> None:
    await initialize(redis, settings)
    await publish_many(redis, settings.stream_key, sample_orders(2))
    await publish(redis, settings.stream_key, sample_orders(1)[0])
    assert [sorted(fields) for fields in await fields_of(redis, settings.stream_key)] == [
        [b"data", b"producer"]
    ] * 3


def test_without_opentelemetry_installed_every_hook_is_a_no_op() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # import opentelemetry raises ImportError
        "from core import tracing\nimport stream_consumer, producer\n"
        "assert not tracing.INSTALLED\n"
        "assert tracing.processing('orders', 'g', 'c') is None\n"
        "with tracing.sending('orders', 500) as fields: assert fields == ()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
