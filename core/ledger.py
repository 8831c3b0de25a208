"""A consumer's commit ledger: what is done and not yet committed, what was sent and not yet answered.

Done entries wait here until one fenced commit (core/library.lua) acks them, applies their
staged writes and moves the dead letters, all at once; the commit usually travels with the next
read (core/reading.py). A commit whose reply was lost is sent again as it was: entries it did
commit are no longer pending then, so nothing is applied twice. A commit Redis refuses outright
is sent again entry by entry, and an entry whose own commit is refused is dead-lettered with its
writes dropped, so one bad entry never wedges the others.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import ResponseError
from redis.typing import EncodableT

from core.library import Commit, DeadLetter, Fence
from core.replies import Committed, commit_of, text
from core.schedule import Schedule
from core.stats import Stats

log = logging.getLogger("stream_consumer")

NO_WRITES: list[list[EncodableT]] = []  # what a handler that takes only the order stages (never appended to)


@dataclass
class Settlement:
    """Entries settled together in one commit."""

    plain: list[bytes] = field(default_factory=list)  # done, needing only an ack
    rich: list[Commit] = field(default_factory=list)  # done, with writes or an order to mark done
    dead: list[DeadLetter] = field(default_factory=list)  # to move to the dead-letter stream
    retry: bool = False  # sent before and its reply lost

    def __len__(self) -> int:
        return len(self.plain) + len(self.rich) + len(self.dead)

    def ids(self) -> itertools.chain[bytes]:
        return itertools.chain(self.plain, (c[0] for c in self.rich), (d[0] for d in self.dead))


class Ledger:
    """One consumer's settled entries until Redis confirms their commit."""

    def __init__(
        self,
        fence: Fence,
        schedule: Schedule,
        stats: Stats,
        name_taken: Callable[[], None],
        committed: Callable[[int], None] | None = None,
    ) -> None:
        self.fence = fence
        self.schedule = schedule
        self.stats = stats
        self.name_taken = name_taken  # another process now holds this consumer's name
        self.committed = committed  # a hook: how many entries each commit settled
        self.done = Settlement()
        self.sent: deque[Settlement] = deque()  # sent in this order, replies not read yet

    # --- what the handling puts here -----------------------------------------------------

    def ack(self, entry_id: bytes) -> None:
        self.done.plain.append(entry_id)

    def commit_with(self, entry_id: bytes, order_id: str, writes: list[list[EncodableT]]) -> None:
        self.done.rich.append((entry_id, order_id, writes))

    def dead_letter(self, entry_id: bytes, order_id: str, record: dict[bytes, bytes | str | int]) -> None:
        self.done.dead.append((entry_id, order_id, record))

    # --- committing -----------------------------------------------------------------------

    def take(self) -> list[EncodableT] | None:
        """The commit call of everything done, now counted as sent; None when nothing is done."""
        if not self.done:
            return None
        settlement, self.done = self.done, Settlement()
        self.sent.append(settlement)
        return self.fence.commit_call(settlement.plain, settlement.rich, settlement.dead)

    def answered(self, reply: Committed) -> None:
        """Account for the reply to the oldest commit sent."""
        self._settled(self.sent.popleft(), reply)

    def lost(self) -> None:
        """The replies of the commits sent are lost (they may or may not have applied): send them again."""
        while self.sent:
            settlement = self.sent.pop()
            settlement.retry = True
            self._merge_front(settlement)

    async def commit(self) -> None:
        """Commit what is done now, in one call (not with a read); a refusal isolates the entry at fault."""
        call = self.take()
        if call is None:
            return
        try:
            reply = await self.fence.redis.execute_command(*call)  # type: ignore[no-untyped-call]
        except ResponseError as error:
            if not _refusal_of_entries(error):
                self.lost()
                raise
            await self._commit_apart(self.sent.popleft(), error)
            return
        except BaseException:
            self.lost()
            raise
        self.answered(commit_of(reply))

    def refused(self, error: ResponseError) -> bool:
        """Whether a commit refused with `error` (sent with a read) is to be committed entry by entry."""
        return _refusal_of_entries(error)

    async def commit_apart(self, error: ResponseError) -> None:
        """The oldest commit sent was refused: commit its entries apart."""
        await self._commit_apart(self.sent.popleft(), error)

    async def _commit_apart(self, settlement: Settlement, error: ResponseError) -> None:
        """Commit the plain acks together, then every other entry alone; one refused alone is
        dead-lettered with its writes dropped. A refusal of the plain acks is not the entries'
        fault (a permission, a lost library): it goes up, and the whole commit is kept."""
        log.error("Redis refused a commit (%s); committing its entries one at a time", error)
        fence = self.fence
        try:
            if settlement.plain:
                self._settled(Settlement(plain=settlement.plain), await fence.commit(settlement.plain, []))
        except BaseException:
            self._merge_front(settlement)
            raise
        for entry in settlement.rich:
            try:
                self._settled(Settlement(rich=[entry]), await fence.commit([], [entry]))
            except ResponseError as refusal:
                reason = f"its commit was refused by Redis: {refusal}"
                log.error(
                    "entry %s: %s; dead-lettering it, its staged writes dropped", text(entry[0]), reason
                )
                self.done.dead.append((entry[0], entry[1], _bare_record(fence, entry[0], reason)))
        for letter in settlement.dead:
            try:
                self._settled(Settlement(dead=[letter]), await fence.commit([], [], [letter]))
            except ResponseError as refusal:
                log.error("entry %s could not be dead-lettered (%s); left pending", text(letter[0]), refusal)
                self.schedule.forget([letter[0]])

    def _merge_front(self, settlement: Settlement) -> None:
        """Put `settlement` back before what is done meanwhile, to be sent again."""
        self.done.plain[:0] = settlement.plain
        self.done.rich[:0] = settlement.rich
        self.done.dead[:0] = settlement.dead
        self.done.retry = self.done.retry or settlement.retry

    def _settled(self, settlement: Settlement, reply: Committed) -> None:
        """Account for a commit's reply: counts, what no longer waits for a retry, and what it says."""
        if reply.name_taken:
            self._merge_front(settlement)  # nothing applied; this process stops
            self.name_taken()
            return
        self.schedule.forget(settlement.ids())
        if settlement.dead:
            fenced = set(reply.fenced)
            self.stats.dead_lettered += sum(1 for letter in settlement.dead if letter[0] not in fenced)
        # Pending on no consumer: finished by one that took them over, or committed by a try of
        # this commit whose reply was lost.
        gone = len(settlement) - reply.acked - len(reply.fenced)
        if reply.errors:
            log.error(
                "Redis refused %d staged writes at commit (not applied; the rest were, once): %s",
                len(reply.errors),
                "; ".join(reply.errors[:5]),
            )
        if reply.fenced:
            self.stats.taken_over += len(reply.fenced)
            log.warning(
                "%d entries were taken over by another consumer while this one worked on them (it "
                "was cut off longer than CLAIM_IDLE_MS); their commit and staged writes were dropped",
                len(reply.fenced),
            )
        if gone > 0 and not settlement.retry:
            self.stats.taken_over += gone
            log.warning(
                "%d entries were no longer pending at commit: taken over by another consumer and "
                "finished there (this one was cut off longer than CLAIM_IDLE_MS), or committed by "
                "an earlier try whose reply was lost; nothing of theirs was applied twice",
                gone,
            )
        if self.committed is not None:
            self.committed(len(settlement))


def _refusal_of_entries(error: ResponseError) -> bool:
    """A refusal that may be one entry's fault, not the whole pipeline's (a missing group, a missing
    function library, a permission: those are recovered from, not isolated)."""
    message = str(error)
    return not message.startswith(("NOGROUP", "UNBLOCKED", "NOPERM", "NOSCRIPT", "LOADING", "BUSY")) and (
        "function not found" not in message.lower()
    )


def _bare_record(fence: Fence, entry_id: bytes, reason: str) -> dict[bytes, bytes | str | int]:
    return {
        b"group": fence.group,
        b"consumer": fence.consumer,
        b"source_id": text(entry_id),
        b"deliveries": 0,
        b"error": reason,
        b"truncated": "the original fields were not kept: its commit was refused after it ran",
    }
