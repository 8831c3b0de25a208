"""One batch from delivery to outcome: screened, admitted, run; each entry ends in the ledger
(acked, committed with its staged writes, dead-lettered) or waiting for its retry.

Screening needs no Redis: an entry deleted while pending is acked; a redrive meant for another
group is acked; an entry that is not a valid order, or was delivered more than MAX_DELIVERIES
times, is dead-lettered. With the dedupe guard on, one admission call lets one consumer of the
group run an order at a time, once per window; entries from this project's producer skip it
(their copies were stopped where they entered). Then the handler runs on each order, in order.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.typing import EncodableT

from config import Settings
from core import tracing
from core.dead_letters import dead_letter_fields
from core.handlers import NEVER_RETRIED, AnyHandler, plain_of, with_tx
from core.ledger import NO_WRITES, Ledger
from core.library import DONE, RUN, Fence
from core.messages import InvalidMessage, Schema
from core.reading import Batch
from core.replies import text
from core.schedule import Schedule
from core.stats import Stats
from orders import ORDERS
from tx import Tx

log = logging.getLogger("stream_consumer")

# entry id, fields, the message, its id (order_id), its delivery
Runnable = tuple[bytes, dict[bytes, bytes], Any, str, int]


class Handling:
    """One consumer's handling of its batches."""

    def __init__(
        self,
        settings: Settings,
        fence: Fence,
        handler: AnyHandler,
        ledger: Ledger,
        schedule: Schedule,
        stats: Stats,
        schema: Schema[Any] = ORDERS,
    ) -> None:
        self.settings = settings
        self.schema = schema
        self.fence = fence
        self.ledger = ledger
        self.schedule = schedule
        self.stats = stats
        self.handler = handler
        self.skipped: list[tuple[str, str]] = []  # (message id, why) of copies acked without a run

    @property
    def handler(self) -> AnyHandler:
        return self._handler

    @handler.setter
    def handler(self, handler: AnyHandler) -> None:
        self._handler = handler
        self.plain = plain_of(handler)  # called with the order alone: no Tx per order
        self.with_tx = with_tx(handler)

    async def handle(self, batch: Batch) -> None:
        """Screen, admit and run one batch."""
        if batch.entries:
            await self.run(await self.admit(self.screen(batch)), probe=batch.probe)
        # Said after the batch's handlers ran, so a copy's line never comes before its order's run.
        for order_id, state in self.skipped:
            log.info("%s %s %s in this group: acked, not run again", self.schema.name, order_id, state)
        self.skipped.clear()

    def screen(self, batch: Batch) -> list[Runnable]:
        """Ack what needs no handler, dead-letter the poison; the orders to run."""
        settings, ledger, group, schema = self.settings, self.ledger, self.fence.group, self.schema
        max_deliveries, max_bytes = settings.max_deliveries, settings.max_payload_bytes
        deliveries = batch.deliveries
        runnable = []
        for entry_id, fields in batch.entries:
            if not fields:  # deleted or trimmed while pending: nothing left to process
                ledger.ack(entry_id)
                self.stats.deleted_skipped += 1
                continue
            delivery = deliveries.get(entry_id, 1)
            redrive_for = fields.get(b"redrive_for")
            if redrive_for is not None and text(redrive_for) != group:
                if text(redrive_for) in settings.groups:  # sent back for another group only
                    ledger.ack(entry_id)
                    self.stats.redrives_for_other_groups += 1
                else:
                    self.dead_letter(
                        entry_id, fields, delivery, "redrive_for names no configured group", None
                    )
                continue
            payload = fields.get(b"data")
            if payload is None:
                self.dead_letter(
                    entry_id, fields, delivery, f"invalid {schema.name}: entry has no 'data' field", None
                )
                continue
            try:
                message = schema.parse(payload, max_bytes)  # tolerant: unknown fields are ignored
            except InvalidMessage as error:
                reason = f"invalid {schema.name}: {error}"
                self.dead_letter(entry_id, fields, delivery, reason, schema.id_in(payload, max_bytes))
                continue
            message_id = schema.id_of(message)
            if delivery > max_deliveries:
                reason = f"delivered {delivery} times without an ack (limit {max_deliveries})"
                self.dead_letter(entry_id, fields, delivery, reason, message_id)
                continue
            runnable.append((entry_id, fields, message, message_id, delivery))
        return runnable

    async def admit(self, runnable: list[Runnable]) -> list[Runnable]:
        """With the dedupe guard: the orders to run now; copies of orders done or running are acked."""
        if not self.settings.dedupe_window_ms:
            return runnable
        guarded = [item for item in runnable if b"producer" not in item[1]]
        if not guarded:
            return runnable
        decisions = await self.fence.admit([(item[0], item[3]) for item in guarded])
        refused = {
            item[0]: decision for item, decision in zip(guarded, decisions, strict=True) if decision != RUN
        }
        if not refused:
            return runnable
        for entry_id, _, _, message_id, _ in runnable:
            if entry_id in refused:
                state = "already handled" if refused[entry_id] == DONE else "being handled from another entry"
                self.skipped.append((message_id, state))
                self.ledger.ack(entry_id)
                self.stats.duplicates_skipped += 1
        return [item for item in runnable if item[0] not in refused]

    async def run(self, runnable: list[Runnable], probe: bool = False) -> None:
        """Run the handler on each order; a success goes to the ledger, a failure waits for its retry.

        During a downstream outage only a probe's order runs; the others wait, uncounted."""
        ledger, schedule, plain = self.ledger, self.schedule, self.plain
        acks = ledger.done.plain
        guard = self.settings.dedupe_window_ms
        spans = tracing.processing(self.fence.keys.stream, self.fence.group, self.fence.consumer)
        processed = 0
        for entry_id, fields, message, message_id, delivery in runnable:
            if schedule.in_outage and not probe:
                schedule.hold(entry_id, delivery)
                continue
            probe = False  # one order per probe
            writes = NO_WRITES
            try:
                if spans is not None:
                    with spans.span(entry_id, fields):
                        writes = await self._run(message)
                elif plain is not None:  # _run's first case, inline: no coroutine of ours per message
                    await plain(message)
                else:
                    writes = await self._run(message)
            except Exception as error:  # its staged writes are dropped with it
                self.failed(entry_id, fields, message_id, delivery, error)
                continue
            if schedule.failing:
                schedule.succeeded()
            # Done marks only for entries the guard admitted (not from our own producer).
            if guard and b"producer" not in fields:
                ledger.commit_with(entry_id, message_id, writes)
            elif writes:
                ledger.commit_with(entry_id, "", writes)
            else:
                acks.append(entry_id)
            processed += 1
        self.stats.processed += processed

    async def _run(self, message: Any) -> list[list[EncodableT]]:
        """Run the handler on one message; the Redis writes it staged."""
        if self.plain is not None:
            await self.plain(message)
            return NO_WRITES
        tx = Tx(self.fence.keys.stream)
        await self.with_tx(message, tx)
        return tx.commands

    def failed(
        self, entry_id: bytes, fields: dict[bytes, bytes], message_id: str, delivery: int, error: Exception
    ) -> None:
        """The handler raised: dead-letter (rejected, or out of deliveries) or wait for a retry."""
        self.stats.failed += 1
        max_deliveries, kind = self.settings.max_deliveries, self.schema.name
        where = f"{kind} {message_id} (entry {text(entry_id)}, delivery {delivery} of {max_deliveries})"
        if isinstance(error, NEVER_RETRIED):
            log.warning("handler rejected %s: %s", where, error)
            self.dead_letter(entry_id, fields, delivery, f"rejected: {error}", message_id)
            return
        if self.schedule.in_outage:  # a probe: said once when the outage began and once when it ends
            log.debug("probe failed for %s: %s: %s", where, type(error).__name__, error)
        else:
            log.exception("handler failed for %s", where)
        if delivery >= max_deliveries and not self.schedule.in_outage:
            reason = f"handler failed {delivery} times, last: {type(error).__name__}: {error}"
            self.dead_letter(entry_id, fields, delivery, reason, message_id)
            return
        self.schedule.failed(entry_id, delivery, error)

    def dead_letter(
        self, entry_id: bytes, fields: dict[bytes, bytes], delivery: int, reason: str, order_id: str | None
    ) -> None:
        """To the dead-letter stream with the next commit, fenced like it."""
        meta: dict[str, str | int] = {
            "group": self.fence.group,
            "consumer": self.fence.consumer,
            "source_id": text(entry_id),
            "deliveries": delivery,
            "error": reason,
        }
        self.ledger.dead_letter(entry_id, order_id or "", dead_letter_fields(fields, meta))
        log.warning(
            "dead-lettering entry %s (%s %s) to %s: %s",
            text(entry_id),
            self.schema.name,
            order_id or "unknown",
            self.fence.keys.dead_letter,
            reason,
        )
