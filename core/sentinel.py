"""Redis Sentinel: connection pools that follow the master the sentinels name, and what they say.

redis-py's Sentinel pools ask the sentinels for the master's address on each new connection, so
the connections lost with a dead master are made again to the one they promote. Ours also move
a connection that is still open to an old master: after a failover of a master that is still up
(SENTINEL FAILOVER, or one a slow master set off) the old master keeps taking writes until the
sentinels make it a replica, about ten seconds later, and then drops them, while redis-py keeps
using a connection that was in use when the master changed (a blocking read) all that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis.sentinel
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from config import Settings, host_and_port

# How often at most a process asks the sentinels which master is in use.
MASTER_CHECK_S = 1.0
# A sentinel that does not answer within this long is skipped for the next one.
SENTINEL_TIMEOUT_S = 2.0


def options(settings: Settings) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, Any]]:
    """The sentinels' addresses, what a connection to a sentinel takes (their own user and
    password; REDIS_URL's TLS options), and what one to the master takes: REDIS_URL's user,
    password, database and TLS options (`ssl`), not its host, which the sentinels give."""
    to_master: dict[str, Any] = dict(parse_url(settings.redis_url))
    tls = to_master.pop("connection_class", None) is SSLConnection
    for name in ("host", "port"):
        to_master.pop(name, None)
    to_sentinels: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "username": settings.redis_sentinel_username or None,
        "password": settings.redis_sentinel_password or None,
    }
    if tls:
        to_sentinels.update(ssl=True, **{k: v for k, v in to_master.items() if k.startswith("ssl_")})
    sentinels = [host_and_port(address) for address in settings.redis_sentinels]
    return sentinels, to_sentinels, {**to_master, "ssl": tls}


class Pool(SentinelConnectionPool):
    """redis-py's asyncio Sentinel pool, following the master (see above); closing it closes the
    connections to the sentinels as well."""

    checked_at = 0.0

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        now = time.monotonic()
        if now - self.checked_at >= MASTER_CHECK_S:
            self.checked_at = now
            with contextlib.suppress(RedisError, OSError):  # no master now: the connection says so
                await self.get_master_address()  # type: ignore[no-untyped-call]
        connection = await super().get_connection(command_name, *keys, **options)  # type: ignore[no-untyped-call]
        if self.master_address is not None and (connection.host, connection.port) != self.master_address:
            try:
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


class SyncPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's synchronous Sentinel pool, following the master on every connection taken (the
    lease keeper's: it takes one every third of the lease's TTL)."""

    def get_connection(self, *args: Any, **options: Any) -> Any:
        with contextlib.suppress(RedisError, OSError):  # no master now: the connection says so
            self.get_master_address()  # type: ignore[no-untyped-call]
        connection: Any = super().get_connection(*args, **options)
        if self.master_address is not None and (connection.host, connection.port) != self.master_address:
            try:
                connection.disconnect()
                connection.connect()
            except BaseException:
                self.release(connection)
                raise
        return connection


async def master_address(redis: Redis) -> str | None:
    """Through Sentinel, the master in use as host:port, as the sentinels name it now; else None."""
    pool = getattr(redis, "connection_pool", None)  # a cluster client has none
    if not isinstance(pool, SentinelConnectionPool):
        return None
    host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
    return f"{host}:{port}"


async def what_each_says(pool: SentinelConnectionPool) -> str:
    """What each sentinel says of the master, in a few words: the error asking it, or the address
    it names and whether that master is down (redis-py's MasterNotFoundError spells out each
    sentinel's client instead)."""
    name = pool.service_name
    said = []
    for sentinel in pool.sentinel_manager.sentinels:
        where = sentinel.connection_pool.connection_kwargs
        try:
            async with asyncio.timeout(SENTINEL_TIMEOUT_S):
                state = (await sentinel.sentinel_masters()).get(name)
        except (RedisError, OSError, TimeoutError) as error:
            says = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        else:
            if state is None:
                says = f"knows no master {name!r}"
            else:
                down = " (down)" if state["is_sdown"] or state["is_odown"] else ""
                says = f"names {state['ip']}:{state['port']}{down}"
        said.append(f"sentinel {where['host']}:{where['port']} {says}")
    return "; ".join(said)


def refused(error: Exception) -> bool:
    """The sentinels refused their user or password (MasterNotFoundError carries each one's reply)."""
    signs = ("NOAUTH", "Authentication required", "WRONGPASS", "invalid username-password pair")
    return any(sign in str(error) for sign in signs)
