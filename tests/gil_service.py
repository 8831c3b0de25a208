"""A test service whose handler holds the GIL: one C call that sleeps HOLD_GIL_S seconds.

ctypes.PyDLL calls keep the GIL for the whole call, as a backtracking regular expression or a
CPU-bound C extension does: no other thread of the process runs meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
import os

from orders import Order
from stream_consumer import run_service

log = logging.getLogger("gil_service")


async def handle(order: Order) -> None:
    """Hold the GIL for HOLD_GIL_S seconds, then log the order id as the effect the tests count."""
    seconds = int(os.environ.get("HOLD_GIL_S", "0"))
    if seconds:
        ctypes.PyDLL(None).sleep(seconds)
    log.info("ran order %s", order.order_id)


if __name__ == "__main__":
    run_service("gil_service", "A test service holding the GIL.", lambda s: s.fulfillment_group, handle)
