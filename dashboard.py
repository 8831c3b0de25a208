"""A web page of the pipeline: what `status` shows, a live chart of lag and throughput, dead letters.

Serves on 127.0.0.1 unless told otherwise. One task collects the report (`status.collect`) every
--interval seconds for every viewer; the page polls /api/status. Redrive and purge need the token
in DASHBOARD_TOKEN (off without it) and refuse cross-site requests. Payloads are shown only when
asked for, one entry at a time, and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

import status
from config import CliError, Settings, run_script
from core.dead_letters import ADDRESS, parse_address
from core.keys import partitions
from core.replies import text
from deadletter import move
from redisPool import redis_connect, where

log = logging.getLogger("dashboard")

STATIC = Path(__file__).resolve().parent / "static"
WINDOW_S = 600  # the chart shows the last ten minutes
DEAD_LETTERS_SHOWN = 50
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Pipeline:
    """The latest report and the chart's samples, refreshed by one task whatever the number of viewers."""

    def __init__(self, redis: Redis, settings: Settings, args: argparse.Namespace) -> None:
        self.redis = redis
        self.settings = settings
        self.args = args
        self.report: dict[str, Any] = {}
        self.samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(2, int(WINDOW_S / args.interval))
        )
        self.error: str | None = None  # Redis trouble since the last good report
        self._done: dict[str, tuple[float, int]] = {}  # group -> (time, entries delivered and acked)

    async def refresh(self) -> None:
        """Collect a new report, thresholds judged as `status` judges them."""
        report = await status.collect_all(self.redis, self.settings, DEAD_LETTERS_SHOWN)
        report["problems"] = status.problems(report, self.args)
        self.report = report

    def sample(self) -> None:
        """Add one chart point per group: its lag and its throughput (acked per second) since the last."""
        now = time.time()
        groups = {}
        for group in self.report["groups"]:
            read = group["entries_read"]
            if read is None and group["last_delivered_id"] == "0-0":
                read = 0  # Redis says "unknown" for a group that has read nothing yet
            done = None if read is None else read - group["pending"]
            rate = None
            before = self._done.get(group["name"])
            if done is not None and before is not None and now > before[0] and done >= before[1]:
                rate = (done - before[1]) / (now - before[0])
            if done is not None:
                self._done[group["name"]] = (now, done)
            groups[group["name"]] = {"lag": group["lag"], "rate": rate}
        self.samples.append({"t": int(now * 1000), "groups": groups})

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh and sample every --interval seconds until `stop`; ride out Redis trouble, warning once."""
        while not stop.is_set():
            try:
                await self.refresh()
            except RedisError as error:
                if self.error is None:
                    log.warning("Redis failed (%s); the page shows the last report until it is back", error)
                self.error = f"Redis failed: {type(error).__name__}; showing the last report"
            else:
                if self.error is not None:
                    log.info("Redis is back")
                self.error = None
                self.sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.args.interval):
                    await stop.wait()


def refusal(request: web.Request, token: str) -> web.Response | None:
    """Why a write is refused (off, cross-site, wrong token), or None to let it through."""
    if not token:
        return web.json_response(
            {"error": "writes are off: start the dashboard with DASHBOARD_TOKEN set to enable them"},
            status=403,
        )
    # A browser names where a request comes from; the page itself sends same-origin requests only.
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if (site is not None and site != "same-origin") or (
        origin is not None and origin != f"{request.scheme}://{request.host}"
    ):
        return web.json_response({"error": "cross-site request refused"}, status=403)
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        return web.json_response(
            {"error": "wrong or missing token (Authorization: Bearer DASHBOARD_TOKEN)"}, status=401
        )
    return None


def locate(request: web.Request, settings: Settings) -> tuple[str, Settings, str] | web.Response:
    """The address in the path, its partition and its entry id; or the answer to an address that
    names no dead letter for sure (partitioned, an entry id alone)."""
    named = request.match_info["address"]
    parts = partitions(settings)
    try:
        index, entry_id = parse_address(named, len(parts))
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    return named, parts[index], entry_id


def make_app(pipeline: Pipeline, host: str) -> web.Application:
    """The page, its JSON and the two writes."""
    settings = pipeline.settings
    loopback = host in ("127.0.0.1", "localhost", "::1")

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host.
        if loopback and request.host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
            return web.json_response({"error": f"unexpected Host {request.host!r}"}, status=403)
        try:
            response = await handler(request)
        except RedisError as error:
            log.warning("Redis failed during %s %s: %s", request.method, request.path, type(error).__name__)
            response = web.json_response({"error": f"Redis failed: {type(error).__name__}"}, status=503)
        response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def no_icon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def page(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def report(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "redis": where(settings),
                "interval_s": pipeline.args.interval,
                "writes": bool(settings.dashboard_token),
                "error": pipeline.error,
                "report": pipeline.report,
                "samples": list(pipeline.samples),
            }
        )

    async def show(request: web.Request) -> web.Response:
        located = locate(request, settings)
        if isinstance(located, web.Response):
            return located
        named, part, entry_id = located
        found: Any = await pipeline.redis.xrange(part.dead_letter_stream, min=entry_id, max=entry_id)
        if not found:
            return web.json_response({"error": f"no dead letter {named}"}, status=404)
        return web.json_response({text(k): text(v) for k, v in found[0][1].items()})

    async def write(request: web.Request) -> web.Response:
        refused = refusal(request, settings.dashboard_token)
        action = request.match_info["action"]
        if refused is not None:
            log.warning(
                "refused to %s dead letter %s: HTTP %d", action, request.match_info["address"], refused.status
            )
            return refused
        located = locate(request, settings)
        if isinstance(located, web.Response):
            return located
        named, part, entry_id = located
        try:
            outcome = await move(pipeline.redis, part, action, entry_id)
        except CliError as error:  # the dead-letter stream kept changing
            return web.json_response({"error": str(error)}, status=409)
        if outcome is None:
            return web.json_response({"error": f"no dead letter {named} (gone already?)"}, status=404)
        log.info("dead letter %s %s", named, outcome)
        with contextlib.suppress(RedisError):  # done either way; the page reloads its data next
            await pipeline.refresh()
        return web.json_response({"id": named, "outcome": outcome})

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_get("/api/status", report)
    app.router.add_get(f"/api/dead-letters/{{address:{ADDRESS}}}", show)
    app.router.add_post(f"/api/dead-letters/{{address:{ADDRESS}}}/{{action:redrive|purge}}", write)
    app.router.add_static("/static", STATIC)
    return app


async def main(settings: Settings, args: argparse.Namespace) -> int:
    async with redis_connect(settings) as redis:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        pipeline = Pipeline(redis, settings, args)
        await pipeline.refresh()
        runner = web.AppRunner(make_app(pipeline, args.host), access_log=None)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, args.host, args.port).start()
            except OSError as error:
                raise CliError(f"cannot serve on {args.host}:{args.port}: {error.strerror}") from None
            writes = "on (DASHBOARD_TOKEN set)" if settings.dashboard_token else "off (no DASHBOARD_TOKEN)"
            where = f"[{args.host}]" if ":" in args.host else args.host
            log.info(
                "dashboard on http://%s:%d/ for Redis %s; redrive and purge %s",
                where,
                args.port,
                settings.safe_redis_url,
                writes,
            )
            await pipeline.run(stop)
        finally:
            await runner.cleanup()
    log.info("dashboard stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m dashboard",
        description="Serve a web page of the stream, its groups and consumers, a live chart of lag and "
        "throughput, and the dead letters (redrive and purge need DASHBOARD_TOKEN).",
    )
    parser.add_argument("--port", type=int, default=8090, help="the port to serve on (default: 8090)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    status.add_thresholds(parser)
    return parser


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    if not 0 < arguments.port < 65536:
        parser.error("--port must be between 1 and 65535")
    if not 0.1 <= arguments.interval <= 60:
        parser.error("--interval must be between 0.1 and 60 seconds")
    status.check_thresholds(parser, arguments)
    run_script("dashboard", lambda settings: main(settings, arguments))
