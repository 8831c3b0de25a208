"""Test a service's handler without Redis: deliver one message to it as a consumer would.

    from core.testing import deliver

    outcome = await deliver(consumer1.handle, '{"order_id": "o-1", "customer_email": "a@b.co"}')
    assert outcome.acked
    assert ["XADD", "{orders}:shipments", "*", "order_id", "o-1", "units", 0] in outcome.writes

The payload is parsed as a consumer parses it (tolerantly: unknown fields are ignored); a
transactional handler gets a Tx, and the writes it staged come back for the test to assert,
exactly as the commit would apply them. Whatever would dead-letter the message (an invalid
payload, `Reject`, a write that could not commit) comes back as `dead_letter`; any other
exception as `error` (the consumer would retry it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.typing import EncodableT

from core.handlers import NEVER_RETRIED, AnyHandler, with_tx
from core.messages import InvalidMessage, Schema
from orders import ORDERS
from tx import Tx


@dataclass
class Outcome:
    """What a consumer would do with the message after its handler ran."""

    message: Any = None  # as the handler got it (None when the payload was refused)
    writes: list[list[EncodableT]] = field(default_factory=list)  # staged on tx: applied with the ack
    acked: bool = False  # the handler returned: the message is acked, its writes applied
    dead_letter: str | None = None  # why it would go to the dead-letter stream, if it would
    error: Exception | None = None  # what it raised otherwise: it would be retried


async def deliver(
    handler: AnyHandler,
    message: Any,
    *,
    schema: Schema[Any] = ORDERS,
    stream: str = "orders",
    max_bytes: int = 65536,
) -> Outcome:
    """Run `handler` on one message (a payload as bytes, str or dict, or a message of `schema`'s
    type) as a consumer of `stream` would; return what the consumer would do."""
    if isinstance(message, dict):
        message = msgspec.json.encode(message)
    if isinstance(message, bytes | str):
        try:
            message = schema.parse(message, max_bytes)
        except InvalidMessage as error:
            return Outcome(dead_letter=f"invalid {schema.name}: {error}")
    tx = Tx(stream)
    try:
        await with_tx(handler)(message, tx)
    except NEVER_RETRIED as error:
        return Outcome(message, dead_letter=f"rejected: {error}")
    except Exception as error:  # the consumer retries it, its staged writes dropped
        return Outcome(message, error=error)
    return Outcome(message, tx.commands, acked=True)
