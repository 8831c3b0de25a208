"""Version 2 of the order, as a rolling deploy would bring it: one optional field more.

`python -m tests.orders_v2` is a consumer of it, for the group SERVICE_GROUP.
"""

from __future__ import annotations

import logging
import os

from core.messages import Schema
from orders import Order
from stream_consumer import run_service

log = logging.getLogger("orders_v2")


class OrderV2(Order, frozen=True, omit_defaults=True, gc=False):
    coupon: str | None = None  # new, optional: older orders have none


ORDERS_V2 = Schema(OrderV2, id_field="order_id", name="order")


async def handle(order: OrderV2) -> None:
    log.info("ran order %s with coupon %s", order.order_id, order.coupon or "-")


if __name__ == "__main__":
    run_service(
        "tests.orders_v2",
        "A consumer of version 2 of the order.",
        lambda s: os.environ.get("SERVICE_GROUP", s.fulfillment_group),
        handle,
        ORDERS_V2,
    )
