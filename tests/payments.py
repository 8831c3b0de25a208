"""A second message type, as a user of the template would add one: payments on their own stream."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from msgspec import Meta

from core.messages import Schema
from stream_consumer import run_service
from tx import Tx

log = logging.getLogger("payments")


class Payment(msgspec.Struct, frozen=True):
    payment_id: Annotated[str, Meta(min_length=1, max_length=64)]
    order_id: Annotated[str, Meta(min_length=1, max_length=128)]
    cents: Annotated[int, Meta(ge=1)]
    currency: Annotated[str, Meta(pattern="^[A-Z]{3}$")] = "EUR"


PAYMENTS = Schema(Payment, id_field="payment_id", name="payment")


async def settle(payment: Payment, tx: Tx) -> None:
    """Add the payment to its order's paid total: exactly once, with the payment's ack."""
    tx.hincrby(tx.key("paid-cents"), payment.order_id, payment.cents)
    log.info("settled payment %s", payment.payment_id)


if __name__ == "__main__":
    run_service("tests.payments", "A payments service.", lambda s: s.fulfillment_group, settle, PAYMENTS)
