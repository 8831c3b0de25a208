"""Fulfillment service: every order once per fulfillment consumer group, shared among its consumers.

Its handler is transactional: the stock it books and the shipment event it emits are Redis
writes staged on `tx`, applied with the order's commit, so each happens exactly once per
order even when a consumer dies or is cut off mid-batch.
"""

from __future__ import annotations

import logging

from orders import Order
from stream_consumer import run_service
from tx import Tx

log = logging.getLogger("consumer1")

# The outbox keeps about this many newest events: nothing here reads it. A service that does reads
# it with a group of its own, as the services read orders, and trims what every group acked.
SHIPMENTS_KEPT = 100_000


async def handle(order: Order, tx: Tx) -> None:
    """Book stock per SKU and emit a shipment event; raising drops both and retries the order."""
    units = sum(item.qty for item in order.items)
    for item in order.items:
        tx.hincrby(tx.key("stock-booked"), item.sku, item.qty)
    tx.xadd(tx.key("shipments"), {"order_id": order.order_id, "units": units}, maxlen=SHIPMENTS_KEPT)
    log.info("fulfilling order %s: %d items, %d units", order.order_id, len(order.items), units)


if __name__ == "__main__":
    run_service(
        "consumer1",
        "Fulfillment service: consume orders as a member of FULFILLMENT_GROUP.",
        lambda settings: settings.fulfillment_group,
        handle,
    )
