"""Publish orders to the stream: one at a time, in batches, or from a JSON-lines file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, aclosing, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from types import FrameType
from typing import Any, BinaryIO, NoReturn, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]  # no stubs without types-tqdm
from tqdm.contrib.logging import logging_redirect_tqdm  # type: ignore[import-untyped, unused-ignore]

from config import DEFAULTS, CliError, ConfigError, Settings, run_script
from core import library, tracing
from core.capabilities import detect
from core.keys import partition_of, partition_stream, stream_keys
from core.replies import text
from orders import InvalidOrder, Item, Order, parse_order, serialize
from redisPool import is_cluster, redis_connect

log = logging.getLogger("producer")

CHUNK = 500  # orders per round trip in publish_many
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PublishError(CliError):
    """Publishing stopped part way; `published` entries are confirmed in the stream."""

    def __init__(self, published: int, total: int, cause: Exception) -> None:
        super().__init__(
            f"{published} of {total} orders confirmed, then Redis failed "
            f"({type(cause).__name__}: {cause}); the next {2 * CHUNK} may or may not be in the stream"
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


# Worth sending the chunks in flight again: the append is idempotent, so nothing is added twice.
RESEND = (
    RedisConnectionError,
    RedisTimeoutError,
    AskError,  # and MovedError: the slot is served elsewhere now (a failover, a resharding)
    TryAgainError,
    ClusterDownError,  # and MasterDownError
    RedisClusterException,
    NotReplicated,
)


async def publish(
    redis: Redis,
    stream: str,
    order: Order,
    producer: str = "",
    *,
    partitions: int = 1,
    durability: Durability = Durability(),
) -> str:
    """Append one order; return its entry id once Redis has confirmed it.

    Idempotent: sent again (after a lost reply) by the same producer id (PRODUCER_ID; default
    the host name) within the window, the order is not added twice.
    """
    ids = await publish_many(redis, stream, [order], producer, partitions=partitions, durability=durability)
    return ids[0]


async def publish_many(
    redis: Redis,
    stream: str,
    orders: Sequence[Order],
    producer: str = "",
    *,
    partitions: int = 1,
    durability: Durability = Durability(),
) -> list[str]:
    """Append orders, CHUNK per call, each to its partition's stream; return their entry ids.

    Each chunk is one call of the function library's idempotent append: added whole or not
    at all, and a chunk sent again after a lost connection adds nothing twice. Within a
    partition the orders keep their order. Raises PublishError saying how many orders Redis
    confirmed before a failure.
    """
    ids: list[str] = []
    records = [_record(order) for order in orders]
    chunks = (records[i : i + CHUNK] for i in range(0, len(records), CHUNK))
    try:
        appended = append_routed(redis, stream, partitions, chunks, producer, durability)
        async with aclosing(appended) as confirmed:
            async for replies in confirmed:
                ids.extend(replies)
    except RedisError as error:
        raise PublishError(len(ids), len(orders), error) from error
    return ids


def _record(order: Order) -> Record:
    return order.order_id, serialize(order)


async def append_routed(
    redis: Redis,
    stream: str,
    partitions: int,
    chunks: Iterable[list[Record]],
    producer: str = "",
    durability: Durability = Durability(),
) -> AsyncGenerator[list[str], None]:
    """`append_chunks` over STREAM_PARTITIONS streams: each record goes to `partition_of` its order id.

    Each chunk is split by partition and the shares appended side by side (on a cluster, each
    on its own node); yields the ids confirmed, then raises the first failure, if any.
    """
    if partitions == 1:
        async with aclosing(append_chunks(redis, stream, chunks, producer, durability)) as confirmed:
            async for ids in confirmed:
                yield ids
        return
    streams = [partition_stream(stream, i, partitions) for i in range(partitions)]
    source = iter(chunks)
    # A round takes one chunk per partition from `chunks`, so each partition's share is about
    # a chunk: one call each, as many records per call as unpartitioned.
    while round_ := list(islice(source, partitions)):
        shares: list[list[Record]] = [[] for _ in streams]
        for record in (record for chunk in round_ for record in chunk):
            shares[partition_of(record[0], partitions)].append(record)
        outcomes = await asyncio.gather(
            *(
                _append_all(redis, streams[i], share, producer, durability)
                for i, share in enumerate(shares)
                if share
            ),
            return_exceptions=True,
        )
        yield [entry_id for outcome in outcomes if isinstance(outcome, list) for entry_id in outcome]
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


async def _append_all(
    redis: Redis, stream: str, records: list[Record], producer: str, durability: Durability
) -> list[str]:
    chunks = (records[i : i + CHUNK] for i in range(0, len(records), CHUNK))
    async with aclosing(append_chunks(redis, stream, chunks, producer, durability)) as confirmed:
        return [entry_id async for ids in confirmed for entry_id in ids]


async def append_chunks(
    redis: Redis,
    stream: str,
    chunks: Iterable[list[Record]],
    producer: str = "",
    durability: Durability = Durability(),
) -> AsyncGenerator[list[str], None]:
    """Append each chunk of records whole, in order; yield its entry ids once Redis confirmed it.

    One connection keeps two chunks in flight, so Redis appends while Python serializes (a
    redis-py Pipeline would wait for every reply first). `chunks` is read lazily, one chunk
    ahead of the replies: when it ends, the chunks already sent are still confirmed (or their
    failure raised) before this ends, so the ids yielded are exactly what is in the stream.
    With `durability.replicas`, a WAIT follows each chunk on the same connection and the chunk
    counts as confirmed only once that many replicas have it. A lost connection (or, on a
    cluster, a moved slot) is retried with backoff by sending the unconfirmed chunks again: the
    append is idempotent per order id, so nothing is added twice. Raises RedisError.
    """
    keys = stream_keys(stream)
    producer = producer or socket.gethostname()
    native = await _prepare(redis, stream)
    source = iter(chunks)
    in_flight: deque[list[EncodableT]] = deque()  # the calls of the chunks not yet confirmed
    failures = 0
    first_failure = 0.0
    loop = asyncio.get_running_loop()

    async def send(connection: AbstractConnection, command: list[EncodableT]) -> None:
        await connection.send_command(*command)
        if durability.replicas:
            await connection.send_command("WAIT", durability.replicas, durability.wait_ms)

    while True:
        try:
            connection, release = await _connection(redis, stream)
        except RESEND as error:
            failures, first_failure = failures + 1, first_failure or loop.time()
            await _after_failure(redis, failures, first_failure, durability, error)
            continue
        try:
            for command in in_flight:  # unconfirmed when the connection was lost: sent again
                await send(connection, command)
            while True:
                while len(in_flight) < 2 and (chunk := next(source, [])):
                    # A span per chunk, until it is sent; its trace context goes in each entry.
                    with tracing.sending(stream, len(chunk)) as fields:
                        command = library.append_command(keys, producer, native, chunk, fields)
                        in_flight.append(command)  # before sending: a send cut half way is sent again whole
                        await send(connection, command)
                if not in_flight:
                    return
                reply = await connection.read_response()
                if durability.replicas:
                    replicas = await connection.read_response()
                    if int(replicas) < durability.replicas:
                        raise NotReplicated(
                            f"{replicas} of PUBLISH_MIN_REPLICAS={durability.replicas} replicas confirmed "
                            f"a chunk within PUBLISH_WAIT_MS={durability.wait_ms}"
                        )
                in_flight.popleft()
                failures, first_failure = 0, 0.0
                yield [text(i) for i in reply]
        except RESEND as error:
            await connection.disconnect()
            failures, first_failure = failures + 1, first_failure or loop.time()
            await _after_failure(redis, failures, first_failure, durability, error)
        finally:
            if in_flight:  # failed or stopped with replies unread: that connection is done
                await connection.disconnect()
            await release(connection)


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


_ready: weakref.WeakKeyDictionary[Redis, dict[str, bool]] = weakref.WeakKeyDictionary()


async def _prepare(redis: Redis, stream: str) -> bool:
    """Load the function library if needed; True where Redis's own XADD IDMP can be used."""
    known = _ready.setdefault(redis, {})
    if stream not in known:
        await library.ensure_loaded(redis)
        known[stream] = await library.uses_native_idmp(redis, stream, await detect(redis))
    return known[stream]


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
                f"{source} line {number}: more than {len(line):,} bytes, over the {max_bytes}-byte cap"
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
                f"file), over the {max_bytes}-byte cap"
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
        self.confirmed = 0
        self.first_id = self.last_id = ""
        self.sending = False
        self.signal: int | None = None
        self.forced = False
        self.problem: CliError | None = None

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

    def chunks(self, records: Iterator[Record], source: str) -> Iterator[list[Record]]:
        """CHUNK records at a time, at most `total`, until a signal or a failure to read."""
        records = islice(records, self.total)  # a file that grew since it was checked gains nothing
        sent = 0
        while self.signal is None:
            try:
                chunk = list(islice(records, CHUNK))
            except CliError as error:
                self.problem = CliError(f"{source} changed after it was checked: {error}")
                return
            if not chunk:
                if sent < self.total:
                    self.problem = CliError(f"{source} changed after it was checked: it has {sent:,} orders")
                return
            sent += len(chunk)
            self.sending = True
            yield chunk

    def confirm(self, ids: list[str]) -> None:
        self.confirmed += len(ids)
        self.first_id = self.first_id or ids[0]
        self.last_id = ids[-1]

    def outcome(self) -> CliError | None:
        """Why the run ended before every order was confirmed; None when all were."""
        if self.confirmed == self.total and (self.sending or self.signal is None):
            return None
        if self.signal is None:
            assert self.problem is not None, "publishing ended early with no reason"
            return CliError(
                f"{self.confirmed:,} of {self.total:,} orders confirmed, then {self.problem}; "
                f"the other {self.total - self.confirmed:,} were not sent"
            )
        name = signal.Signals(self.signal).name
        if not self.sending:
            return Interrupted(self.signal, "interrupted: nothing was published")
        if self.forced:
            return Interrupted(
                self.signal,
                f"interrupted again by {name}: {self.confirmed:,} of {self.total:,} orders confirmed in "
                f"{self.stream}, the next {2 * CHUNK} may or may not be there; the rest were not sent",
            )
        return Interrupted(
            self.signal,
            f"interrupted by {name}: {self.confirmed:,} of {self.total:,} orders confirmed in "
            f"{self.stream}; the other {self.total - self.confirmed:,} were not sent",
        )


def plural(count: int) -> str:
    """`1 order`, `2,000 orders`."""
    return f"{count:,} order" if count == 1 else f"{count:,} orders"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description=(
            "Publish orders to the stream: sample orders, or real ones from a JSON-lines file. "
            "Every order is checked before the first is sent; a bad line publishes nothing."
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
    """Check every order, then publish them chunk by chunk; memory does not grow with the input."""
    started = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    run = Run(task, settings.stream_key)
    try:
        with ExitStack() as stack:
            orders = Input(args, settings.max_payload_bytes, stack)
            run.total = _check(orders, run)
            async with redis_connect(settings) as redis:
                show = not args.quiet and sys.stderr.isatty()
                await _publish(redis, orders, run, settings, show_progress=show)
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
        elapsed = time.monotonic() - started
        print(
            f"published {plural(run.total)} to {run.stream} in {elapsed:.1f} s"
            if run.total
            else "nothing to publish"
        )
    return 0


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM while the input is checked."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Signalled(signum)


def _check(orders: Input, run: Run) -> int:
    """The first pass: count the orders, raising ConfigError at a bad one; then hand signals to `run`.

    The pass is synchronous, and may wait on stdin: only a plain signal handler can stop it.
    """
    try:
        for signum in SIGNALS:
            signal.signal(signum, _raise_signalled)
        return sum(1 for _ in orders.first_pass())
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


async def _publish(redis: Redis, orders: Input, run: Run, settings: Settings, *, show_progress: bool) -> None:
    """Publish the orders again read from `orders`, counting what Redis confirms in `run`."""
    chunks = run.chunks(orders.second_pass(), orders.source)
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
            )
            async with aclosing(appended) as replies:
                async for ids in replies:
                    run.confirm(ids)
                    bar.update(len(ids))
        except RedisError as error:
            raise PublishError(run.confirmed, run.total, error) from error


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    run_script("producer", lambda settings: main(settings, arguments))
