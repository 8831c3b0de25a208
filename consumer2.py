"""Email service: every order once per email consumer group, shared among its consumers."""

from __future__ import annotations

import logging

from orders import Order
from stream_consumer import run_service

log = logging.getLogger("consumer2")


async def handle(order: Order) -> None:
    """Send the confirmation e-mail for one order; raising leaves it pending so it is retried."""
    # The address is personal data: log the order id only.
    log.info("sending confirmation e-mail for order %s", order.order_id)


if __name__ == "__main__":
    run_service(
        "consumer2",
        "Email service: consume orders as a member of EMAIL_GROUP.",
        lambda settings: settings.email_group,
        handle,
    )
