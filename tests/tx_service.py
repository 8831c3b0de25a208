"""A test service with a transactional handler: one HINCRBY and one outbox XADD per order.

HOLD_MS makes the handler block (time.sleep) after staging its writes: a SIGKILL or SIGSTOP
then lands between the handler's effects and the commit that would apply them.
"""

from __future__ import annotations

import logging
import os
import time

from orders import Order
from stream_consumer import run_service
from tx import Tx

log = logging.getLogger("tx_service")


async def handle(order: Order, tx: Tx) -> None:
    """Stage the order's effects, say so, then hold for HOLD_MS."""
    tx.hincrby(tx.key("effects"), order.order_id, 1)
    tx.xadd(tx.key("outbox"), {"order_id": order.order_id})
    log.info("staged order %s", order.order_id)
    hold = int(os.environ.get("HOLD_MS", "0")) / 1000
    if hold:
        time.sleep(hold)  # noqa: ASYNC251 - on purpose: the process is stopped or killed in here


if __name__ == "__main__":
    run_service(
        "tx_service", "A test service with a transactional handler.", lambda s: s.fulfillment_group, handle
    )
