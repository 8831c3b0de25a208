"""Fulfillment service: every order once per fulfillment consumer group, shared among its consumers."""

from __future__ import annotations

import logging

from orders import Order
from stream_consumer import run_service

log = logging.getLogger("consumer1")


async def handle(order: Order) -> None:
    """Fulfil one order; raising leaves it pending so it is retried (then dead-lettered)."""
    units = sum(item.qty for item in order.items)
    log.info("fulfilling order %s: %d items, %d units", order.order_id, len(order.items), units)


if __name__ == "__main__":
    run_service(
        "consumer1",
        "Fulfillment service: consume orders as a member of FULFILLMENT_GROUP.",
        lambda settings: settings.fulfillment_group,
        handle,
    )
