"""What a service hands the consumer: a handler, taking the order alone or the order and a Tx."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, cast

from tx import Tx, UncommittableWrite

# A handler takes one message of the service's type (an Order by default: core/messages.py).
Handler = Callable[[Any], Awaitable[None]]
TxHandler = Callable[[Any, Tx], Awaitable[None]]  # stages Redis writes that commit with the message
AnyHandler = Handler | TxHandler


class Reject(Exception):
    """Raised by a handler for an order that can never succeed: dead-lettered at once, not retried."""


# What dead-letters an order at once when its handler raises it: running it again cannot help.
NEVER_RETRIED = (Reject, UncommittableWrite)


def plain_of(handler: AnyHandler) -> Handler | None:
    """The handler itself if it takes only the order, None if it is transactional.

    A handler is transactional when it has a second required positional parameter; one whose
    other parameters have defaults is called with the order alone.
    """
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        parameter
        for parameter in inspect.signature(handler).parameters.values()
        if parameter.kind in positional and parameter.default is inspect.Parameter.empty
    ]
    return None if len(required) >= 2 else cast(Handler, handler)


def with_tx(handler: AnyHandler) -> TxHandler:
    """Every handler as one taking a Tx: a handler that takes only the order ignores it."""
    plain = plain_of(handler)
    if plain is None:
        return cast(TxHandler, handler)

    async def run(message: Any, tx: Tx) -> None:
        await plain(message)

    return run
