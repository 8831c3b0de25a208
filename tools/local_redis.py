"""Throwaway redis-servers on free loopback ports, for the demo, the benchmark, the soak and the tests:
one server, a Redis Cluster, or a master with replicas under Redis Sentinel."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOW_TO_GET_REDIS = (
    "no Redis found: run `docker compose up -d`, install redis-server "
    "(`apt-get install redis-server`, `brew install redis`), or set REDIS_URL"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalRedis:
    """A redis-server child process; `kill()` then `start()` keeps its port and data directory."""

    port: int
    directory: Path
    args: list[str]
    tls: bool = False  # started with --tls-port: ready once it accepts connections
    config_file: Path | None = None  # read first (a sentinel needs one, which it rewrites)
    process: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        binary = server_binary()
        if binary is None:
            raise FileNotFoundError(HOW_TO_GET_REDIS)
        config = [] if self.config_file is None else [str(self.config_file)]
        command = [binary, *config, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", "", "--logfile", "redis.log", *self.args]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if _answers_ping(self.port, self.tls):
                return
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop the server and remove its data directory, even when stopping it is interrupted."""
        try:
            self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()


def server_binary() -> str | None:
    """The redis-server to start: REDIS_SERVER (a path, e.g. a Redis 8.6 build) or the one on PATH."""
    return shutil.which(os.environ.get("REDIS_SERVER") or "redis-server")


def start_local_redis(*args: str) -> LocalRedis:
    """Start a redis-server in a new temporary directory; extra `args` go on its command line."""
    tmp = tempfile.TemporaryDirectory(prefix="orders-redis-")
    server = LocalRedis(port=free_port(), directory=Path(tmp.name), args=list(args), _tmp=tmp)
    try:
        server.start()
    except Exception:
        tmp.cleanup()
        raise
    return server


def _answers_ping(port: int, tls: bool) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if tls:
                return True
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def free_cluster_port() -> int:
    """A free port below 55535 whose Cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port < 55535 and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class LocalCluster:
    """A Redis Cluster of redis-server children on loopback: `masters` masters, each with `replicas`."""

    nodes: list[LocalRedis]
    masters: int
    replicas: int

    @property
    def url(self) -> str:
        """Any one node: redis-py's cluster client finds the others."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def node(self, port: int) -> LocalRedis:
        return next(node for node in self.nodes if node.port == port)

    def table(self) -> list[list[str]]:
        """CLUSTER NODES, as a running node sees it: one row of fields per node."""
        for node in self.nodes:
            if node.process is None:
                continue
            reply = subprocess.run(
                ["redis-cli", "-p", str(node.port), "cluster", "nodes"],
                capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip
            if reply.returncode == 0 and reply.stdout.strip():
                return [line.split() for line in reply.stdout.splitlines()]
        raise RuntimeError("no node of the local cluster answers")

    def master_ports(self) -> list[int]:
        """The nodes serving slots now, masters not marked failed."""
        rows = self.table()
        return [
            int(row[1].split(":")[1].split("@")[0])
            for row in rows
            if "master" in row[2] and "fail" not in row[2]
        ]

    def replica_of(self, master: int) -> int:
        """The port of a replica of the master on port `master`."""
        rows = self.table()
        master_id = next(row[0] for row in rows if row[1].startswith(f"127.0.0.1:{master}@"))
        return next(int(row[1].split(":")[1].split("@")[0]) for row in rows if row[3] == master_id)

    def failed_over(self, lost: int) -> bool:
        """The other nodes marked `lost` failed and a replica took over its slots."""
        row = next(row for row in self.table() if row[1].startswith(f"127.0.0.1:{lost}@"))
        return "fail" in row[2] and len(row) == 8  # failed, and serving no slot any more

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def start_local_cluster(
    masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000, *args: str
) -> LocalCluster:
    """Start a local Redis Cluster with `redis-server --cluster-enabled yes` and `redis-cli --cluster create`.

    Returns once every node says `cluster_state:ok`. Needs redis-cli (Debian: redis-tools).
    """
    cli = shutil.which("redis-cli")
    if cli is None:
        raise FileNotFoundError("redis-cli is not installed (apt-get install redis-tools)")
    nodes: list[LocalRedis] = []
    cluster = LocalCluster(nodes=nodes, masters=masters, replicas=replicas)
    try:
        for _ in range(masters * (1 + replicas)):
            tmp = tempfile.TemporaryDirectory(prefix="orders-cluster-")
            node = LocalRedis(
                port=free_cluster_port(),
                directory=Path(tmp.name),
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--appendonly",
                    "yes",
                    *args,
                ],
                _tmp=tmp,
            )
            nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(cli, node.port) for node in nodes) or not _replicas_online(cli, cluster):
            if time.monotonic() > deadline:
                raise TimeoutError("the local Redis Cluster did not reach cluster_state:ok within 30s")
            time.sleep(0.05)
    except BaseException:
        cluster.close()
        raise
    return cluster


def _replicas_online(cli: str, cluster: LocalCluster) -> bool:
    """Every master has its replicas attached and synced (WAIT counts only those)."""
    online = 0
    for node in cluster.nodes:
        reply = subprocess.run(
            [cli, "-p", str(node.port), "info", "replication"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        online += reply.stdout.count("state=online")
    return online == cluster.masters * cluster.replicas


def _cluster_ok(cli: str, port: int) -> bool:
    reply = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=10, check=False
    )
    return "cluster_state:ok" in reply.stdout


@dataclass
class LocalSentinel:
    """A master with replicas and sentinels watching it under `name`, on loopback."""

    servers: list[LocalRedis]  # the first master first, then its replicas
    sentinels: list[LocalRedis]
    name: str
    password: str = field(default="", repr=False)  # the sentinels' requirepass, if any

    @property
    def addresses(self) -> str:
        """The sentinels, as REDIS_SENTINELS takes them."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def server(self, port: int) -> LocalRedis:
        return next(server for server in self.servers if server.port == port)

    def ask(self, *command: str) -> list[str]:
        """A command's reply lines from the first sentinel that answers."""
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            reply = _cli(sentinel.port, *self._auth, *command)
            if reply is not None:
                return reply
        raise RuntimeError("no local sentinel answers")

    def master_port(self) -> int:
        """The master's port, as a sentinel names it to clients now."""
        return int(_fields(self.ask("sentinel", "master", self.name))["port"])

    def replica_ports(self) -> list[int]:
        master = self.master_port()
        return [server.port for server in self.servers if server.port != master]

    def failed_over(self, lost: int) -> bool:
        """Every sentinel names the same master other than `lost`, its failover over, and that
        server says it is a master."""
        named: set[int] = set()
        for sentinel in self.sentinels:
            state = _fields(_cli(sentinel.port, *self._auth, "sentinel", "master", self.name) or [])
            if state.get("flags") != "master":  # down, or a failover still in progress
                return False
            named.add(int(state["port"]))
        if len(named) != 1 or lost in named:
            return False
        return (_cli(named.pop(), "role") or [""])[0] == "master"

    @property
    def _auth(self) -> list[str]:
        return ["-a", self.password, "--no-auth-warning"] if self.password else []

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.close()


def start_local_sentinel(
    replicas: int = 2,
    sentinels: int = 3,
    down_after_ms: int = 1500,
    *args: str,
    name: str = "mymaster",
    password: str = "",
) -> LocalSentinel:
    """Start a master with `replicas` replicas (`args` on each one's command line) and `sentinels`
    sentinels (`redis-server sentinel.conf --sentinel`, quorum a majority) that fail it over once
    it does not answer for `down_after_ms`; `password` makes the sentinels require one.

    Sentinels ping every second: at 1000 ms or less they take a new master for down when its first
    ping, a second after the switch, is answered a little late, and fail over a second time.

    Returns once every sentinel knows every replica and every other sentinel: a failover can then
    be agreed on and can promote any replica. Needs redis-cli (Debian: redis-tools).
    """
    if shutil.which("redis-cli") is None:
        raise FileNotFoundError("redis-cli is not installed (apt-get install redis-tools)")
    local = LocalSentinel(servers=[], sentinels=[], name=name, password=password)
    try:
        # Replicas sync at once, not after the 5 s a master waits by default for more to sync with them.
        master = _temporary(["--repl-diskless-sync-delay", "0", *args])
        local.servers.append(master)
        master.start()
        for _ in range(replicas):
            replica = _temporary(["--replicaof", "127.0.0.1", str(master.port), *args])
            local.servers.append(replica)
            replica.start()
        _wait(lambda: _online(master.port) == replicas, "the replicas to sync")
        for _ in range(sentinels):
            sentinel = _temporary(["--sentinel"])
            sentinel.config_file = sentinel.directory / "sentinel.conf"
            lines = [
                f"sentinel monitor {name} 127.0.0.1 {master.port} {sentinels // 2 + 1}",
                f"sentinel down-after-milliseconds {name} {down_after_ms}",
                # A failover that could not finish (a vote split) is tried again after twice this.
                f"sentinel failover-timeout {name} {max(3 * down_after_ms, 3000)}",
            ]
            if password:
                lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
            sentinel.config_file.write_text("\n".join(lines) + "\n")
            local.sentinels.append(sentinel)
            sentinel.start()
        _wait(lambda: _sentinels_ready(local, replicas), "every sentinel to know the replicas and the others")
    except BaseException:
        local.close()
        raise
    return local


def _temporary(args: list[str]) -> LocalRedis:
    tmp = tempfile.TemporaryDirectory(prefix="orders-sentinel-")
    return LocalRedis(port=free_port(), directory=Path(tmp.name), args=args, _tmp=tmp)


def _cli(port: int, *command: str) -> list[str] | None:
    """redis-cli's reply lines, or None when the server does not answer."""
    try:
        reply = subprocess.run(
            ["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    if reply.returncode != 0 or reply.stdout.startswith(("Could not connect", "ERR", "NOAUTH")):
        return None
    return reply.stdout.splitlines()


def _online(port: int) -> int:
    return sum(line.count("state=online") for line in _cli(port, "info", "replication") or [])


def _fields(reply: list[str]) -> dict[str, str]:
    """A sentinel's description of an instance, field by field (redis-cli prints each name and
    each value on a line of its own)."""
    return dict(zip(reply[::2], reply[1::2], strict=False))


def _sentinels_ready(local: LocalSentinel, replicas: int) -> bool:
    for sentinel in local.sentinels:
        known = _cli(sentinel.port, *local._auth, "sentinel", "replicas", local.name) or []
        others = _cli(sentinel.port, *local._auth, "sentinel", "sentinels", local.name) or []
        if known.count("ip") != replicas or others.count("ip") != len(local.sentinels) - 1:
            return False
    return True


def _wait(ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)
