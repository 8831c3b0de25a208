"""The dashboard as a real process, looked at in a real browser (Debian's chromium, headless).

Against a real redis-server with consumer processes running: the numbers shown are Redis's, the
chart moves without a reload, redrive and purge need the token and refuse cross-site requests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import test_utils
from conftest import ROOT, Script, run_script, script_env, unavailable, wait_until
from dead_letter_cases import SAME_ID, colliding_dead_letters, dead_letter_orders
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect
from redis.asyncio import Redis

from config import Settings
from core.dead_letters import dead_letter_fields
from core.replies import entries_of, text
from dashboard import Pipeline, build_parser, make_app
from initialization_stream import initialize
from orders import serialize
from producer import publish_many, sample_orders
from status import caught_up
from tools.local_redis import free_port

STREAM = "orders"
DEAD_LETTERS = "orders:dead-letter"
GROUPS = ["fulfillment_group", "email_group"]
TOKEN = "tok-3f9c-dashboard"
PASSWORD = "pw-Dash-9q2-secret"  # in REDIS_URL: must never reach the page or the log
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # we may be root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

Start = Callable[..., Script]


def need_chromium() -> None:
    """Skip (or, under CI=true, fail) when there is no chromium to drive."""
    if shutil.which(CHROMIUM) is None:
        unavailable(
            f"chromium is not installed (apt-get install chromium), or CHROMIUM names none: {CHROMIUM}"
        )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    need_chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def locked_url(redis: Redis, redis_url: str) -> AsyncIterator[str]:
    """The test server's URL as a user with a password, so the tests can look for the password."""
    await redis.acl_setuser(
        "dashboard-test", enabled=True, passwords=[f"+{PASSWORD}"], keys=["~*"], commands=["+@all"]
    )
    try:
        yield redis_url.replace("redis://", f"redis://dashboard-test:{PASSWORD}@", 1)
    finally:
        await redis.acl_deluser("dashboard-test")


async def get(url: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def post(url: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def start_dashboard(scripts: Start, env: dict[str, str], *args: str) -> tuple[Script, str]:
    """`python -m dashboard` on a free port; returns it and its base URL once /api/status answers."""
    port = free_port()
    dashboard = scripts("dashboard", env, "--port", str(port), "--interval", "0.5", *args)
    base = f"http://127.0.0.1:{port}"

    async def answers() -> bool:
        assert dashboard.process.poll() is None, dashboard.output()
        try:
            status, body = await get(f"{base}/api/status")
        except aiohttp.ClientError:
            return False
        return status == 200 and bool(body["report"])

    await wait_until(answers, "the dashboard to answer", 20)
    return dashboard, base


async def pipeline(scripts: Start, url: str, **overrides: str) -> dict[str, str]:
    """Stream and groups made, both consumer services running; the environment they run in."""
    env = script_env(url, MAINTENANCE_INTERVAL_MS="0", **overrides)  # no trimming under the test
    made = await asyncio.to_thread(run_script, "initialization_stream", env)
    assert made.returncode == 0, made.stderr
    scripts("consumer1", env)
    scripts("consumer2", env)
    return env


async def groups_match_redis(redis: Redis, body: Any) -> dict[str, Any]:
    """Assert each group's pending and lag in /api/status's body are XINFO GROUPS'; return its groups."""
    infos = {g["name"].decode(): g for g in await redis.xinfo_groups(STREAM)}
    groups = {g["name"]: g for g in body["report"]["groups"]}
    for group in GROUPS:
        assert (groups[group]["pending"], groups[group]["lag"]) == (
            infos[group]["pending"],
            infos[group]["lag"],
        )
    return groups


async def shown_number(page: Page, selector: str) -> int | None:
    shown = await page.text_content(selector)
    return int(shown.replace(",", "")) if shown and shown.replace(",", "").isdigit() else None


async def series(page: Page, chart: str, group: str) -> dict[str, float]:
    path = page.locator(f"#{chart} path[data-group='{group}']")
    return {
        "points": float(await path.get_attribute("data-points") or 0),
        "max": float(await path.get_attribute("data-max") or 0),
    }


async def add_dead_letter(redis: Redis, order_number: int, group: str = "fulfillment_group") -> str:
    """A dead letter of a valid order, as a consumer whose handler kept failing would leave it."""
    [order] = sample_orders(order_number)[-1:]
    meta: dict[str, str | int] = {
        "group": group,
        "consumer": "gone-pod",
        "source_id": f"1-{order_number}",
        "deliveries": 3,
        "error": "handler failed: <b>warehouse</b> down",  # shown as text, never as HTML
        "dead_lettered_at": "2026-11-29T10:00:00.000+00:00",
    }
    record: Any = dead_letter_fields({b"data": serialize(order)}, meta)
    entry_id = await redis.xadd(DEAD_LETTERS, record)
    return text(entry_id)


async def test_the_page_shows_what_redis_holds_and_the_chart_moves(
    redis: Redis, locked_url: str, scripts: Start, browser: Browser
) -> None:
    env = await pipeline(scripts, locked_url)
    dashboard, base = await start_dashboard(scripts, env, "--max-dead-letters", "0")
    page = await browser.new_page(viewport={"width": 1100, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(base)
    await page.wait_for_selector("#chart-rate path[data-group='email_group']", state="attached")
    await page.evaluate("window.notReloaded = true")
    for group in GROUPS:
        assert (await series(page, "chart-rate", group))["max"] == 0  # nothing published yet

    await publish_many(redis, STREAM, sample_orders(300))
    await redis.xadd(STREAM, {"data": b"{not json"})  # each group dead-letters its copy
    await wait_until(lambda: caught_up(redis, STREAM, GROUPS), "both services to catch up", 30)

    async def numbers_match() -> bool:
        infos = {g["name"].decode(): g for g in await redis.xinfo_groups(STREAM)}
        shown = [await shown_number(page, "#stream-length")]
        wanted = [await redis.xlen(STREAM)]
        for group in GROUPS:
            row = f"#groups tr.group[data-group='{group}']"
            shown += [
                await shown_number(page, f"{row} td.pending"),
                await shown_number(page, f"{row} td.lag"),
            ]
            wanted += [infos[group]["pending"], infos[group]["lag"]]
        shown.append(await shown_number(page, "#dead-letters-length"))
        wanted.append(await redis.xlen(DEAD_LETTERS))
        return shown == wanted

    await wait_until(numbers_match, "the page to show Redis's numbers", 15)

    async def chart_moved() -> bool:
        rates = [await series(page, "chart-rate", group) for group in GROUPS]
        return all(rate["max"] > 0 and rate["points"] >= 2 for rate in rates)

    await wait_until(chart_moved, "the throughput chart to show the orders", 15)
    assert await page.evaluate("window.notReloaded") is True
    health = page.locator("#health")
    assert "dead letters 2 > 0" in (await health.text_content() or "")
    assert await health.get_attribute("class") == "bad"

    # The JSON the page polls is Redis's too.
    status, body = await get(f"{base}/api/status")
    assert status == 200
    await groups_match_redis(redis, body)
    assert body["report"]["length"] == await redis.xlen(STREAM)

    screenshot = Path(
        os.environ.get("DASHBOARD_SCREENSHOT") or ROOT / "tests" / "artifacts" / "dashboard.png"
    )
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert len(await page.screenshot(path=screenshot, full_page=True)) > 10_000

    page_text = await page.content() + str(body)
    assert PASSWORD not in page_text
    assert "dashboard-test:***@" in (await page.text_content("#redis") or "")
    assert "@example.com" not in page_text  # no payload on the page unless asked for
    assert errors == []
    dashboard.process.terminate()
    assert await asyncio.to_thread(dashboard.wait) == 0
    assert PASSWORD not in dashboard.output()


async def test_redrive_and_purge_need_the_token_and_refuse_cross_site_requests(
    redis: Redis, locked_url: str, scripts: Start, browser: Browser
) -> None:
    env = await pipeline(scripts, locked_url, DASHBOARD_TOKEN=TOKEN)
    first, second, third = [await add_dead_letter(redis, n) for n in (1, 2, 3)]
    dashboard, base = await start_dashboard(scripts, env)
    page = await browser.new_page()
    await page.goto(base)
    row = page.locator(f"#dead-letters tr[data-id='{first}']")
    await row.wait_for()
    assert await page.locator("#dead-letters tbody tr").count() == 3
    assert "<b>warehouse</b> down" in (await row.locator("td.reason").text_content() or "")

    # Payloads only on demand.
    assert "customer1@example.com" not in await page.content()
    await row.locator("button[data-action=show]").click()
    await expect(page.locator("#fields")).to_contain_text("customer1@example.com", timeout=15_000)

    async def dead_letter(entry_id: str) -> bool:
        return bool(await redis.xrange(DEAD_LETTERS, min=entry_id, max=entry_id))

    # Without the token, and with a wrong one: refused, the entry stays.
    message = page.locator("#message")
    for typed in ("", "not-the-token"):
        await page.fill("#token", typed)
        await row.locator("button[data-action=redrive]").click()
        await expect(message).to_contain_text("redrive refused: wrong or missing token", timeout=15_000)
        assert await dead_letter(first)
        await page.evaluate("document.querySelector('#message').textContent = ''")

    # With it: back in the stream for its group, gone from the dead letters (and from the page).
    await page.fill("#token", TOKEN)
    await row.locator("button[data-action=redrive]").click()
    await expect(message).to_contain_text(f"{first}: redriven as", timeout=15_000)
    assert not await dead_letter(first)
    entries: Any = await redis.xrange(STREAM)
    redriven = [fields for _, fields in entries if fields.get(b"redriven_from")]
    assert [(f[b"redriven_from"], f[b"redrive_for"]) for f in redriven] == [
        (first.encode(), b"fulfillment_group")
    ]
    await row.wait_for(state="detached")
    await wait_until(lambda: caught_up(redis, STREAM, GROUPS), "the redriven order to be handled", 15)

    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.locator(f"#dead-letters tr[data-id='{second}'] button[data-action=purge]").click()
    await page.locator(f"#dead-letters tr[data-id='{second}']").wait_for(state="detached")
    assert not await dead_letter(second)

    # Cross-site requests are refused even with the token; only POST writes.
    write = f"{base}/api/dead-letters/{third}/redrive"
    bearer = f"Bearer {TOKEN}"
    assert (await post(write, Authorization=bearer, Origin="http://evil.example"))[0] == 403
    refused = await post(write, **{"Authorization": bearer, "Sec-Fetch-Site": "cross-site"})
    assert refused == (403, {"error": "cross-site request refused"})
    async with aiohttp.ClientSession() as session, session.get(write) as response:
        assert response.status == 405
    rebound = await get(f"{base}/api/status", Host=f"evil.example:{base.rsplit(':', 1)[1]}")
    assert rebound[0] == 403  # a page of another site that resolved its name to 127.0.0.1
    assert await dead_letter(third)
    assert (await post(write, Authorization=bearer, Origin=base))[0] == 200  # the page's own origin
    assert not await dead_letter(third)

    log = dashboard.output()
    assert "customer1@example.com" not in log  # the payload shown went to the page only
    assert f"dead letter {first} redriven as" in log
    assert TOKEN not in log
    assert PASSWORD not in log


async def test_without_a_token_writes_are_off_and_the_page_says_so(
    redis: Redis, redis_url: str, scripts: Start, browser: Browser
) -> None:
    entry_id = await add_dead_letter(redis, 1)
    _, base = await start_dashboard(scripts, script_env(redis_url))
    status, body = await post(f"{base}/api/dead-letters/{entry_id}/redrive", Authorization=f"Bearer {TOKEN}")
    assert status == 403
    assert "DASHBOARD_TOKEN" in body["error"]
    page = await browser.new_page()
    await page.goto(base)
    button = page.locator(f"#dead-letters tr[data-id='{entry_id}'] button[data-action=redrive]")
    await button.wait_for()
    assert await button.is_disabled()
    assert "DASHBOARD_TOKEN" in (await button.get_attribute("title") or "")
    assert await page.locator("#token-form").is_hidden()
    assert "off" in (await page.text_content("#writes") or "")
    assert await redis.xlen(DEAD_LETTERS) == 1


def test_help_usage_errors_and_an_unreachable_redis(redis_url: str) -> None:
    helped = run_script("dashboard", script_env(redis_url), "--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: python3 -m dashboard")
    for args in (["--port", "x"], ["--port", "70000"], ["--interval", "0"], ["--max-lag", "-1"]):
        bad = run_script("dashboard", script_env(redis_url), *args)
        assert bad.returncode == 2, args
        assert bad.stderr.strip().splitlines()[-1].startswith("python3 -m dashboard: error: "), args
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    unreachable = run_script("dashboard", script_env(nowhere, REDIS_CONNECT_TIMEOUT_MS="1000"), timeout=15)
    assert unreachable.returncode == 1
    [line] = unreachable.stderr.strip().splitlines()
    assert line.startswith(f"dashboard: error: cannot reach Redis at {nowhere} after 1s"), line


def test_a_port_in_use_is_one_clear_line(redis_url: str) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("dashboard", script_env(redis_url), "--port", str(port))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"dashboard: error: cannot serve on 127.0.0.1:{port}")
    )
    assert "Traceback" not in result.stderr


async def test_the_json_is_redis_s_and_throughput_counts_acked_entries(
    redis: Redis, settings: Settings
) -> None:
    await initialize(redis, settings)
    await publish_many(redis, STREAM, sample_orders(30))
    read: Any = await redis.xreadgroup("fulfillment_group", "f1", {STREAM: ">"}, count=20)
    ids = [entry_id for entry_id, _ in entries_of(read)]
    await redis.xack(STREAM, "fulfillment_group", *ids[:10])
    pipeline = Pipeline(redis, settings, build_parser().parse_args(["--max-pending", "4"]))
    await pipeline.refresh()
    pipeline.sample()  # the first point has no rate yet: nothing to compare with
    await redis.xack(STREAM, "fulfillment_group", *ids[10:15])
    await pipeline.refresh()
    pipeline.sample()
    dead_id = await add_dead_letter(redis, 1)
    async with test_utils.TestClient(test_utils.TestServer(make_app(pipeline, "127.0.0.1"))) as client:
        body = await (await client.get("/api/status")).json()
        fields = await (await client.get(f"/api/dead-letters/{dead_id}")).json()
        missing = await client.get("/api/dead-letters/1-1")
    groups = await groups_match_redis(redis, body)
    assert groups["fulfillment_group"]["pending"] == 5
    assert body["report"]["problems"] == ["fulfillment_group: pending 5 > 4"]
    first, last = body["samples"]
    assert first["groups"]["fulfillment_group"]["rate"] is None
    assert last["groups"]["fulfillment_group"]["rate"] > 0  # 5 more acked
    assert last["groups"]["email_group"]["rate"] == 0  # has read nothing
    assert body["writes"] is False
    assert fields["group"] == "fulfillment_group"
    assert "customer1@example.com" in fields["data"]  # on demand only
    assert missing.status == 404


async def test_partitioned_each_row_s_buttons_act_on_that_row_s_dead_letter(
    redis: Redis, redis_url: str, scripts: Start, browser: Browser
) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "STREAM_PARTITIONS": "3"})
    made = await colliding_dead_letters(redis, settings)  # two of them under one entry id
    env = script_env(redis_url, STREAM_PARTITIONS="3", DASHBOARD_TOKEN=TOKEN)
    _, base = await start_dashboard(scripts, env)
    page = await browser.new_page()
    await page.goto(base)
    rows = page.locator("#dead-letters tbody tr")
    await expect(rows).to_have_count(3, timeout=15_000)
    for address, order in made.items():  # each row: its address, its order
        row = page.locator(f"#dead-letters tr[data-id='{address}']")
        assert (await row.locator("td").nth(0).text_content()) == address
        assert (await row.locator("td").nth(4).text_content()) == order.order_id

    second = f"2:{SAME_ID}"
    await page.locator(f"#dead-letters tr[data-id='{second}'] button[data-action=show]").click()
    await expect(page.locator("#fields")).to_contain_text(made[second].customer_email, timeout=15_000)
    assert made[f"0:{SAME_ID}"].customer_email not in (await page.text_content("#fields") or "")

    first = f"0:{SAME_ID}"
    await page.fill("#token", TOKEN)
    questions: list[str] = []

    async def accept(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await page.locator(f"#dead-letters tr[data-id='{first}'] button[data-action=purge]").click()
    await page.locator(f"#dead-letters tr[data-id='{first}']").wait_for(state="detached")
    assert questions == [f"Purge dead letter {first} (order {made[first].order_id}) for good?"]
    assert await dead_letter_orders(redis, settings) == {
        address: order.order_id for address, order in made.items() if address != first
    }
    await expect(page.locator("#message")).to_have_text(f"{first}: purged")
