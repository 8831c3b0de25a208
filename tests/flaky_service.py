"""A test service whose downstream is down while the file DOWN_FLAG exists: the handler raises."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from orders import Order
from stream_consumer import run_service

log = logging.getLogger("flaky_service")


async def handle(order: Order) -> None:
    """Fail while DOWN_FLAG exists (the e-mail provider is down); else log the order id as the effect."""
    if Path(os.environ["DOWN_FLAG"]).exists():  # noqa: ASYNC240 - a stat, as a test flag
        raise ConnectionError("the downstream is down")
    log.info("ran order %s", order.order_id)


if __name__ == "__main__":
    run_service(
        "flaky_service", "A test service with a downstream that fails.", lambda s: s.email_group, handle
    )
