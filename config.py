"""Settings from the environment and `.env`, and how every script starts and exits."""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import SplitResult, parse_qs, urlsplit

from dotenv import dotenv_values
from redis.exceptions import RedisError

DEFAULTS: dict[str, str] = {
    "REDIS_URL": "redis://localhost:6379/0",
    "REDIS_MAX_CONNECTIONS": "5",
    "REDIS_CONNECT_TIMEOUT_MS": "10000",  # a script gives up on an unreachable Redis after this long
    "REDIS_CLUSTER": "false",  # true: REDIS_URL names any node of a Redis Cluster
    # More nodes to start from, host:port,host:port: the cluster stays reachable when REDIS_URL's is down.
    "REDIS_CLUSTER_NODES": "",
    # Redis Sentinel: the sentinels (host:port,host:port) give the master's address; REDIS_URL then
    # gives only the master's user, password, database and TLS options, not its host.
    "REDIS_SENTINELS": "",
    "REDIS_SENTINEL_MASTER": "mymaster",  # the name the sentinels monitor the master under
    "REDIS_SENTINEL_USERNAME": "",  # the sentinels' own user and password, if they require one
    "REDIS_SENTINEL_PASSWORD": "",
    "STREAM_PARTITIONS": "1",  # streams the orders are spread over, by order_id (keys.partition_of)
    "PUBLISH_MIN_REPLICAS": "0",  # confirm a chunk only once this many replicas have it (WAIT)
    "PUBLISH_WAIT_MS": "2000",  # how long the producer's WAIT waits for them
    "STREAM_KEY": "orders",
    "FULFILLMENT_GROUP": "fulfillment_group",
    "EMAIL_GROUP": "email_group",
    "CONSUMER_GROUPS": "",  # every group that must get every order; empty: FULFILLMENT_GROUP,EMAIL_GROUP
    "CONSUMER_NAME": "",  # empty: host name and pid, unique per process
    "PRODUCER_ID": "",  # empty: host name; Redis remembers each producer id's last order ids
    "BATCH_SIZE": "100",
    "BLOCK_MS": "2000",
    "SOCKET_TIMEOUT_MS": "5000",
    "CLAIM_IDLE_MS": "60000",
    "MAX_DELIVERIES": "5",
    "RETRY_DELAY_MS": "1000",  # the first retry's wait
    "RETRY_BACKOFF": "10",  # each retry waits this many times longer than the one before (1: fixed)
    "RETRY_MAX_DELAY_MS": "600000",  # the longest wait before a retry
    "MAX_PAYLOAD_BYTES": "65536",
    "DEAD_LETTER_STREAM": "",  # empty: STREAM_KEY:dead-letter; partitioned: one per partition
    "LOG_LEVEL": "INFO",
    "MAINTENANCE_INTERVAL_MS": "60000",  # 0: consumers never trim or remove stale consumers
    "RETENTION_KEEP_MS": "0",  # keep acked entries this long (for replay); 0: trim them
    "RETENTION_KEEP_ENTRIES": "0",  # keep at least this many newest entries
    "STALE_CONSUMER_MS": "86400000",  # 0: never remove idle consumers
    "METRICS_PORT": "0",  # 0: no Prometheus endpoint
    "METRICS_HOST": "127.0.0.1",  # the address metrics listen on; 0.0.0.0 for every interface
    "HEALTH_PORT": "0",  # 0: no /livez and /readyz for probes
    "HEALTH_HOST": "127.0.0.1",  # the address probes listen on; 0.0.0.0 in a pod (the kubelet calls its IP)
    "HEALTH_STUCK_MS": "300000",  # /livez fails once the loop has not turned this long while Redis answers
    "DEDUPE_WINDOW_MS": "3600000",  # run a group's handler once per order_id within this; 0: off
    "DASHBOARD_TOKEN": "",  # empty: the dashboard's writes (redrive, purge) are off
    "MESSAGE_SCHEMA": "orders:ORDERS",  # the message type the operator's tools read, as module:name
}

# Settings renamed, by their old names: an old name is still read where the new one is not set.
RENAMED = {"GROUPS": "CONSUMER_GROUPS"}
RENAMED_WHY = {"GROUPS": "bash sets GROUPS itself, so `export GROUPS=...` never reached a script"}

# Query options redis-py understands in a URL; TLS files go here (rediss://host/0?ssl_ca_certs=/ca.pem).
URL_OPTIONS = {
    "db", "protocol", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version", "ssl_password",
}  # fmt: skip

# Probes of a downstream outage come at most this far apart (or RETRY_MAX_DELAY_MS, if shorter),
# up to a quarter later (core/schedule.py): the longest a healthy consumer's loop waits between turns.
PROBE_MAX_MS = 30_000
# ssl_min_version as redis-py reads it: the number of an ssl.TLSVersion (771 is TLS 1.2).
TLS_VERSIONS = tuple(
    str(int(v)) for v in ssl.TLSVersion if ssl.TLSVersion.TLSv1 <= v <= ssl.TLSVersion.TLSv1_3
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CliError(Exception):
    """An error that ends a script with one line on stderr and `exit_code`."""

    exit_code = 1


class ConfigError(CliError):
    """A bad setting or bad command-line input: exit code 2."""

    exit_code = 2


# A query option whose name says password (ssl_password: the TLS key's passphrase), and its value.
_SECRET_OPTION = re.compile(r"([?&][^=&?]*password[^=&?]*=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return `url` with every secret it can carry replaced by `***`: the password, and the value of
    any option named like a password (`ssl_password=`, the TLS key's passphrase). Safe to show.

    Works on the text alone, so it never fails, and masks even a password holding an unescaped
    `/`, `?` or `@`: everything from the first `:` to the last `@` goes (with an `@` in an option's
    value, more than the password).
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    colon, at = rest.find(":"), rest.rfind("@")
    if -1 < colon < at:
        rest = f"{rest[:colon]}:***{rest[at:]}"
    return scheme + separator + _SECRET_OPTION.sub(r"\1***", rest)


def check_url(url: str) -> None:
    """Raise ConfigError naming what is wrong with REDIS_URL, in words that never repeat a secret.

    What redis-py would refuse with a traceback, or silently read another way (`/abc` as
    database 0), stops here, at start.
    """
    problem = _address_problem(url)
    if problem is None:
        problem = _options_problem(urlsplit(url))
    if problem is not None:
        raise ConfigError(f"REDIS_URL {problem}")


def _address_problem(url: str) -> str | None:  # noqa: PLR0911 - one return per problem, in reading order
    """What is wrong with the URL's scheme, host, port or path, if anything."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        return f"must start with redis://, rediss:// or unix://, got {scheme or 'no'} scheme"
    encode = "percent-encode a password's special characters (@ : / ? # as %40 %3A %2F %3F %23)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        # Named, never quoted: with an unescaped / or ? in a password, the "port" is part of it.
        if "IPv6" in str(error):
            return "has an unclosed [ (an IPv6 address goes in brackets: redis://[::1]:6379/0)"
        return f"has a port that is not a number from 1 to 65535; {encode}"
    if port == 0:
        return "has a port that is not a number from 1 to 65535: 0"
    if "#" in url:
        return f"must not contain #; {encode}"
    if scheme == "unix":
        return None if parts.path.strip("/") else "must name the socket's path: unix:///path/to/redis.sock"
    if not re.fullmatch(r"(/\d+)?/?", parts.path):
        return f"must end in a database number, like redis://HOST:PORT/0; {encode}"
    return None


def _options_problem(parts: SplitResult) -> str | None:
    """What is wrong with the URL's query options, if anything."""
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(options) - URL_OPTIONS
    if unknown:
        return f"has unknown options {sorted(unknown)}; known: {sorted(URL_OPTIONS)}"
    twice = sorted(name for name, values in options.items() if len(values) > 1)
    if twice:
        return f"gives options {twice} more than once"
    value = {name: values[0] for name, values in options.items()}
    tls = sorted(name for name in value if name.startswith("ssl_"))
    if tls and parts.scheme != "rediss":
        return f"has TLS options {tls}: they need a rediss:// URL"
    rules: dict[str, tuple[Callable[[str], bool], str]] = {
        "db": (str.isdigit, "a database number, like db=0"),
        "protocol": (("2", "3").__contains__, "2 or 3"),
        "ssl_cert_reqs": (("none", "optional", "required").__contains__, "none, optional or required"),
        "ssl_check_hostname": (("true", "false", "yes", "no", "1", "0").__contains__, "true or false"),
        "ssl_min_version": (
            TLS_VERSIONS.__contains__,
            f"one of {', '.join(TLS_VERSIONS)} (the number of Python's ssl.TLSVersion)",
        ),
    }
    for name, (ok, allowed) in rules.items():
        if name in value and not ok(value[name]):
            return f"option {name} must be {allowed}"
    return None


@dataclass(frozen=True)
class Settings:
    """Everything a script needs to know, read once at start; never holds live objects."""

    redis_url: str = field(repr=False)
    redis_max_connections: int
    redis_connect_timeout_ms: int
    redis_cluster: bool
    redis_cluster_nodes: tuple[str, ...]
    redis_sentinels: tuple[str, ...]
    redis_sentinel_master: str
    redis_sentinel_username: str
    redis_sentinel_password: str = field(repr=False)
    stream_partitions: int
    publish_min_replicas: int
    publish_wait_ms: int
    stream_key: str
    fulfillment_group: str
    email_group: str
    groups: tuple[str, ...]
    consumer_name: str
    producer_id: str
    batch_size: int
    block_ms: int
    socket_timeout_ms: int
    claim_idle_ms: int
    max_deliveries: int
    retry_delay_ms: int
    retry_backoff: int
    retry_max_delay_ms: int
    max_payload_bytes: int
    dead_letter_stream: str
    log_level: str
    maintenance_interval_ms: int
    retention_keep_ms: int
    retention_keep_entries: int
    stale_consumer_ms: int
    metrics_port: int
    metrics_host: str
    health_port: int
    health_host: str
    health_stuck_ms: int
    dedupe_window_ms: int
    dashboard_token: str = field(repr=False)
    message_schema: str = "orders:ORDERS"

    @property
    def partitioned(self) -> bool:
        """Keys per partition (keys.partitions): on a cluster, or over more than one stream."""
        return self.redis_cluster or self.stream_partitions > 1

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with its password hidden, for log lines."""
        return redact_url(self.redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping of variables; raise ConfigError naming a bad one."""
        get = _Reader({**DEFAULTS, **_renamed(env), **{k: v for k, v in env.items() if k in DEFAULTS}})
        url = get.text("REDIS_URL")
        check_url(url)
        fulfillment_group, email_group = get.text("FULFILLMENT_GROUP"), get.text("EMAIL_GROUP")
        stream_key = get.text("STREAM_KEY")
        settings = cls(
            redis_url=url,
            redis_max_connections=get.integer("REDIS_MAX_CONNECTIONS", low=1),
            redis_connect_timeout_ms=get.integer("REDIS_CONNECT_TIMEOUT_MS", low=100),
            redis_cluster=get.flag("REDIS_CLUSTER"),
            redis_cluster_nodes=get.addresses("REDIS_CLUSTER_NODES"),
            redis_sentinels=get.addresses("REDIS_SENTINELS"),
            redis_sentinel_master=get.text("REDIS_SENTINEL_MASTER", empty_ok=True),
            redis_sentinel_username=get.text("REDIS_SENTINEL_USERNAME", empty_ok=True),
            redis_sentinel_password=get.text("REDIS_SENTINEL_PASSWORD", empty_ok=True),
            stream_partitions=get.integer("STREAM_PARTITIONS", low=1, high=1024),
            publish_min_replicas=get.integer("PUBLISH_MIN_REPLICAS", low=0),
            publish_wait_ms=get.integer("PUBLISH_WAIT_MS", low=1),
            stream_key=stream_key,
            fulfillment_group=fulfillment_group,
            email_group=email_group,
            groups=get.names("CONSUMER_GROUPS") or (fulfillment_group, email_group),
            consumer_name=get.text("CONSUMER_NAME", empty_ok=True) or f"{socket.gethostname()}-{os.getpid()}",
            producer_id=get.text("PRODUCER_ID", empty_ok=True) or socket.gethostname(),
            batch_size=get.integer("BATCH_SIZE", low=1, high=10_000),
            block_ms=get.integer("BLOCK_MS", low=1),
            socket_timeout_ms=get.integer("SOCKET_TIMEOUT_MS", low=100),
            claim_idle_ms=get.integer("CLAIM_IDLE_MS", low=1),
            max_deliveries=get.integer("MAX_DELIVERIES", low=1),
            retry_delay_ms=get.integer("RETRY_DELAY_MS", low=0),
            retry_backoff=get.integer("RETRY_BACKOFF", low=1, high=1000),
            retry_max_delay_ms=get.integer("RETRY_MAX_DELAY_MS", low=0),
            max_payload_bytes=get.integer("MAX_PAYLOAD_BYTES", low=64),
            dead_letter_stream=get.text("DEAD_LETTER_STREAM", empty_ok=True) or f"{stream_key}:dead-letter",
            log_level=get.text("LOG_LEVEL").upper(),
            maintenance_interval_ms=get.integer("MAINTENANCE_INTERVAL_MS", low=0),
            retention_keep_ms=get.integer("RETENTION_KEEP_MS", low=0),
            retention_keep_entries=get.integer("RETENTION_KEEP_ENTRIES", low=0),
            stale_consumer_ms=get.integer("STALE_CONSUMER_MS", low=0),
            metrics_port=get.integer("METRICS_PORT", low=0, high=65535),
            metrics_host=get.text("METRICS_HOST"),
            health_port=get.integer("HEALTH_PORT", low=0, high=65535),
            health_host=get.text("HEALTH_HOST"),
            health_stuck_ms=get.integer("HEALTH_STUCK_MS", low=1),
            dedupe_window_ms=get.integer("DEDUPE_WINDOW_MS", low=0),
            dashboard_token=get.text("DASHBOARD_TOKEN", empty_ok=True),
            message_schema=get.text("MESSAGE_SCHEMA"),
        )
        if any(char.isspace() for char in settings.consumer_name):
            raise ConfigError("CONSUMER_NAME must not contain spaces")
        if any(char.isspace() or char in "{}" for char in settings.producer_id):
            raise ConfigError("PRODUCER_ID must not contain spaces or braces")
        if settings.block_ms >= settings.socket_timeout_ms:
            raise ConfigError(
                f"BLOCK_MS ({settings.block_ms}) must be below SOCKET_TIMEOUT_MS "
                f"({settings.socket_timeout_ms}), or every idle blocking read times out"
            )
        longest_wait = max(min(PROBE_MAX_MS, settings.retry_max_delay_ms) * 5 // 4, settings.block_ms)
        if settings.health_port and settings.health_stuck_ms <= longest_wait:
            raise ConfigError(
                f"HEALTH_STUCK_MS ({settings.health_stuck_ms}) must be above {longest_wait}: a loop waiting "
                "that long between turns (BLOCK_MS, or probes of a downstream outage) is not stuck"
            )
        if settings.fulfillment_group == settings.email_group:
            raise ConfigError("FULFILLMENT_GROUP and EMAIL_GROUP must differ, or they share the orders")
        if len(set(settings.groups)) != len(settings.groups):
            raise ConfigError(f"CONSUMER_GROUPS names a group twice: {','.join(settings.groups)}")
        if settings.dead_letter_stream == settings.stream_key:
            raise ConfigError("DEAD_LETTER_STREAM must differ from STREAM_KEY")
        if settings.partitioned and get.text("DEAD_LETTER_STREAM", empty_ok=True):
            raise ConfigError(
                "DEAD_LETTER_STREAM must be empty with REDIS_CLUSTER or STREAM_PARTITIONS > 1: "
                "each partition has its own, in its hash slot (see core/keys.py)"
            )
        if settings.stream_partitions > 1 and ("{" in stream_key or "}" in stream_key):
            raise ConfigError(
                "STREAM_KEY must not contain braces with STREAM_PARTITIONS > 1: core/keys.py adds them"
            )
        if settings.redis_cluster and urlsplit(url).path.strip("/") not in ("", "0"):
            raise ConfigError(
                "REDIS_URL must name database 0 (or none) with REDIS_CLUSTER: a cluster has only 0"
            )
        _check_topology(settings)
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", settings.message_schema):
            raise ConfigError(f"MESSAGE_SCHEMA must be module:name, got {settings.message_schema!r}")
        if settings.log_level not in logging.getLevelNamesMapping():
            raise ConfigError(
                f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, got {settings.log_level!r}"
            )
        return settings


def _check_topology(settings: Settings) -> None:
    """One Redis, a cluster (its seed nodes) or a master behind Sentinel: settings that fit together."""
    if settings.redis_cluster_nodes and not settings.redis_cluster:
        raise ConfigError("REDIS_CLUSTER_NODES names nodes of a Redis Cluster: set REDIS_CLUSTER=true too")
    if not settings.redis_sentinels:
        return
    if settings.redis_cluster:
        raise ConfigError(
            "REDIS_SENTINELS and REDIS_CLUSTER=true exclude each other: a cluster fails over by itself"
        )
    if urlsplit(settings.redis_url).scheme == "unix":
        raise ConfigError(
            "REDIS_URL must be redis:// or rediss:// with REDIS_SENTINELS: the master is on TCP"
        )
    if not settings.redis_sentinel_master:
        raise ConfigError("REDIS_SENTINEL_MASTER must not be empty with REDIS_SENTINELS")


def host_and_port(address: str) -> tuple[str, int]:
    """`host:port` (`[::1]:26379` for IPv6) as a pair; ValueError when it is not one."""
    host, colon, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return host, int(port)


def _renamed(env: Mapping[str, str]) -> dict[str, str]:
    """The settings given by an old name, under their new one (the new one, if given, wins)."""
    return {new: env[old] for old, new in RENAMED.items() if old in env}


class _Reader:
    """Typed access to raw variables, each error naming its variable."""

    def __init__(self, raw: Mapping[str, str]) -> None:
        self.raw = raw

    def text(self, name: str, *, empty_ok: bool = False) -> str:
        value = self.raw[name].strip()
        if not value and not empty_ok:
            raise ConfigError(f"{name} must not be empty")
        return value

    def flag(self, name: str) -> bool:
        value = self.raw[name].strip().lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value in ("true", "1", "yes")

    def names(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of names without spaces; empty when the variable is empty."""
        names = tuple(part.strip() for part in self.raw[name].split(",") if part.strip())
        if any(char.isspace() for part in names for char in part):
            raise ConfigError(f"{name} must be names separated by commas, without spaces inside a name")
        return names

    def addresses(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of host:port; empty when the variable is empty."""
        found = tuple(part.strip() for part in self.raw[name].split(",") if part.strip())
        for address in found:
            try:
                host_and_port(address)
            except ValueError:
                raise ConfigError(
                    f"{name} must be host:port addresses separated by commas, got {address!r}"
                ) from None
        return found

    def integer(self, name: str, *, low: int, high: int | None = None) -> int:
        value = self.raw[name].strip()
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name} must be {bounds}, got {number}")
        return number


def load_settings(env: Mapping[str, str] | None = None, env_file: str = ".env") -> Settings:
    """Read settings from `.env` overlaid by the real environment (the environment wins)."""
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    return Settings.from_env({**file_values, **(os.environ if env is None else env)})


def lookalikes(names: Iterable[str]) -> list[str]:
    """One line for each of `names` that is not a setting but looks like one (`BACTH_SIZE`), or is
    a setting's old name."""
    lines = []
    for name in sorted(set(names) - DEFAULTS.keys()):
        if name in RENAMED:
            new = RENAMED[name]
            lines.append(f"{name} is now called {new} ({RENAMED_WHY[name]}); read as {new} for now")
            continue
        match = difflib.get_close_matches(name, DEFAULTS, n=1, cutoff=0.8)
        if match:
            lines.append(f"{name} is not a setting, so it is ignored; did you mean {match[0]}?")
    return lines


def configure_logging(level: str) -> None:
    """Send log lines to stderr in one plain format."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


def run_script(prog: str, main: Callable[[Settings], Coroutine[Any, Any, int]]) -> NoReturn:
    """Load settings, set up logging, run `main`; turn known failures into one line and an exit code.

    A closed stdout pipe (`python3 -m status | head -3`) ends the script quietly with exit code 141.
    """
    code: int
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        for line in lookalikes([*dotenv_values(".env"), *os.environ]):
            logging.getLogger(prog).warning("%s", line)
        code = asyncio.run(main(settings))
        sys.stdout.flush()  # a closed pipe shows up here rather than in the interpreter's last flush
    except BrokenPipeError:
        # Output still buffered would make the interpreter's final flush fail again, with a
        # message on stderr: send what is left to /dev/null (the recipe in Python's `signal` docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        # 141 = 128 + SIGPIPE, what a shell reports for a tool its closed pipe stopped. Not 0: the
        # output was cut short and the script stopped midway (`deadletter redrive` included).
        code = 141
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        code = error.exit_code
    except RedisError as error:
        logging.getLogger(prog).debug("Redis failed", exc_info=True)  # LOG_LEVEL=DEBUG: where
        print(f"{prog}: error: Redis failed: {type(error).__name__}: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
