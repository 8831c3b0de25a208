"""The Redis Function library `orders` (library.lua): the pipeline's atomic, fenced steps.

`initialization_stream` loads it (an admin's job); consumers call it with FCALL, so a
least-privilege user needs FCALL and the commands inside, never SCRIPT or EVAL. A process
that finds the library missing or outdated loads it where its user may, else says who must.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError
from redis.typing import EncodableT

from config import CliError
from core.keys import Keys
from core.replies import Committed, commit_of, redelivered_of, text
from redisPool import is_cluster

SOURCE = Path(__file__).with_name("library.lua")

# Answers of orders_admit, per entry.
RUN, DONE, RUNNING_ELSEWHERE = 1, 0, 2

# What the idempotent append remembers (library.lua's `append`): per producer id, its last
# CALLS_KEPT publish calls for CALL_TTL_S, each a few dozen bytes whatever its size, so a chunk
# sent again after a lost reply (at most two chunks of a call are in flight) adds nothing twice;
# per input file, how far it was confirmed, for CHECKPOINT_TTL_S after its last chunk, so running
# the same input again publishes the rest.
CALLS_KEPT = 2000
CALL_TTL_S = 600
CHECKPOINT_TTL_S = 7 * 24 * 3600
# On every version: Redis 8.6's XADD IDMP costs more per order and keeps a window per stream (docs/speed.md).
APPEND_PATH = "idempotent append (function library: one check per chunk)"


class LibraryMissing(CliError):
    """The function library is not loaded and this user may not load it: exit code 1."""


@functools.cache
def version() -> str:
    """A digest of library.lua: the library's name and its functions' names carry it."""
    return hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]


def function(name: str) -> str:
    """The name under which this version of the library registers `name` (admit, commit, ...)."""
    return f"orders_{version()}_{name}"


async def load(redis: Redis) -> None:
    """Load this version of the library (replacing only itself): needs an admin user."""
    await redis.function_load(SOURCE.read_text().replace("__VERSION__", version()), replace=True)


async def ensure_loaded(redis: Redis) -> None:
    """Make sure this version of the library is loaded; load it if this user may, else LibraryMissing."""
    try:
        # On a cluster, on every master: each partition's calls run on its own.
        where: dict[str, str] = {"target_nodes": "primaries"} if is_cluster(redis) else {}
        await redis.execute_command("FCALL", function("version"), 0, **where)  # type: ignore[no-untyped-call]
        return
    except ResponseError as error:
        if isinstance(error, NoPermissionError) or "function not found" not in str(error).lower():
            raise
    try:
        await load(redis)
    except NoPermissionError:
        raise LibraryMissing(
            f"the Redis function library orders_{version()} is not loaded and this user may not load "
            "it: run `python3 -m initialization_stream` as an admin user"
        ) from None


@dataclass(frozen=True)
class Appended:
    """The reply of one append: the chunk's entry ids, and whether this call appended them just now."""

    ids: list[str]
    new: bool  # False: appended before ('again'), by an earlier send of the same chunk or by another run
    gone: bool = False  # appended, but the track had no record in Redis any more
    short: int = 0  # appended, the track's record this many orders short of where the producer left it


def append_command(
    keys: Keys,
    producer_id: str,
    track: tuple[str, str, int, int],
    before: str,
    after: str,
    payloads: Sequence[bytes],
    fields: Sequence[str] = (),
) -> list[EncodableT]:
    """FCALL arguments appending `payloads` as one chunk of a track, moving it from `before` to `after`.

    `track`: its key, its field in that key ('' when the key is the track's own), how many calls
    the key keeps (0 for an input's own key) and its TTL in ms. `fields` (name, value, name,
    value: the trace context) are added to every entry.
    """
    key, field, keep, ttl_ms = track
    command: list[EncodableT] = [
        "FCALL",
        function("append"),
        3,
        keys.stream,
        key,
        keys.producer(producer_id)[1],
    ]
    command += [producer_id, field, before, after, keep, ttl_ms, len(fields) // 2, *fields, *payloads]
    return command


def appended_of(reply: list[bytes]) -> Appended:
    """An append's reply as entry ids: "first-id+count" stands for `count` ids from that one on."""
    status, ids, short = text(reply[0]), text(reply[1]), int(reply[2])
    first, plus, count = ids.partition("+")
    if plus:
        ms, _, seq = first.partition("-")
        start = int(seq)
        listed = [f"{ms}-{n}" for n in range(start, start + int(count))]
    else:
        listed = ids.split(",")
    return Appended(listed, new=status != "again", gone=status == "gone", short=short)


# An entry to commit with more than an ack: its id, its order id ('' for none), the writes its
# handler staged (tx.py), each a command with its arguments.
Commit = tuple[bytes, str, list[list[EncodableT]]]
# An entry to dead-letter: its id, its order id ('' for none), the record (core/dead_letters.py).
DeadLetter = tuple[bytes, str, dict[bytes, bytes | str | int]]


@dataclass
class Fence:
    """One consumer's atomic steps in one group: admission, the fenced commit, redelivery.

    The pending-entries list is the fence: an entry is committed or dead-lettered only while
    it is still pending on this consumer, so of two consumers racing for one entry (a slow
    owner and the one that claimed it) at most one commit applies. The lease's token fences
    the name itself: a process whose name another process now holds commits nothing.
    """

    redis: Redis
    keys: Keys
    group: str
    consumer: str
    window_ms: int  # DEDUPE_WINDOW_MS: 0 keeps no done marks
    token: str = ""  # this process's lease token (core/lease.py)

    async def admit(self, entries: list[tuple[bytes, str]]) -> list[int]:
        """RUN, DONE or RUNNING_ELSEWHERE for each (entry id, order id), in one atomic step."""
        args: list[EncodableT] = [
            self.group,
            self.consumer,
            self.keys.lease_prefix(self.group),
            self.window_ms,
        ]
        for entry_id, order_id in entries:
            args += [entry_id, order_id]
        reply = await self.redis.fcall(function("admit"), 3, *self._guard_keys(), *args)
        return [int(decision) for decision in reply]

    async def commit(
        self, plain: list[bytes], entries: list[Commit], dead: Sequence[DeadLetter] = ()
    ) -> Committed:
        """Ack these entries, apply their staged writes and move the dead letters, for those still
        pending on us, in one atomic step.

        `plain` are the ids of entries to ack and nothing else (no order to mark done, no
        writes): most of a batch, sent as bare ids.
        """
        return commit_of(await self.redis.execute_command(*self.commit_call(plain, entries, dead)))  # type: ignore[no-untyped-call]

    def commit_call(
        self, plain: list[bytes], entries: list[Commit], dead: Sequence[DeadLetter] = ()
    ) -> list[EncodableT]:
        """commit()'s command, for a caller that sends it in a pipeline."""
        keys = (*self._guard_keys(), self.keys.dead_letter, self.keys.lease(self.group, self.consumer))
        args: list[EncodableT] = ["FCALL", function("commit"), len(keys), *keys]
        args += [self.group, self.consumer, self.token, self.window_ms, len(plain), *plain, len(entries)]
        for entry_id, order_id, writes in entries:
            args += [entry_id, order_id, len(writes)]
            for write in writes:
                args += [len(write), *write]
        for entry_id, order_id, record in dead:
            args += [entry_id, order_id, 2 * len(record)]
            for name, value in record.items():
                args += [name, value]
        return args

    async def redeliver(
        self, entries: Sequence[tuple[bytes, int]]
    ) -> list[tuple[bytes, dict[bytes, bytes], int]]:
        """Those of these (entry id, delivery count) still pending on us, delivered again with that
        count: (id, fields, delivery count)."""
        args: list[EncodableT] = [self.group, self.consumer]
        for entry_id, delivery in entries:
            args += [entry_id, delivery]
        reply = await self.redis.fcall(function("redeliver"), 1, self.keys.stream, *args)
        return redelivered_of(reply)

    def _guard_keys(self) -> tuple[str, str, str]:
        return self.keys.stream, self.keys.done(self.group), self.keys.running(self.group)
