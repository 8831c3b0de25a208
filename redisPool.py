"""The one redis.asyncio connection pool of a process: pinged at start, retried, always closed.

With REDIS_CLUSTER=true it is redis-py's cluster client instead: REDIS_URL (and
REDIS_CLUSTER_NODES) name nodes to start from, it finds the others, routes each command by its
key's slot and follows failovers (MOVED, topology refresh). It offers the same command methods,
so the scripts take it where they take a Redis. With REDIS_SENTINELS it is redis-py's Sentinel
pool, following the master the sentinels name through failovers (core/sentinel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

from config import CliError, Settings, host_and_port
from core import sentinel

if HIREDIS_AVAILABLE:
    import hiredis

log = logging.getLogger("redisPool")
T = TypeVar("T")

# Each connection attempt gives up after this long (at most REDIS_CONNECT_TIMEOUT_MS at start).
CONNECT_TIMEOUT_S = 2.0


class RedisUnavailable(CliError):
    """Redis could not be reached or refused us at start: exit code 1."""


class RedisRefused(RedisUnavailable):
    """Redis answered but refused us (credentials, ACL, TLS): waiting longer cannot help."""


class NotACluster(RedisRefused):
    """REDIS_CLUSTER=true names a Redis that is not a cluster: a setting to change, exit code 2."""

    exit_code = 2


class _Retry(Retry):
    """Retry lost connections, never a refused login (AuthenticationError is a ConnectionError).

    Retrying the handshake would only delay the one clear line: redis-py retries it both in
    the connection and in the command, so a missing password took 16 attempts and 2 s.
    """

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(error: Exception) -> bool:
            return not isinstance(error, AuthenticationError) and (
                is_retryable is None or is_retryable(error)
            )

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


class _SendOnClosed(AbstractConnection):
    """A send that finds its connection closed under it fails as a lost connection.

    After a failover, redis-py's cluster client (8.1) closes each node's free connections while
    another task may just have taken one of them (ClusterNode.disconnect_free_connections
    against acquire_connection). That task's send, or the handshake of its reconnect, then
    hits the closed writer: `AttributeError: 'NoneType' object has no attribute 'writelines'`,
    which none of redis-py's retries catch. On one Redis nothing closes a connection in use, so
    there it changes nothing.
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except AttributeError:
            if self.is_connected:  # not closed: a fault of its own, not this race
                raise
            raise RedisConnectionError("connection closed by the client while sending on it") from None


class _HiredisPacking(AbstractConnection):
    """Pack commands with hiredis, as redis-py's sync client does.

    redis.asyncio packs in pure Python (redis-py issue #4176): the largest cost of publishing a
    batch (docs/speed.md). Arguments go to hiredis as they are; the sync client's own serializer
    takes what hiredis refuses (a bytearray) and multi-word command names ("CLIENT SETNAME"),
    which it splits. Without hiredis installed, redis-py's own packer.
    """

    _packer = cast(Any, HiredisRespSerializer)()  # typed in some redis-py releases, not in others

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not HIREDIS_AVAILABLE:
            return super().pack_command(*args)
        name = args[0]
        if (b" " if isinstance(name, bytes) else " ") not in name:  # type: ignore[operator]
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        return self._packer.pack(*args)  # type: ignore[no-any-return]


class _FastConnection(_SendOnClosed, _HiredisPacking, Connection):
    pass


class _FastSSLConnection(_SendOnClosed, _HiredisPacking, SSLConnection):
    pass


class _FastUnixConnection(_SendOnClosed, _HiredisPacking, UnixDomainSocketConnection):
    pass


class _FastSentinelConnection(_SendOnClosed, _HiredisPacking, SentinelManagedConnection):
    pass


class _FastSentinelSSLConnection(_SendOnClosed, _HiredisPacking, SentinelManagedSSLConnection):
    pass


# Ours (the guard, hiredis packing) for redis-py's own, on one Redis, a cluster's nodes and a
# master behind Sentinel alike.
_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _FastConnection,
    SSLConnection: _FastSSLConnection,
    UnixDomainSocketConnection: _FastUnixConnection,
    SentinelManagedConnection: _FastSentinelConnection,
    SentinelManagedSSLConnection: _FastSentinelSSLConnection,
}


def max_connections(settings: Settings) -> int:
    """REDIS_MAX_CONNECTIONS, plus two per partition beyond the first and one for the first: each
    partition's consumer keeps a read open (blocking, or the next batch read while this one's
    handlers run) and may call Redis meanwhile (the dedupe guard, a dead letter, the handler)."""
    return settings.redis_max_connections + 2 * settings.stream_partitions - 1


def connection_options(settings: Settings) -> dict[str, Any]:
    """What every connection of the process shares, one Redis or a cluster."""
    return {
        "max_connections": max_connections(settings),  # per node, on a cluster
        "socket_timeout": settings.socket_timeout_ms / 1000,
        "socket_connect_timeout": min(CONNECT_TIMEOUT_S, settings.redis_connect_timeout_ms / 1000),
        "health_check_interval": 30,
        "client_name": settings.consumer_name,  # CLIENT LIST then shows which consumer is which
    }


def make_pool(settings: Settings) -> ConnectionPool:
    """A pool whose socket timeout stays above the blocking-read time and that retries lost connections;
    through Sentinel (REDIS_SENTINELS), its connections go to the master the sentinels name."""
    options: dict[str, Any] = {
        # Three quick reconnects hide a dropped connection; longer outages reach the caller.
        "retry": _Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        **connection_options(settings),
    }
    pool: ConnectionPool
    if settings.redis_sentinels:
        sentinels, to_sentinels, to_master = sentinel.options(settings)
        manager = Sentinel(sentinels, sentinel_kwargs=to_sentinels)
        pool = sentinel.Pool(settings.redis_sentinel_master, manager, **to_master, **options)  # type: ignore[no-untyped-call]
    else:
        pool = ConnectionPool.from_url(settings.redis_url, **options)
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return pool


def where(settings: Settings) -> str:
    """The Redis the settings name, for log lines (no password): REDIS_URL, or the master's name
    and the sentinels."""
    if settings.redis_sentinels:
        sentinels = ",".join(settings.redis_sentinels)
        return f"master {settings.redis_sentinel_master} of Sentinel {sentinels}"
    if settings.redis_cluster_nodes:
        return f"{settings.safe_redis_url} (and {','.join(settings.redis_cluster_nodes)})"
    return settings.safe_redis_url


async def wait_until_reachable(redis: Redis, where: str, deadline_s: float) -> None:
    """PING until Redis answers; raise RedisUnavailable after `deadline_s`, or at once when hopeless.

    Silent until then (retries are DEBUG lines): a script that gives up says so in one line.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    delay = 0.1
    reason, no_master = "no answer", False
    while True:
        try:
            async with asyncio.timeout(max(give_up - loop.time(), 0.1)):
                await redis.ping()
            return
        except (AuthenticationError, ResponseError) as error:
            # WRONGPASS, NOAUTH, NOPERM: retrying cannot help.
            raise RedisRefused(refusal(where, error)) from None
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as error:
            if isinstance(error.__cause__ or error.__context__, ssl.SSLError):
                raise RedisRefused(f"TLS with Redis at {where} failed: {error}") from None
            if isinstance(error, MasterNotFoundError) and sentinel.refused(error):
                raise RedisRefused(
                    f"the sentinels of {where} refused their user or password: set REDIS_SENTINEL_PASSWORD "
                    "(and REDIS_SENTINEL_USERNAME for a user other than default) to what they require"
                ) from None
            if "Cluster mode is not enabled" in str(error):  # it answered: waiting cannot help
                raise NotACluster(
                    f"Redis at {where} is not a Redis Cluster (cluster mode is not enabled on it): "
                    "set REDIS_CLUSTER=false to use it as one Redis"
                ) from None
            if not isinstance(error, TimeoutError):  # keep the cause, not our own deadline
                reason = str(error) or type(error).__name__
                no_master = isinstance(error, MasterNotFoundError)
            if loop.time() + delay >= give_up:
                pool = getattr(redis, "connection_pool", None)
                if isinstance(pool, sentinel.Pool) and (no_master or reason == "no answer"):
                    reason = await sentinel.what_each_says(pool)
                raise RedisUnavailable(
                    f"cannot reach Redis at {where} after {deadline_s:g}s: {reason}"
                ) from None
            log.debug("Redis at %s not reachable yet (%s); retrying", where, type(error).__name__)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


def refusal(where: str, error: Exception) -> str:
    """One line for a Redis that answered but refused us, saying what to change; never a secret."""
    text = str(error)
    # NOAUTH on RESP2; on RESP3 the HELLO handshake is refused instead.
    if any(sign in text for sign in ("NOAUTH", "Authentication required", "HELLO must be called")):
        return (
            f"Redis at {where} needs a password: put it in REDIS_URL, "
            "redis://USER:PASSWORD@HOST:PORT/DB (redis://:PASSWORD@HOST:PORT/DB for the default user)"
        )
    if any(sign in text for sign in ("WRONGPASS", "invalid username-password pair")):
        return (
            f"Redis at {where} refused the user or password of REDIS_URL "
            "(redis://USER:PASSWORD@HOST:PORT/DB): wrong password, or an unknown or disabled user"
        )
    return f"Redis at {where} refused the connection: {text}"


class StoppedBeforeStart(Exception):
    """`stop` was set while the first PING was still unanswered."""


@asynccontextmanager
async def redis_connect(
    settings: Settings, deadline_s: float | None = None, stop: asyncio.Event | None = None
) -> AsyncIterator[Redis]:
    """Yield a client owning the process's pool, after a successful PING; close the pool on exit.

    Gives up after `deadline_s`, by default REDIS_CONNECT_TIMEOUT_MS; raises StoppedBeforeStart at
    once when `stop` is set first (a signal while Redis does not answer yet).
    """
    if deadline_s is None:
        deadline_s = settings.redis_connect_timeout_ms / 1000
    redis = make_cluster(settings) if settings.redis_cluster else Redis.from_pool(make_pool(settings))
    try:
        reachable = wait_until_reachable(redis, where(settings), deadline_s)
        if stop is None:
            await reachable
        else:
            await _unless_stopped(reachable, stop)
        log.debug("connected to %s", where(settings))
        yield redis
    finally:
        await redis.aclose()


async def _unless_stopped(step: Awaitable[None], stop: asyncio.Event) -> None:
    """Await `step`; StoppedBeforeStart (with `step` cancelled) if `stop` is set first."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise StoppedBeforeStart
    task.result()


def make_cluster(settings: Settings) -> Redis:
    """redis-py's cluster client, typed as the Redis whose command methods it offers.

    It starts from any node of REDIS_URL and REDIS_CLUSTER_NODES that answers. A lost node is
    retried with backoff while the cluster fails over (`cluster-node-timeout`, then a replica's
    election), refreshing the slot map each time.
    """
    cluster = RedisCluster.from_url(
        settings.redis_url,
        startup_nodes=[ClusterNode(*host_and_port(node)) for node in settings.redis_cluster_nodes],
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=8),
        **connection_options(settings),
    )
    # redis-py takes no connection class for a cluster: set it where its nodes are made from.
    kind = cluster.connection_kwargs["connection_class"]
    ours = _FAST.get(kind, kind)
    cluster.connection_kwargs["connection_class"] = ours
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_class = ours
    return cast(Redis, cluster)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)  # type: ignore[unreachable, unused-ignore]


async def before_multi(redis: Redis) -> None:
    """On a cluster, make here the slot-map refresh a lost connection left due, before a MULTI.

    redis-py 8.1 queues each command of a cluster MULTI from a thread with an event loop of its
    own, and that thread makes a refresh it finds due, on this loop's lock and connections:
    RuntimeError, "attached to a different loop". Refreshed first, none is due while the
    commands are queued (queuing never awaits).
    """
    if is_cluster(redis):
        await cast(RedisCluster, redis).initialize()


def raw_xreadgroup(redis: Redis) -> None:
    """Let `XREADGROUP ..., raw_reply=True` return Redis's reply unparsed, for the consumer to parse
    (core/replies.py): redis-py's parser drops the idle time and delivery count that XREADGROUP ...
    CLAIM (Redis 8.4+) adds to each entry, and takes twice as long. Every other XREADGROUP is
    parsed as before."""
    parse = redis.response_callbacks["XREADGROUP"]
    if getattr(parse, "keeps_raw", False):
        return

    def parse_unless_raw(response: Any, **options: Any) -> Any:
        return response if options.get("raw_reply") else parse(response, **options)

    parse_unless_raw.keeps_raw = True  # type: ignore[attr-defined]
    redis.set_response_callback("XREADGROUP", parse_unless_raw)
