"""A consumer's name and sign of life: one key per partition holding this process's token.

Another consumer takes over a pending entry only when its owner's lease has lapsed: the process
is gone (killed, stopped, cut off), not merely slow. A separate process keeps the lease alive,
so nothing the consumer's own process does can stop it: not a handler that blocks the event
loop, nor one that holds the GIL in a C call for seconds. That process ends with its parent
(its stdin closes), lets the lease lapse while the parent is stopped (SIGSTOP), and on Redis
8.4+ also keeps every entry the consumer holds from looking idle (the library's `touch`).

The lease is exclusive: a process starting with a name a live process holds stops with exit
code 2, and a process whose name another one took over (after its own lease lapsed) stops too.
The server's clock judges the TTL: clock skew does not matter.

`python -m core.lease` is that keeper process; the consumer starts it, with its settings on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import select
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.cluster import ClusterNode
from redis.sentinel import Sentinel

import redis
from config import ConfigError, Settings, configure_logging, host_and_port
from core import library, sentinel
from core.recovery import pause

log = logging.getLogger("lease")

MIN_TTL_MS = 100
ROOT = Path(__file__).resolve().parent.parent
KEEPER_START_S = 10.0  # how long a consumer waits for its keeper before it consumes anyway
RESTARTS_WARNED = 1  # the keeper's deaths logged at WARNING; later ones at DEBUG until it lives again


class NameInUse(ConfigError):
    """Another live process uses this consumer's name: exit code 2."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One partition's lease key, and what the keeper touches there (Redis 8.4+: stream, group, consumer)."""

    key: str
    touch: tuple[str, str, str] | None = None


class Lease:
    """This process's hold on `name` in `group` over `parts`, inside `async with`.

    `take()` takes every part's key (waiting while a holder's liveness is unknown; NameInUse for
    a live holder); entering starts the keeper; `lost` is set if another process takes the name
    over. Leaving stops the keeper, which deletes the keys.
    """

    def __init__(self, redis: Redis, settings: Settings, parts: Sequence[Part], stop: asyncio.Event) -> None:
        self.redis = redis
        self.settings = settings
        self.parts = list(parts)
        self.stop = stop
        self.ttl_ms = max(settings.claim_idle_ms, MIN_TTL_MS)
        self.token = secrets.token_hex(8)
        self.lost = asyncio.Event()
        self.kept = asyncio.Event()  # a keeper said it keeps the lease
        # Told how many pending entries the keeper found deleted (Redis 8.4+: its touch drops them).
        self.dropped: Callable[[int], None] | None = None
        self.keeper: asyncio.subprocess.Process | None = None
        self.supervisor: asyncio.Task[None] | None = None
        self.closing = False

    async def take(self) -> None:
        """Take every part's key; returns early, with nothing taken, if `stop` is set meanwhile."""
        for part in self.parts:
            await self._take(part.key)

    async def __aenter__(self) -> Lease:
        """Start the keeper, and return once it keeps the lease (or after KEEPER_START_S, with this
        process keeping it meanwhile): nothing is consumed before a handler could block it."""
        await self._start_keeper()
        self.supervisor = asyncio.create_task(self._supervise())
        waits = [asyncio.ensure_future(event.wait()) for event in (self.kept, self.stop)]
        try:
            await asyncio.wait(waits, timeout=KEEPER_START_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.closing = True
        if self.supervisor is not None:
            self.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.supervisor
        released = await self._stop_keeper()
        if not released:  # the keeper could not: the keys go now, or lapse by themselves
            with contextlib.suppress(redis.RedisError, OSError):
                for part in self.parts:
                    await self._call(part.key, "release")

    async def _call(self, key: str, what: str, expected: str = "") -> Any:
        return await self.redis.fcall(
            library.function("lease"), 1, key, what, self.token, self.ttl_ms, expected
        )

    async def _take(self, key: str) -> None:
        """Take `key`; wait while a holder's liveness is unknown, NameInUse once it shows it is alive.

        A live holder refreshes its lease every third of the TTL, so watching it for that long
        (and a little more) tells a live process from one that died holding it.
        """
        loop = asyncio.get_running_loop()
        watch_until = loop.time() + self.ttl_ms / 3000 + 1.0
        expected, seen, said = "", None, False
        for _ in range(int(self.ttl_ms / 100) + 100):  # bounded: past watch_until the holder is taken over
            reply = await self._call(key, "take", expected)
            if reply == 1:
                if said:
                    log.info("the lease of %s was left by a process that died; taken over", key)
                return
            holder, ttl_left = reply[0], int(reply[1])
            now = loop.time()
            if seen is not None and (holder != seen[0] or ttl_left > seen[1] - (now - seen[2]) * 1000 + 250):
                raise NameInUse(
                    f"CONSUMER_NAME {self.settings.consumer_name!r} is in use by another running process "
                    f"(its lease {key} is being refreshed): give each process its own name, or leave "
                    "CONSUMER_NAME empty for one made of the host name and pid"
                )
            seen = seen if seen is not None and holder == seen[0] else (holder, ttl_left, now)
            if now >= watch_until:
                expected = holder  # not refreshed for a third of its TTL: its process is gone
                continue
            if not said:
                said = True
                log.warning(
                    "the lease %s is held by another process: watching it for %.0f s to tell whether that "
                    "process is alive (it stops this one) or died holding it (its lease is taken over)",
                    key,
                    watch_until - now,
                )
            await pause(self.stop, 0.1)
            if self.stop.is_set():
                return  # stopped before it began: nothing to take
        raise RuntimeError(f"the lease {key} could be neither taken nor judged")  # pragma: no cover

    async def _start_keeper(self) -> None:
        self.keeper = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "core.lease",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.keeper.stdin is not None
        config = {
            "settings": dataclasses.asdict(self.settings),
            "token": self.token,
            "ttl_ms": self.ttl_ms,
            "parts": [dataclasses.asdict(part) for part in self.parts],
        }
        # On a pipe, never on the command line: the settings hold the Redis password.
        self.keeper.stdin.write(json.dumps(config).encode() + b"\n")
        await self.keeper.stdin.drain()

    async def _supervise(self) -> None:
        """Read what the keeper says; start another one whenever it dies. Until a keeper says it is
        alive (at start, after a death) this process refreshes the lease itself: a keeper takes a
        few hundred milliseconds to start, longer than a short CLAIM_IDLE_MS."""
        deaths, alive = 0, False
        while True:
            assert self.keeper is not None
            assert self.keeper.stdout is not None
            try:
                async with asyncio.timeout(None if alive else self.ttl_ms / 3000):
                    line = await self.keeper.stdout.readline()
            except TimeoutError:
                await self._refresh_here()
                continue
            if line.startswith(b"lost "):
                self._lost(line[5:].decode(errors="replace").strip())
            elif line.startswith(b"dropped ") and self.dropped is not None:
                self.dropped(int(line.split()[1]))
            elif line.startswith(b"alive"):
                deaths, alive = 0, True
                self.kept.set()
            elif not line:  # the keeper ended
                alive = False
                code = await self.keeper.wait()
                deaths += 1
                level = logging.WARNING if deaths <= RESTARTS_WARNED else logging.DEBUG
                log.log(level, "the lease keeper process ended (exit code %s); starting another", code)
                await asyncio.sleep(min(0.1 * 2**deaths, self.ttl_ms / 3000))
                await self._start_keeper()

    async def _refresh_here(self) -> None:
        """Refresh every part from this process (while no keeper is alive), within a third of the
        TTL (a cluster client may retry for long); Redis failures are the consumer's to report."""
        with contextlib.suppress(TimeoutError, redis.RedisError, redis.RedisClusterException, OSError):
            async with asyncio.timeout(self.ttl_ms / 3000):
                for part in self.parts:
                    if await self._call(part.key, "refresh") == 0:
                        self._lost(part.key)
                    elif part.touch is not None:
                        _, dropped = await self.redis.fcall(library.function("touch"), 1, *part.touch)
                        if dropped and self.dropped is not None:
                            self.dropped(int(dropped))

    def _lost(self, key: str) -> None:
        if self.lost.is_set():
            return
        log.error(
            "another process now uses CONSUMER_NAME %r (it took over %s after this one's lease "
            "lapsed): stopping; nothing more is committed under that name by this process",
            self.settings.consumer_name,
            key,
        )
        self.lost.set()
        self.stop.set()

    async def _stop_keeper(self) -> bool:
        """Ask the keeper to release the keys and end; True once it did, within a bound."""
        keeper = self.keeper
        if keeper is None or keeper.returncode is not None:
            return False
        try:
            assert keeper.stdin is not None
            keeper.stdin.write(b"stop\n")
            await keeper.stdin.drain()
            keeper.stdin.close()
            async with asyncio.timeout(self.ttl_ms / 3000 + 3):
                return await keeper.wait() == 0
        except (TimeoutError, ConnectionError, OSError):
            with contextlib.suppress(ProcessLookupError):
                keeper.kill()
            await keeper.wait()
            return False


# --- the keeper process ----------------------------------------------------------------


def _parent_stopped(pid: int) -> bool:
    """True while process `pid` is stopped (SIGSTOP, or traced): its lease must lapse meanwhile."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: a stopped parent then keeps its lease
        return False
    return stat.rsplit(")", 1)[-1].split()[0] in ("T", "t")


def _settings_of(raw: dict[str, Any]) -> Settings:
    """The consumer's settings as it sent them (in JSON its tuples became lists)."""
    values: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in raw.items()}
    return Settings(**values)


def _client(settings: Settings, ttl_ms: int) -> redis.Redis | redis.RedisCluster:
    """A client of the Redis the consumer uses, that fails fast (the keeper's own loop retries, every
    third of the TTL): one Redis, a cluster from any of its seed nodes, or the master the sentinels
    name (asked again whenever a new connection is made)."""
    options: dict[str, Any] = {
        "socket_timeout": ttl_ms / 3000 + 1,
        "socket_connect_timeout": 2,
        "client_name": f"{settings.consumer_name}-lease",
    }
    if settings.redis_sentinels:
        sentinels, to_sentinels, to_master = sentinel.options(settings)
        manager = Sentinel(sentinels, sentinel_kwargs=to_sentinels)
        return manager.master_for(  # type: ignore[no-any-return]
            settings.redis_sentinel_master, connection_pool_class=sentinel.SyncPool, **to_master, **options
        )
    if settings.redis_cluster:
        seeds = [ClusterNode(*host_and_port(node)) for node in settings.redis_cluster_nodes]  # type: ignore[no-untyped-call]
        return redis.RedisCluster.from_url(
            settings.redis_url, startup_nodes=seeds, cluster_error_retry_attempts=1, **options
        )
    return redis.Redis.from_url(settings.redis_url, **options)


class Keeper:
    """The keeper process's state: its client, the parts it keeps, and what it lost."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.settings = _settings_of(config["settings"])
        self.token, self.ttl_ms = config["token"], int(config["ttl_ms"])
        self.parts = [Part(p["key"], tuple(p["touch"]) if p["touch"] else None) for p in config["parts"]]
        self.lease, self.touch = library.function("lease"), library.function("touch")
        self.client: redis.Redis | redis.RedisCluster | None = None  # made at the first refresh
        self.failing = False
        self.lost: set[str] = set()

    def refresh(self) -> None:
        """Refresh every part still ours; say which another process took ("lost KEY") and that all is well."""
        try:
            if self.client is None:
                self.client = _client(self.settings, self.ttl_ms)
            for part in self.parts:
                if part.key in self.lost:
                    continue
                if self.client.fcall(self.lease, 1, part.key, "refresh", self.token, self.ttl_ms, "") == 0:
                    self.lost.add(part.key)
                    print("lost", part.key, flush=True)
                elif part.touch is not None:
                    stream, group, consumer = part.touch
                    _, dropped = self.client.fcall(self.touch, 1, stream, group, consumer)
                    if dropped:
                        print("dropped", dropped, flush=True)
            print("alive", flush=True)
            self.failing = False
        # Anything at all: this loop is all that keeps the lease, so it must outlive every failure
        # (a cluster node restarting raises more than RedisError); the consumer reports outages.
        except Exception as error:
            if not self.failing:
                log.debug("lease refresh failed (%s); retrying", type(error).__name__)
            self.failing = True
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            self.client = None  # a new one at the next refresh: a cluster's nodes may have moved

    def release(self) -> int:
        """Delete the keys still ours: 0, or 1 when Redis could not be told (they lapse by themselves)."""
        try:
            if self.client is None:
                self.client = _client(self.settings, self.ttl_ms)
            for part in self.parts:
                if part.key not in self.lost:
                    self.client.fcall(self.lease, 1, part.key, "release", self.token, self.ttl_ms, "")
        except Exception:
            return 1
        finally:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
        return 0


def keep(config: dict[str, Any], commands: Any) -> int:
    """Refresh the leases every third of their TTL until `commands` (stdin) says stop or closes, or
    the parent is gone; let them lapse while the parent is stopped."""
    keeper = Keeper(config)
    parent = os.getppid()
    while os.getppid() == parent:
        if not _parent_stopped(parent):
            keeper.refresh()
        # Failing, it tries again soon: a lease that lapsed in an outage is taken back at once.
        wait = min(keeper.ttl_ms / 3000, 0.25) if keeper.failing else keeper.ttl_ms / 3000
        ready, _, _ = select.select([commands], [], [], wait)
        if ready:
            line = commands.readline()
            if not line or line.strip() == "stop":
                break
    return keeper.release()


def main() -> None:
    # Ctrl-C in a terminal, or a signal to the process group, reaches the keeper too: the
    # consumer then drains its batch, and the lease must outlive that. The keeper ends when
    # the consumer says so, or when it is gone (stdin closes).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    config = json.loads(line)
    configure_logging(config["settings"]["log_level"])
    sys.exit(keep(config, sys.stdin))


if __name__ == "__main__":
    main()
