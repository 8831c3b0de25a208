"""A test service: its group from SERVICE_GROUP, a handler taking HANDLER_MS per order.

HANDLER_BLOCKING=1 makes the handler block the event loop (time.sleep), as a careless sync
call in a real handler would; otherwise it awaits asyncio.sleep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from orders import Order
from stream_consumer import run_service

log = logging.getLogger("slow_service")


async def handle(order: Order) -> None:
    """Take HANDLER_MS, then log the order id as the effect the tests count."""
    delay = int(os.environ.get("HANDLER_MS", "0")) / 1000
    if os.environ.get("HANDLER_BLOCKING") == "1":
        time.sleep(delay)  # noqa: ASYNC251 - on purpose: a handler that blocks the event loop
    else:
        await asyncio.sleep(delay)
    log.info("ran order %s", order.order_id)


if __name__ == "__main__":
    run_service(
        "slow_service",
        "A test service with a slow handler.",
        lambda settings: os.environ.get("SERVICE_GROUP", settings.fulfillment_group),
        handle,
    )
