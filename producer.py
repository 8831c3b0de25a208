"""Publish orders to the stream: one at a time, in batches, or from a JSON-lines file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import logging
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
import weakref
from array import array
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, aclosing, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from types import FrameType
from typing import Any, BinaryIO, NoReturn, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]  # no stubs without types-tqdm
from tqdm.contrib.logging import logging_redirect_tqdm  # type: ignore[import-untyped, unused-ignore]

from config import DEFAULTS, CliError, ConfigError, Settings, run_script
from core import library, tracing
from core.keys import Keys, partition_of, partition_stream, stream_keys
from core.messages import Schema
from core.replies import text
from orders import ORDERS, InvalidOrder, Item, Order, parse_order, serialize
from redisPool import is_cluster, redis_connect

log = logging.getLogger("producer")

CHUNK = 1000  # orders per round trip in publish_many
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PublishError(CliError):
    """Publishing stopped part way; `published` entries are confirmed in the stream."""

    def __init__(self, published: int, total: int, cause: Exception, then: str = "") -> None:
        super().__init__(
            f"{published:,} of {total:,} orders confirmed, then Redis failed ({type(cause).__name__}: "
            f"{cause}); {then or f'the next {2 * CHUNK} may or may not be in the stream'}"
        )
        self.published = published


Record = tuple[str, bytes]  # (order id, payload as sent)

RETRIES = 5  # reconnects after a lost connection before a publish gives up
RETRY_CAP_S = 2.0


@dataclass(frozen=True)
class Durability:
    """How a chunk is confirmed: once its primary has it, or also `replicas` replicas (WAIT).

    `patience_s`: how long a lost connection is retried, at least, before the publish gives
    up; on a cluster, longer than a failover takes (`cluster-node-timeout` plus an election).
    """

    replicas: int = 0
    wait_ms: int = 2000
    patience_s: float = 0.0


def durability_of(settings: Settings) -> Durability:
    patience = settings.redis_connect_timeout_ms / 1000
    return Durability(settings.publish_min_replicas, settings.publish_wait_ms, patience)


class NotReplicated(RedisError):
    """WAIT returned before PUBLISH_MIN_REPLICAS replicas had the chunk: it is sent again."""


class LibraryGone(RedisError):
    """The library's append is not loaded (Redis restarted without persistence): nothing ran, so
    the chunk is sent again once the library is loaded (where this user may)."""


# Worth sending the chunks in flight again: the append is idempotent, so nothing is added twice.
RESEND = (
    RedisConnectionError,
    RedisTimeoutError,
    AskError,  # and MovedError: the slot is served elsewhere now (a failover, a resharding)
    TryAgainError,
    ClusterDownError,  # and MasterDownError
    RedisClusterException,
    NotReplicated,
    LibraryGone,
)


async def publish(
    redis: Redis,
    stream: str,
    order: Any,
    producer: str = "",
    *,
    partitions: int = 1,
    durability: Durability = Durability(),
    schema: Schema[Any] = ORDERS,
) -> str:
    """Append one order (a message of `schema`'s type); return its entry id once Redis has confirmed it.

    Idempotent: sent again (after a lost reply, or by a caller retrying) by the same producer id
    (PRODUCER_ID; default the host name) among its last CALLS_KEPT calls and within CALL_TTL_S,
    the order is not added twice and the first append's id is returned.
    """
    ids = await publish_many(
        redis, stream, [order], producer, partitions=partitions, durability=durability, schema=schema
    )
    return ids[0]


async def publish_many(
    redis: Redis,
    stream: str,
    orders: Sequence[Any],
    producer: str = "",
    *,
    partitions: int = 1,
    durability: Durability = Durability(),
    schema: Schema[Any] = ORDERS,
) -> list[str]:
    """Append orders (messages of `schema`'s type), CHUNK per call, each to its partition's stream;
    return their entry ids.

    Each chunk is one call of the function library's idempotent append: added whole or not
    at all, and a chunk sent again after a lost connection adds nothing twice. A call of one
    order is keyed by its order id, so that order published again adds nothing (see publish);
    a call of more is keyed by itself: called again, it appends its orders again. Within a
    partition the orders keep their order. Raises PublishError saying how many orders Redis
    confirmed before a failure.
    """
    producer = producer or socket.gethostname()
    ids: list[str] = []
    call = f"order:{schema.id_of(orders[0])}" if len(orders) == 1 else f"call:{secrets.token_hex(8)}"
    tracks = [Track.of_call(stream_keys(part), producer, call) for part in streams_of(stream, partitions)]
    # Serialized a chunk at a time, as it is sent: Python works while Redis appends the chunk before.
    slices = (orders[i : i + CHUNK] for i in range(0, len(orders), CHUNK))
    if partitions == 1:
        payloads = (schema.serialize_all(chunk) for chunk in slices)
        appended = append_chunks(redis, stream, payloads, producer, durability, tracks[0])
    else:
        records = (
            [(schema.id_of(message), schema.serialize(message)) for message in chunk] for chunk in slices
        )
        appended = append_routed(redis, stream, partitions, records, producer, durability, tracks)
    try:
        async with aclosing(appended) as confirmed:
            async for reply in confirmed:
                ids.extend(reply.ids)
    except RedisError as error:
        raise PublishError(len(ids), len(orders), error) from error
    return ids


def _record(order: Order) -> Record:
    return order.order_id, serialize(order)


def streams_of(stream: str, partitions: int) -> list[str]:
    """The stream of each partition, in partition order."""
    return [partition_stream(stream, i, partitions) for i in range(partitions)]


class Track:
    """One run of appends to one stream, as Redis records it beside the stream (library.lua's `append`).

    A publish call's record is a field of its producer's hash of calls (the last CALLS_KEPT, for
    CALL_TTL_S); an input's, its checkpoint, a key of its own (for CHECKPOINT_TTL_S). Each chunk
    moves it from one state to the next: the orders appended so far and, for an input, a digest
    of them, so a run of a changed input cannot take another's checkpoint for its own.
    """

    def __init__(self, key: str, field: str, keep: int, ttl_s: int, *, state: str = "", digest: bool) -> None:
        self.where = (key, field, keep, ttl_s * 1000)
        self.state = state  # before the next chunk; '' before the first
        self.confirmed = int(state.partition(":")[0] or 0)  # orders the record says are there
        self.count = 0  # orders passed to advance() or skip()
        self._digest = hashlib.blake2b(digest_size=16) if digest else None

    @classmethod
    def of_call(cls, keys: Keys, producer: str, call: str) -> Track:
        return cls(keys.producer(producer)[0], call, library.CALLS_KEPT, library.CALL_TTL_S, digest=False)

    @classmethod
    def of_input(cls, keys: Keys, name: str, record: bytes | str | None) -> Track:
        """An input's track, continuing from its checkpoint (`record`, None when there is none)."""
        state = text(record).partition(" ")[0] if record else ""
        return cls(keys.input(name), "", 0, library.CHECKPOINT_TTL_S, state=state, digest=True)

    def advance(self, payloads: list[bytes]) -> tuple[str, str]:
        """The states before and after appending `payloads` next; the track moves to the second."""
        before = self.state
        self.count += len(payloads)
        if self._digest is not None:
            for payload in payloads:
                self._digest.update(payload + b"\n")  # compact JSON holds no raw newline
        self.state = self._now()
        return before, self.state

    def skip(self, payload: bytes) -> bool:
        """True when the checkpoint covers `payload`, the next order of this stream's share of the input.

        Raises InputChanged when the orders it covers are not those the checkpoint was made of.
        """
        if self.count >= self.confirmed:
            return False
        self.count += 1
        if self._digest is not None:
            self._digest.update(payload + b"\n")
        if self.count == self.confirmed and self._now() != self.state:
            raise InputChanged()
        return True

    def _now(self) -> str:
        return str(self.count) if self._digest is None else f"{self.count}:{self._digest.hexdigest()}"


class InputChanged(ConfigError):
    """The input's first orders are not those its checkpoint says were published from it."""

    def __init__(self) -> None:
        super().__init__("it changed since, or it starts as another input did")


async def append_routed(
    redis: Redis,
    stream: str,
    partitions: int,
    chunks: Iterable[list[Record]],
    producer: str,
    durability: Durability,
    tracks: list[Track],
) -> AsyncGenerator[library.Appended, None]:
    """`append_chunks` over STREAM_PARTITIONS streams: each record goes to `partition_of` its order id.

    Each chunk is split by partition and the shares appended side by side (on a cluster, each
    on its own node), each partition's share on that partition's track; yields the replies,
    then raises the first failure, if any.
    """
    if partitions == 1:
        payloads = ([payload for _, payload in chunk] for chunk in chunks)
        async with aclosing(
            append_chunks(redis, stream, payloads, producer, durability, tracks[0])
        ) as confirmed:
            async for appended in confirmed:
                yield appended
        return
    streams = streams_of(stream, partitions)
    source = iter(chunks)
    # A round takes one chunk per partition from `chunks`, so each partition's share is about
    # a chunk: one call each, as many records per call as unpartitioned.
    while round_ := list(islice(source, partitions)):
        shares: list[list[bytes]] = [[] for _ in streams]
        for order_id, payload in (record for chunk in round_ for record in chunk):
            shares[partition_of(order_id, partitions)].append(payload)
        outcomes = await asyncio.gather(
            *(
                _append_all(redis, streams[i], share, producer, durability, tracks[i])
                for i, share in enumerate(shares)
                if share
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, list):
                for appended in outcome:
                    yield appended
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


async def _append_all(
    redis: Redis, stream: str, payloads: list[bytes], producer: str, durability: Durability, track: Track
) -> list[library.Appended]:
    chunks = (payloads[i : i + CHUNK] for i in range(0, len(payloads), CHUNK))
    async with aclosing(append_chunks(redis, stream, chunks, producer, durability, track)) as confirmed:
        return [appended async for appended in confirmed]


async def append_chunks(
    redis: Redis,
    stream: str,
    chunks: Iterable[list[bytes]],
    producer: str,
    durability: Durability,
    track: Track,
) -> AsyncGenerator[library.Appended, None]:
    """Append each chunk of payloads whole, in order, on `track`; yield its entry ids once Redis confirmed it.

    One connection keeps two chunks in flight, so Redis appends while Python serializes (a
    redis-py Pipeline would wait for every reply first). `chunks` is read lazily, one chunk
    ahead of the replies: when it ends, the chunks already sent are still confirmed (or their
    failure raised) before this ends, so the ids yielded are exactly what is in the stream.
    With `durability.replicas`, a WAIT follows each chunk on the same connection and the chunk
    counts as confirmed only once that many replicas have it. A lost connection (or, on a
    cluster, a moved slot) is retried with backoff by sending the unconfirmed chunks again: the
    track's record tells Redis which of them it appended already, so nothing is added twice.
    Raises RedisError (ResponseError CONFLICT: the track's record is not where this run left it).
    """
    keys = stream_keys(stream)
    source = iter(chunks)
    in_flight: deque[list[EncodableT]] = deque()  # the calls of the chunks not yet confirmed
    resent = 0  # how many of them, the oldest, were sent again on a new connection
    failures = 0
    first_failure = 0.0
    loop = asyncio.get_running_loop()

    async def send(connection: AbstractConnection, command: list[EncodableT]) -> None:
        await connection.send_command(*command)
        if durability.replicas:
            await connection.send_command("WAIT", durability.replicas, durability.wait_ms)

    while True:
        try:
            await _prepare(redis)
            connection, release = await _connection(redis, stream)
        except RESEND as error:
            failures, first_failure = failures + 1, first_failure or loop.time()
            await _after_failure(redis, failures, first_failure, durability, error)
            continue
        try:
            resent = len(in_flight)
            for command in in_flight:  # unconfirmed when the connection was lost: sent again
                await send(connection, command)
            while True:
                while len(in_flight) < 2 and (chunk := next(source, [])):
                    # A span per chunk, until it is sent; its trace context goes in each entry.
                    with tracing.sending(stream, len(chunk)) as fields:
                        before, after = track.advance(chunk)
                        command = library.append_command(
                            keys, producer, track.where, before, after, chunk, fields
                        )
                        in_flight.append(command)  # before sending: a send cut half way is sent again whole
                        await send(connection, command)
                if not in_flight:
                    return
                appended = await _confirmation(connection, durability)
                failures, first_failure = 0, 0.0
                in_flight.popleft()
                again, resent = resent > 0, max(resent - 1, 0)
                yield _checked(appended, again, stream, producer)
        except RESEND as error:
            await connection.disconnect()
            if isinstance(error, LibraryGone):
                _ready.discard(redis)
            failures, first_failure = failures + 1, first_failure or loop.time()
            await _after_failure(redis, failures, first_failure, durability, error)
        finally:
            if in_flight:  # failed or stopped with replies unread: that connection is done
                await connection.disconnect()
            await release(connection)


async def _confirmation(connection: AbstractConnection, durability: Durability) -> library.Appended:
    """The reply to the oldest chunk in flight, once (with `durability.replicas`) replicas have it too."""
    try:
        reply = await connection.read_response()
    except ResponseError as error:
        if "function not found" in str(error).lower():
            raise LibraryGone(str(error)) from error
        raise
    if durability.replicas:
        replicas = await connection.read_response()
        if int(replicas) < durability.replicas:
            raise NotReplicated(
                f"{replicas} of PUBLISH_MIN_REPLICAS={durability.replicas} replicas confirmed "
                f"a chunk within PUBLISH_WAIT_MS={durability.wait_ms}"
            )
    return library.appended_of(reply)


def _checked(appended: library.Appended, sent_again: bool, stream: str, producer: str) -> library.Appended:
    """An append's reply, said in the log where Redis had lost part of the run; a chunk sent again
    that was appended before was appended by its first send, so by this run."""
    if appended.short:
        log.warning(
            "%s no longer has %s of this run that it had confirmed (a failover before a replica had "
            "them, a flush, or a restart without persistence); going on",
            stream,
            plural(appended.short),
        )
    if not sent_again:
        return appended
    if appended.gone:
        log.warning(
            "a chunk sent again found no record of its run in %s (flushed, restarted without "
            "persistence, or %d newer calls from producer %s): appended, possibly a second time",
            stream,
            library.CALLS_KEPT,
            producer,
        )
    return replace(appended, new=True)


async def _connection(
    redis: Redis, stream: str
) -> tuple[AbstractConnection, Callable[[AbstractConnection], Awaitable[None]]]:
    """A connection to the server that holds `stream`, and how to give it back."""
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        await cluster.initialize()
        node = cluster.get_node_from_key(stream)
        if node is None:
            raise ClusterDownError(f"no node of the cluster serves the slot of {stream}")

        async def give_back(connection: AbstractConnection) -> None:
            node.release(cast(Connection, connection))

        return node.acquire_connection(), give_back
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    return connection, pool.release


async def _after_failure(
    redis: Redis, failures: int, since: float, durability: Durability, error: Exception
) -> None:
    """Back off before sending again; re-raise `error` after RETRIES failures and `patience_s`.

    On a cluster, first refresh the slot map: the stream's slot may have a new primary.
    """
    loop = asyncio.get_running_loop()
    if failures > RETRIES and loop.time() - since >= durability.patience_s:
        raise error
    delay = min(0.05 * 2**failures, RETRY_CAP_S)
    log.warning("publishing failed (%s); sending again in %.2f s", type(error).__name__, delay)
    await asyncio.sleep(delay)
    if is_cluster(redis):
        with contextlib.suppress(RedisError, RedisClusterException):
            await cast(RedisCluster, redis).nodes_manager.initialize()


_ready: weakref.WeakSet[Redis] = weakref.WeakSet()


async def _prepare(redis: Redis) -> None:
    """Load the function library once per client if needed (LibraryMissing if this user may not)."""
    if redis not in _ready:
        await library.ensure_loaded(redis)
        _ready.add(redis)


def iter_sample_orders(count: int, first: int = 1) -> Iterator[Order]:
    """Made-up orders numbered `first`..`count` with unique ids, made one at a time."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    for n in range(first, count + 1):
        yield Order(
            order_id=f"ord-{run}-{n}",
            customer_email=f"customer{n}@example.com",
            items=(Item(sku=f"SKU-{n % 7}", qty=1 + n % 3),),
            total=round(9.5 + n % 40, 2),
            created_at=now,
        )


def sample_orders(count: int) -> list[Order]:
    """`count` made-up orders with unique ids, for demos and load."""
    return list(iter_sample_orders(count))


def check_samples(count: int, max_bytes: int) -> None:
    """Raise ConfigError when sample orders would be over the payload cap, which the consumers refuse."""
    # The last 40 samples have the longest numbers and every total (9.5 + n % 40): the largest payloads.
    largest = max((len(serialize(o)) for o in iter_sample_orders(count, max(1, count - 39))), default=0)
    if largest > max_bytes:
        raise ConfigError(f"sample orders are up to {largest} bytes, over MAX_PAYLOAD_BYTES ({max_bytes})")


def payloads_of(lines: Iterable[bytes], source: str, max_bytes: int) -> Iterator[Record]:
    """Each order of JSON `lines` as sent (order id, payload); raise ConfigError at the first bad line.

    A line is bad when it is not a valid order, or when the order as sent would be over
    `max_bytes` (serializing can lengthen it: `1` becomes `1.0`), which the consumers refuse.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) == _line_limit(max_bytes) and not line.endswith(b"\n"):  # cut off by _lines
            raise ConfigError(
                f"{source} line {number}: longer than the {max_bytes:,}-byte cap on an order "
                "(MAX_PAYLOAD_BYTES)"
            )
        raw = line.rstrip(b"\r\n")
        try:
            order = parse_order(raw, max_bytes)
        except InvalidOrder as error:
            raise ConfigError(f"{source} line {number}: {error}") from None
        payload = serialize(order)
        if len(payload) > max_bytes:
            raise ConfigError(
                f"{source} line {number}: the order is {len(payload)} bytes as sent ({len(raw)} in the "
                f"file), over the {max_bytes:,}-byte cap on an order (MAX_PAYLOAD_BYTES)"
            )
        yield order.order_id, payload


def _line_limit(max_bytes: int) -> int:
    """How much of one line is read at most: enough to tell most lines' size, never unbounded."""
    return 2 * max_bytes + 2


def _lines(handle: BinaryIO, source: str, max_bytes: int) -> Iterator[bytes]:
    """The lines of `handle`, each read up to just past the cap, so one huge line is never held whole."""
    try:
        while line := handle.readline(_line_limit(max_bytes)):
            yield line
    except OSError as error:
        raise CliError(f"cannot read {source}: {error.strerror}") from None


def _spooled(records: Iterable[Record], spool: BinaryIO) -> Iterator[Record]:
    """`records`, each also written to `spool` as one line: order id, a tab, the payload.

    An order id is printable (no tab) and compact JSON has no raw newline.
    """
    for order_id, payload in records:
        try:
            spool.write(order_id.encode() + b"\t" + payload + b"\n")
        except OSError as error:
            raise CliError(f"cannot keep stdin in a temporary file: {error.strerror}") from None
        yield order_id, payload


def _unspooled(spool: BinaryIO) -> Iterator[Record]:
    """The records written by _spooled, from the start."""
    try:
        spool.seek(0)
        for line in spool:
            order_id, _, payload = line[:-1].partition(b"\t")
            yield order_id.decode(), payload
    except OSError as error:
        raise CliError(f"cannot read back stdin from a temporary file: {error.strerror}") from None


class Input:
    """Where orders come from, read twice: to validate every order, then to publish them.

    Nothing is kept between the passes but a count. A file is read and checked again as it
    is published, so whatever changed in it since, nothing invalid is sent. Stdin cannot be
    read twice: its orders, as they will be sent, go to an unnamed temporary file on the
    first pass (gone when closed, and with the process on any exit, even kill -9).
    """

    def __init__(self, args: argparse.Namespace, max_bytes: int, stack: ExitStack) -> None:
        self.path: str | None = args.file
        self.count: int = args.count
        self.max_bytes = max_bytes
        self.stack = stack
        self.spool: BinaryIO | None = None
        if self.path is None and self.count < 0:
            raise ConfigError(f"--count must be 0 or more, got {self.count}")

    @property
    def source(self) -> str:
        return "stdin" if self.path == "-" else self.path or "samples"

    def first_pass(self) -> Iterator[Record]:
        """The payloads, read for the first time; raises ConfigError naming a bad line."""
        if self.path is None:
            check_samples(self.count, self.max_bytes)
            return (_record(order) for order in iter_sample_orders(self.count))
        if self.path == "-":
            if sys.stdin is None:
                raise ConfigError("--file -: stdin is closed")
            self.spool = self.stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - the stack closes it
            payloads = payloads_of(_lines(sys.stdin.buffer, "stdin", self.max_bytes), "stdin", self.max_bytes)
            return _spooled(payloads, self.spool)
        return payloads_of(self._file_lines(), self.path, self.max_bytes)

    def second_pass(self) -> Iterator[Record]:
        """The same payloads again (samples are made anew, with new ids)."""
        if self.path is None:
            return (_record(order) for order in iter_sample_orders(self.count))
        if self.spool is not None:
            return _unspooled(self.spool)
        return payloads_of(self._file_lines(), self.source, self.max_bytes)

    def _file_lines(self) -> Iterator[bytes]:
        assert self.path is not None
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed by the with below, in this generator
        except OSError as error:
            raise ConfigError(f"cannot read {self.path}: {error.strerror}") from None
        with handle:
            yield from _lines(handle, self.path, self.max_bytes)


class Interrupted(CliError):
    """SIGINT or SIGTERM stopped the run; exit code 128 + the signal's number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class Run:
    """One run of the command: how far it got, and what SIGINT and SIGTERM do to it.

    Before the first chunk is sent, a signal stops the run at once: nothing was published.
    After, it stops the sending of new chunks, and the chunks in flight are still confirmed,
    so the count is exact. A second signal stops at once, chunks in flight or not.
    """

    def __init__(self, task: asyncio.Task[Any], stream: str) -> None:
        self.task = task
        self.stream = stream
        self.total = 0
        self.confirmed = 0  # orders Redis confirmed to this run's chunks
        self.again = 0  # of those, orders another run of the same input had appended
        self.skipped = 0  # orders the input's checkpoint covers: an earlier run published them
        self.repeated = 0  # lines whose order_id an earlier line has: not sent
        self.examples: list[str] = []  # those order ids, each once
        self.resumable = False  # the input has a checkpoint: running it again sends the rest
        self.first_id = self.last_id = ""
        self.sending = False
        self.signal: int | None = None
        self.forced = False
        self.problem: CliError | None = None

    @property
    def new(self) -> int:
        return self.confirmed - self.again

    @property
    def already(self) -> int:
        return self.skipped + self.repeated + self.again

    @property
    def done(self) -> int:
        """Orders of the input that are in the stream: confirmed now or before, or repeated."""
        return self.confirmed + self.skipped + self.repeated

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)

    def on_signal(self, signum: int) -> None:
        if self.signal is None and self.sending:
            log.info(
                "%s: sending no more, waiting for the chunks in flight (send it again to stop now)",
                signal.Signals(signum).name,
            )
        else:
            self.forced = self.signal is not None
            self.task.cancel()
        self.signal = signum

    def read(self, records: Iterator[Record], source: str) -> Iterator[Record]:
        """`records`, at most `total` (a file that grew since it was checked gains nothing); notes a
        problem when there are fewer."""
        count = 0
        for record in islice(records, self.total):
            count += 1
            yield record
        if count < self.total:
            self.problem = CliError(f"{source} changed after it was checked: it has {count:,} orders")

    def unrepeated(self, records: Iterator[Record], repeated: set[int]) -> Iterator[Record]:
        """`records` but those whose order_id an earlier one has (`repeated`: hash() of such ids)."""
        seen: dict[str, bool] = {}  # order id -> found again
        for record in records:
            order_id = record[0]
            if hash(order_id) in repeated:
                if order_id in seen:
                    self.repeated += 1
                    if not seen[order_id]:
                        seen[order_id] = True
                        self.examples.append(order_id)
                    continue
                seen[order_id] = False
            yield record

    def unconfirmed(self, records: Iterator[Record], tracks: list[Track]) -> Iterator[Record]:
        """`records` but those the input's checkpoints cover (one per partition, each checked).

        Nothing is yielded until every partition's checkpoint has been checked against the
        input, so a changed input sends nothing. An interrupted run leaves the partitions at
        most a round of chunks apart: more held back than that means the input changed.
        """
        waiting = sum(track.count < track.confirmed for track in tracks)
        held: list[Record] = []
        for record in records:
            track = tracks[partition_of(record[0], len(tracks))]
            if track.skip(record[1]):
                self.skipped += 1
                if track.count == track.confirmed:
                    waiting -= 1
                    if not waiting:
                        yield from held
                        held.clear()
            elif waiting:
                held.append(record)
                if len(held) > len(tracks) * CHUNK:
                    raise InputChanged()
            else:
                yield record
        if waiting:  # the input ended before one of its checkpoints
            raise InputChanged()

    def chunks(self, records: Iterator[Record], source: str) -> Iterator[list[Record]]:
        """CHUNK records at a time until a signal, a failure to read, or the end."""
        while self.signal is None:
            try:
                chunk = list(islice(records, CHUNK))
            except InputChanged:
                raise
            except CliError as error:
                self.problem = CliError(f"{source} changed after it was checked: {error}")
                return
            if not chunk:
                return
            self.sending = True
            yield chunk

    def confirm(self, appended: library.Appended) -> None:
        self.confirmed += len(appended.ids)
        if not appended.new:
            self.again += len(appended.ids)
        self.first_id = self.first_id or appended.ids[0]
        self.last_id = appended.ids[-1]

    def so_far(self) -> str:
        """`1,000 of 5,000 orders confirmed in orders`, with how many were there already, if any."""
        split = f" ({self.new:,} new, {self.already:,} already there)" if self.already else ""
        return f"{self.done:,} of {self.total:,} orders confirmed in {self.stream}{split}"

    def then(self) -> str:
        """What to do after a run that stopped part way."""
        if self.resumable:
            return "run the same command on the same input again: it sends the rest and adds nothing twice"
        return "the rest were not sent"

    def outcome(self) -> CliError | None:
        """Why the run ended before every order was confirmed; None when all were."""
        if self.done == self.total and (self.sending or self.signal is None):
            return None
        rest = f"the other {self.total - self.done:,} were not sent"
        again = f"; {self.then()}" if self.resumable else ""
        if self.signal is None:
            assert self.problem is not None, "publishing ended early with no reason"
            return CliError(f"{self.so_far()}, then {self.problem}; {rest}{again}")
        name = signal.Signals(self.signal).name
        if not self.sending:
            return Interrupted(self.signal, "interrupted: nothing was published")
        if self.forced:
            return Interrupted(
                self.signal,
                f"interrupted again by {name}: {self.so_far()}, the next {2 * CHUNK} may or may not be "
                f"there; {self.then()}",
            )
        return Interrupted(self.signal, f"interrupted by {name}: {self.so_far()}; {rest}{again}")

    def summary(self, seconds: float) -> str:
        """The result line: how many orders were new, how many already there, and why."""
        text = f"published {plural(self.new, 'new order')} to {self.stream} in {seconds:.1f} s"
        text += f", {self.already:,} already there"
        reasons = []
        if self.skipped:
            reasons.append(f"{self.skipped:,} published before from this input")
        if self.again:
            reasons.append(f"{self.again:,} published meanwhile by another run of it")
        if self.repeated:
            named = ", ".join(self.examples[:3]) + (", ..." if len(self.examples) > 3 else "")
            reasons.append(f"{self.repeated:,} with the order_id of an earlier line ({named})")
        return text + (f": {'; '.join(reasons)}" if reasons else "")


def plural(count: int, noun: str = "order") -> str:
    """`1 order`, `2,000 orders`."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m producer",
        description=(
            "Publish orders to the stream: sample orders, or real ones from a JSON-lines file. "
            "Every order is checked before the first is sent; a bad line publishes nothing. The same "
            "input run again (after an interruption or a failure) publishes only what is not there yet."
        ),
        epilog=(
            f"Settings come from the environment and .env: REDIS_URL (default {DEFAULTS['REDIS_URL']}), "
            f"STREAM_KEY (default {DEFAULTS['STREAM_KEY']}), MAX_PAYLOAD_BYTES (default "
            f"{DEFAULTS['MAX_PAYLOAD_BYTES']}). Exit codes: 0 published, 2 bad input or settings, "
            "1 Redis failed, 130 or 143 interrupted (SIGINT, SIGTERM)."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--count", type=int, default=10, metavar="N", help="publish N sample orders (default: %(default)s)"
    )
    source.add_argument(
        "--file",
        metavar="PATH",
        help="publish the orders of a JSON-lines file, or - for stdin (default: none)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print errors only (default: a progress bar on stderr when it is a terminal, and the "
        "result on stdout)",
    )
    return parser


async def main(settings: Settings, args: argparse.Namespace) -> int:
    """Check every order, then publish those not there yet chunk by chunk; 8 bytes of memory per order."""
    started = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    run = Run(task, settings.stream_key)
    try:
        with ExitStack() as stack:
            orders = Input(args, settings.max_payload_bytes, stack)
            survey = _check(orders, run)
            async with redis_connect(settings) as redis:
                show = not args.quiet and sys.stderr.isatty()
                await _publish(redis, orders, survey, run, settings, show_progress=show)
    except asyncio.CancelledError:
        if run.signal is None:
            raise
        task.uncancel()
    failure = run.outcome()
    if failure is not None:
        raise failure
    if run.confirmed:
        log.info(
            "published %s to %s (ids %s .. %s)", plural(run.confirmed), run.stream, run.first_id, run.last_id
        )
    if not args.quiet:
        print(run.summary(time.monotonic() - started) if run.total else "nothing to publish")
    return 0


@dataclass(frozen=True)
class Survey:
    """What the first pass learned of an input, besides its size."""

    name: str | None  # its checkpoint's name: a digest of its first order's id (None: samples)
    repeated: set[int]  # hash() of the order ids on more than one line (and of rare look-alikes)


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM while the input is checked."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Signalled(signum)


def _check(orders: Input, run: Run) -> Survey:
    """The first pass: count the orders in `run.total`, raising ConfigError at a bad one, and note
    which order ids are on more than one line; then hand signals to `run`.

    The pass is synchronous, and may wait on stdin: only a plain signal handler can stop it.
    """
    try:
        for signum in SIGNALS:
            signal.signal(signum, _raise_signalled)
        hashes = array("q")  # 8 bytes per order, where a set of the ids would take about 100
        first = None
        for order_id, _ in orders.first_pass():
            first = first or order_id
            hashes.append(hash(order_id))
        run.total = len(hashes)
        if orders.path is None or first is None:  # samples are made anew for the second pass
            return Survey(None, set())
        name = hashlib.blake2b(first.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return Survey(name, repeated_values(hashes))
    except _Signalled as stopped:
        raise Interrupted(stopped.signum, "interrupted: nothing was published") from None
    except ConfigError as error:
        raise ConfigError(f"{error}; nothing was published") from None
    finally:
        # Blocked while the handlers change hands, a signal waits for the new ones.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            run.install()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def repeated_values(hashes: array[int]) -> set[int]:
    """The values found more than once in `hashes`, which is sorted in place, a run at a time, so
    that no more than a run's worth of Python ints exists at once."""
    run = 1 << 16
    for start in range(0, len(hashes), run):
        hashes[start : start + run] = array("q", sorted(hashes[start : start + run]))
    view = memoryview(hashes)
    found: set[int] = set()
    previous = None
    for value in heapq.merge(*(iter(view[start : start + run]) for start in range(0, len(hashes), run))):
        if value == previous:
            found.add(value)
        previous = value
    view.release()
    return found


async def _publish(
    redis: Redis, orders: Input, survey: Survey, run: Run, settings: Settings, *, show_progress: bool
) -> None:
    """Publish the orders again read from `orders` that are not there yet, counting in `run`.

    A file or stdin is published on its checkpoint, one per partition: orders an earlier run
    of the same input published are skipped, and each chunk moves the checkpoint in the step
    that appends it. Samples, new each run, on a track of their own.
    """
    parts = [stream_keys(stream) for stream in streams_of(run.stream, settings.stream_partitions)]
    if survey.name is None:
        call = f"call:{secrets.token_hex(8)}"
        tracks = [Track.of_call(keys, settings.producer_id, call) for keys in parts]
    else:
        name = survey.name
        tracks = [Track.of_input(keys, name, await redis.get(keys.input(name))) for keys in parts]
        run.resumable = True
    records = run.read(orders.second_pass(), orders.source)
    records = run.unconfirmed(run.unrepeated(records, survey.repeated), tracks)
    chunks = run.chunks(records, orders.source)
    with (
        logging_redirect_tqdm() if show_progress else nullcontext(),  # log lines above the bar, not in it
        tqdm(
            total=run.total,
            unit=" orders",
            unit_scale=True,
            delay=0.5,
            leave=False,
            disable=not show_progress,
        ) as bar,
    ):
        try:
            appended = append_routed(
                redis,
                run.stream,
                settings.stream_partitions,
                chunks,
                settings.producer_id,
                durability_of(settings),
                tracks,
            )
            async with aclosing(appended) as replies:
                async for reply in replies:
                    run.confirm(reply)
                    bar.update(run.done - bar.n)
        except InputChanged as error:
            covered = sum(track.confirmed for track in tracks)
            raise ConfigError(
                f"{orders.source}: its first {plural(covered)} are not those an earlier run published from "
                f"it ({error}), and orders already in the stream would run twice: nothing was published; "
                "publish the orders that are not there yet from a file of their own"
            ) from None
        except ResponseError as error:
            if not str(error).startswith("CONFLICT"):
                raise PublishError(run.done, run.total, error, run.then()) from error
            raise CliError(
                f"{run.so_far()}, then another run of the same input moved its checkpoint: stopped; "
                f"once that run ended, {run.then()}"
            ) from None
        except RedisError as error:
            raise PublishError(run.done, run.total, error, run.then()) from error


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    run_script("producer", lambda settings: main(settings, arguments))
