"""Stream, groups, consumers and dead letters at a glance, and a health check.

Exit codes: 0 healthy; 3 unhealthy: the stream or a configured group (CONSUMER_GROUPS) is missing, or a
threshold given on the command line is exceeded; 1 Redis unreachable; 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from config import Settings, run_script
from core import library
from core.capabilities import Capabilities, detect
from core.keys import partitions, stream_keys
from core.lag import GroupLag, group_lags
from core.replies import parse_id, text
from core.schedule import schedule_text
from core.sentinel import master_address
from deadletter import describe, schema_of
from redisPool import is_cluster, redis_connect

UNHEALTHY = 3


async def caught_up(redis: Redis, stream: str, groups: Iterable[str]) -> bool:
    """True when each group has been delivered the newest entry and holds nothing pending.

    Compares ids rather than trusting `lag`, which Redis 7.0 miscounts after trimming.
    """
    try:
        last = (await redis.xinfo_stream(stream))["last-generated-id"]
        infos = {text(g["name"]): g for g in await redis.xinfo_groups(stream)}
    except ResponseError:  # no stream yet
        return False
    wanted = [infos.get(group) for group in groups]
    return all(g is not None and g["pending"] == 0 and g["last-delivered-id"] == last for g in wanted)


async def paths(redis: Redis, settings: Settings, capabilities: Capabilities) -> dict[str, str]:
    """Which version-dependent path each part of the pipeline takes on this server."""
    return {
        "publish": library.APPEND_PATH,
        "reclaim": (
            "XREADGROUP CLAIM (owners keep the entries they hold fresh; a sweep drops deleted ones)"
            if capabilities.readgroup_claim
            else "XPENDING IDLE + XCLAIM of lapsed leases"
        ),
        "trim": "XTRIM MINID ~ ACKED" if capabilities.acked_trim else "XTRIM MINID ~",
    }


def age_ms(entry_id: Any, now_ms: int) -> int | None:
    return None if entry_id is None else max(0, now_ms - parse_id(entry_id)[0])


async def collect(
    redis: Redis, settings: Settings, newest_dead_letters: int = 5, partition: tuple[int, int] = (0, 1)
) -> dict[str, Any]:
    """Everything the report shows, as plain data (also the --json output); `partition` is this
    stream's number and how many there are, for the dead letters' addresses."""
    now_ms = int(time.time() * 1000)
    stream = settings.stream_key
    capabilities = await detect(redis)
    report: dict[str, Any] = {
        "redis_version": ".".join(map(str, capabilities.version)),
        "features": {
            "xtrim_acked": capabilities.acked_trim,
            "xreadgroup_claim": capabilities.readgroup_claim,
            "xadd_idmp": capabilities.xadd_idmp,
        },
        "paths": await paths(redis, settings, capabilities),
        "retries": schedule_text(settings),
        "stream": stream,
        "exists": True,
        "groups": [],
    }
    master = await master_address(redis)
    if master is not None:  # through Sentinel: the master it names now
        report.update(master=master, master_name=settings.redis_sentinel_master)
    try:
        info: Any = await redis.xinfo_stream(stream)
    except ResponseError:  # no such key
        report.update(exists=False, length=0)
    else:
        first, last = info.get("first-entry"), info.get("last-entry")
        report.update(
            length=info["length"],
            first_id=text(first[0]) if first else None,
            last_id=text(last[0]) if last else None,
            first_age_ms=age_ms(first[0], now_ms) if first else None,
            last_age_ms=age_ms(last[0], now_ms) if last else None,
            memory_bytes=await _memory(redis, stream),
        )
        await library.ensure_loaded(redis)
        lags = await group_lags(redis, stream)
        for group in await redis.xinfo_groups(stream):
            report["groups"].append(await _group(redis, stream, group, lags.get(text(group["name"])), now_ms))
    present = {group["name"] for group in report["groups"]}
    report["groups"] += [_missing_group(name) for name in settings.groups if name not in present]
    dead_letters: Any = await redis.xrevrange(settings.dead_letter_stream, count=newest_dead_letters)
    report["dead_letter_stream"] = settings.dead_letter_stream
    report["dead_letters"] = await redis.xlen(settings.dead_letter_stream)
    schema = schema_of(settings)
    report["newest_dead_letters"] = [
        describe(i, f, settings.max_payload_bytes, *partition, schema) for i, f in dead_letters
    ]
    return report


async def collect_all(redis: Redis, settings: Settings, newest_dead_letters: int = 5) -> dict[str, Any]:
    """`collect` for every partition: unpartitioned, its report; else their sum, with each in `partitions`."""
    parts = partitions(settings)
    if len(parts) == 1 and not settings.partitioned:
        return await collect(redis, settings, newest_dead_letters)
    count = len(parts)
    reports = [await collect(redis, part, newest_dead_letters, (i, count)) for i, part in enumerate(parts)]
    if is_cluster(redis):  # where each partition lives: its slot's master
        for part, report in zip(parts, reports, strict=True):
            node = cast(RedisCluster, redis).get_node_from_key(part.stream_key)
            report["node"] = f"{node.host}:{node.port}" if node is not None else None
    total = {**reports[0], "stream": settings.stream_key, "partitions": reports}
    present = [r for r in reports if r["exists"]]
    total["exists"] = len(present) == len(reports)
    total["length"] = sum(r["length"] for r in reports)
    total["memory_bytes"] = sum(r.get("memory_bytes") or 0 for r in present)
    firsts = [(r["first_age_ms"], r["first_id"]) for r in present if r.get("first_id")]
    lasts = [(r["last_age_ms"], r["last_id"]) for r in present if r.get("last_id")]
    total["first_age_ms"], total["first_id"] = max(firsts) if firsts else (None, None)
    total["last_age_ms"], total["last_id"] = min(lasts) if lasts else (None, None)
    total["groups"] = [_sum_groups([r["groups"] for r in reports], name) for name in _group_names(reports)]
    many = "{" + settings.stream_key + ":*}:dead-letter"
    total["dead_letter_stream"] = reports[0]["dead_letter_stream"] if len(reports) == 1 else many
    total["dead_letters"] = sum(r["dead_letters"] for r in reports)
    newest = sorted(
        (row for r in reports for row in r["newest_dead_letters"]), key=lambda row: parse_id(row["entry_id"])
    )
    total["newest_dead_letters"] = newest[::-1][:newest_dead_letters]
    return total


def _group_names(reports: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(g["name"] for r in reports for g in r["groups"]))


def _sum_groups(per_partition: list[list[dict[str, Any]]], name: str) -> dict[str, Any]:
    """One group over every partition: counts summed, the oldest pending entry the oldest of all."""
    rows = [g for groups in per_partition for g in groups if g["name"] == name]
    if not all(g["exists"] for g in rows) or len(rows) < len(per_partition):
        return _missing_group(name)
    consumers: dict[str, dict[str, Any]] = {}
    for g in rows:
        for c in g["consumer_list"]:
            known = consumers.setdefault(
                c["name"],
                {
                    "name": c["name"],
                    "pending": 0,
                    "idle_ms": c["idle_ms"],
                    "alive": False,
                    "retry_waiting": 0,
                    "retry_oldest_s": 0.0,
                    "outage_s": None,
                },
            )
            known["pending"] += c["pending"]
            known["idle_ms"] = min(known["idle_ms"], c["idle_ms"])
            known["alive"] = known["alive"] or c["alive"]
            known["retry_waiting"] += c["retry_waiting"]
            known["retry_oldest_s"] = max(known["retry_oldest_s"], c["retry_oldest_s"])
            if c["outage_s"] is not None:
                known["outage_s"] = max(known["outage_s"] or 0.0, c["outage_s"])
    ages = [g["oldest_pending_age_ms"] for g in rows if g["oldest_pending_age_ms"] is not None]
    idles = [g["oldest_pending_idle_ms"] for g in rows if g["oldest_pending_idle_ms"] is not None]
    lags = [g["lag"] for g in rows]
    said = [g["redis_lag"] for g in rows]
    reads = [g.get("entries_read") for g in rows]
    return {
        "name": name,
        "exists": True,
        "consumers": len(consumers),
        "pending": sum(g["pending"] for g in rows),
        "lag": None if None in lags else sum(lags),
        "lag_exact": all(g["lag_exact"] for g in rows),
        "redis_lag": None if None in said else sum(said),
        "redis_lag_fixable": all(g["redis_lag_fixable"] for g in rows),
        "entries_read": None if None in reads else sum(reads),
        "last_delivered_id": "(per partition)",
        "oldest_pending_age_ms": max(ages) if ages else None,
        "oldest_pending_idle_ms": max(idles) if idles else None,
        "consumer_list": list(consumers.values()),
        "retry_waiting": sum(g["retry_waiting"] for g in rows),
        "retry_oldest_s": max(g["retry_oldest_s"] for g in rows),
    }


async def _memory(redis: Redis, key: str) -> int | None:
    try:
        usage = await redis.memory_usage(key)
    except ResponseError:  # an ACL user without MEMORY
        return None
    return int(usage) if usage is not None else None


async def _group(
    redis: Redis, stream: str, group: dict[str, Any], lag: GroupLag | None, now_ms: int
) -> dict[str, Any]:
    name = group["name"]
    oldest: Any = await redis.xpending_range(stream, name, "-", "+", 1) if group["pending"] else []
    consumers = await redis.xinfo_consumers(stream, name)
    states = await _consumer_states(redis, stream, text(name), [text(c["name"]) for c in consumers])
    return {
        "name": text(name),
        "exists": True,
        "consumers": len(consumers),
        "pending": group["pending"],
        # Counted (core/lag.py); None only for a group made since it was counted.
        "lag": None if lag is None else lag.lag,
        "lag_exact": lag is not None and lag.exact,
        "redis_lag": group.get("lag"),  # what XINFO GROUPS says (a scaler reads it); None: NULL
        "redis_lag_fixable": lag is None or not lag.deleted_ahead,  # by maintenance, when wrong
        "entries_read": group.get("entries-read"),  # None when Redis cannot tell; for a rate
        "last_delivered_id": text(group["last-delivered-id"]),
        "oldest_pending_age_ms": age_ms(oldest[0]["message_id"], now_ms) if oldest else None,
        "oldest_pending_idle_ms": oldest[0]["time_since_delivered"] if oldest else None,
        "consumer_list": [
            {"name": text(c["name"]), "pending": c["pending"], "idle_ms": c["idle"], **state}
            for c, state in zip(consumers, states, strict=True)
        ],
        "retry_waiting": sum(state["retry_waiting"] for state in states),
        "retry_oldest_s": max((state["retry_oldest_s"] for state in states), default=0.0),
    }


async def _consumer_states(redis: Redis, stream: str, group: str, names: list[str]) -> list[dict[str, Any]]:
    """What each consumer's lease and report say (core/lease.py, stream_consumer._report): alive or
    gone, entries waiting for a retry, the oldest one's wait, a downstream outage."""
    keys = stream_keys(stream)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.lease(group, name))
        pipe.get(keys.state(group, name))
    replies = await pipe.execute() if names else []
    states = []
    for alive, raw in zip(replies[::2], replies[1::2], strict=True):
        try:
            said = json.loads(raw) if raw else {}
        except ValueError:
            said = {}
        states.append(
            {
                "alive": bool(alive),
                "retry_waiting": int(said.get("waiting") or 0) if alive else 0,
                "retry_oldest_s": float(said.get("oldest_wait_s") or 0.0) if alive else 0.0,
                "outage_s": said.get("outage_s") if alive else None,
            }
        )
    return states


def _missing_group(name: str) -> dict[str, Any]:
    """A configured group the stream does not have, in the shape of an existing one."""
    return {
        "name": name,
        "exists": False,
        "consumers": 0,
        "pending": 0,
        "lag": None,
        "lag_exact": False,
        "redis_lag": None,
        "redis_lag_fixable": True,
        "entries_read": None,
        "last_delivered_id": None,
        "oldest_pending_age_ms": None,
        "oldest_pending_idle_ms": None,
        "consumer_list": [],
        "retry_waiting": 0,
        "retry_oldest_s": 0.0,
    }


def problems(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What is wrong, one readable line each: a missing stream or group, any threshold exceeded."""
    found = []
    if not report["exists"]:
        found.append(f"stream {report['stream']}: does not exist")
    for group in report["groups"]:
        name = group["name"]
        if not group["exists"]:
            found.append(f"{name}: missing")
            continue
        if args.max_lag is not None and (group["lag"] or 0) > args.max_lag:
            found.append(f"{name}: lag {group['lag']} > {args.max_lag}")
        if args.max_pending is not None and group["pending"] > args.max_pending:
            found.append(f"{name}: pending {group['pending']} > {args.max_pending}")
        age = group["oldest_pending_age_ms"]
        if args.max_pending_age is not None and age is not None and age > args.max_pending_age * 1000:
            found.append(f"{name}: oldest pending {duration(age)} > {args.max_pending_age:g}s")
    if args.max_dead_letters is not None and report["dead_letters"] > args.max_dead_letters:
        found.append(f"dead letters {report['dead_letters']} > {args.max_dead_letters}")
    return found


def duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def render(report: dict[str, Any], found: list[str], color: bool) -> str:
    """The report as aligned text; exceeded thresholds marked with ! (red on a terminal)."""

    def mark(text: str, bad: bool) -> str:
        if not bad:
            return text
        return f"\033[31m{text} !\033[0m" if color else f"{text} !"

    bad_groups = {line.split(":", 1)[0] for line in found}
    features = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in report["features"].items())
    lines = [f"redis {report['redis_version']} ({features})"]
    lines.append("in use: " + "; ".join(f"{name}: {how}" for name, how in report["paths"].items()))
    lines.append(f"retries: {report['retries']}")
    if report.get("master"):
        lines.append(f"master {report['master_name']} at {report['master']} (as Redis Sentinel names it)")
    if not report["exists"]:
        lines.append(
            mark(f"stream {report['stream']}: does not exist (run python3 -m initialization_stream)", True)
        )
    else:
        lines.append(
            f"stream {report['stream']}: {report['length']:,} entries, {size(report['memory_bytes'])}, "
            f"first {report['first_id'] or '-'} ({duration(report['first_age_ms'])} old), "
            f"last {report['last_id'] or '-'} ({duration(report['last_age_ms'])} old)"
        )
    header = (
        f"  {'group':<22}{'consumers':>10}{'pending':>10}{'lag':>10}  {'oldest pending':<16}last delivered"
    )
    lines.append(header)
    for g in report["groups"]:
        if not g["exists"]:
            lines.append(
                mark(f"  {g['name']:<22}{'missing':>10}  (run python3 -m initialization_stream)", True)
            )
            continue
        lag = "?" if g["lag"] is None else f"{'' if g['lag_exact'] else '~'}{g['lag']:,}"
        row = (
            f"  {g['name']:<22}{g['consumers']:>10}{g['pending']:>10,}{lag:>10}  "
            f"{duration(g['oldest_pending_age_ms']):<16}{g['last_delivered_id']}"
        )
        lines.append(mark(row, g["name"] in bad_groups))
        if g["lag"] is not None and g["redis_lag"] != g["lag"]:
            said = "NULL" if g["redis_lag"] is None else f"{g['redis_lag']:,}"
            until = (
                "maintenance corrects it"
                if g["redis_lag_fixable"]
                else "until the group reads past a deletion"
            )
            lines.append(f"      Redis says lag {said} (XINFO GROUPS, what a scaler reads): {until}")
        if g["retry_waiting"]:
            lines.append(
                f"      waiting for a retry: {g['retry_waiting']:,} "
                f"(the oldest for {duration(int(g['retry_oldest_s'] * 1000))})"
            )
        for c in g["consumer_list"]:
            said = "alive" if c["alive"] else "gone (its lease lapsed)"
            if c["outage_s"] is not None:
                said += f"; its downstream is down, for {duration(int(c['outage_s'] * 1000))}"
            lines.append(
                f"      consumer {c['name']:<30} pending {c['pending']:>8,}  idle {duration(c['idle_ms'])}  "
                f"{said}"
            )
    dead = f"dead letters in {report['dead_letter_stream']}: {report['dead_letters']:,}"
    lines.append(mark(dead, any(line.startswith("dead letters") for line in found)))
    for row in report["newest_dead_letters"]:
        lines.append(f"  {row['id']}  {row['group']:<18} deliveries {row['deliveries']:<3} {row['error']}")
    for part in report.get("partitions", []):
        pending = ", ".join(f"{g['name']} {g['pending']:,}" for g in part["groups"] if g["exists"])
        where = f" on {part['node']}" if part.get("node") else ""
        lines.append(
            f"  partition {part['stream']}{where}: {part['length']:,} entries, pending {pending or '-'}, "
            f"dead letters {part['dead_letters']:,}"
        )
    lines.append(mark("UNHEALTHY: " + "; ".join(found), True) if found else "healthy")
    return "\n".join(lines)


async def main(settings: Settings, args: argparse.Namespace) -> int:
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    async with redis_connect(settings, args.timeout) as redis:
        while True:
            report = await collect_all(redis, settings)
            found = problems(report, args)
            if args.json:
                print(json.dumps({**report, "problems": found}, indent=2))
            else:
                if args.watch and color:
                    print("\033[2J\033[H", end="")
                print(render(report, found, color), flush=True)
            if not args.watch:
                return UNHEALTHY if found else 0
            await asyncio.sleep(args.watch)


def add_thresholds(parser: argparse.ArgumentParser) -> None:
    """The threshold options `problems` reads (status and the dashboard share them)."""
    parser.add_argument("--max-lag", type=int, metavar="N", help="unhealthy when a group's lag exceeds N")
    parser.add_argument("--max-pending", type=int, metavar="N", help="unhealthy when a group holds over N")
    parser.add_argument(
        "--max-pending-age", type=float, metavar="SECONDS", help="unhealthy when an entry is pending longer"
    )
    parser.add_argument("--max-dead-letters", type=int, metavar="N", help="unhealthy over N dead letters")


def check_thresholds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 through `parser` when a threshold is negative."""
    limits = (args.max_lag, args.max_pending, args.max_pending_age, args.max_dead_letters)
    if any(limit is not None and limit < 0 for limit in limits):
        parser.error("thresholds must be 0 or more")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m status",
        description="Show the stream, its groups and consumers, and the dead letters. Exit 3 when "
        "the stream or a configured group (CONSUMER_GROUPS) is missing or a threshold given here is exceeded "
        "(a health check for compose or Kubernetes).",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document, for machines")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    add_thresholds(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a Redis that does not answer after SECONDS, exit 1; 1-2 for a probe "
        "(default: REDIS_CONNECT_TIMEOUT_MS, 10 s unless set)",
    )
    return parser


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.watch is not None and arguments.watch <= 0:
        parser.error("--watch must be more than 0 seconds")
    if arguments.timeout is not None and not arguments.timeout > 0:
        parser.error("--timeout must be more than 0 seconds")
    check_thresholds(parser, arguments)
    run_script("status", lambda settings: main(settings, arguments))
