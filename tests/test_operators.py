"""The operator's tools keep their promises: REDIS_URL read right or refused in one line, every
secret it carries masked wherever it is shown, dead letters named by unambiguous addresses, a
readable order id shown, and a lag that is right whatever Redis's own figure says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import test_utils
from conftest import Script, make_settings, run_script, script_env, wait_until
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url

from config import ConfigError, Settings, redact_url
from core.dead_letters import dead_letter_fields
from core.keys import partition_of, partitions
from core.replies import text
from dashboard import Pipeline, build_parser, make_app
from initialization_stream import initialize
from orders import Order, readable_order_id, serialize
from status import caught_up

STREAM = "orders"
GROUPS = ["fulfillment_group", "email_group"]
Start = Callable[..., Script]

# --- REDIS_URL: read as redis-py reads it, or refused in one line -----------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:63a9/0", "port that is not a number"),
        ("redis://127.0.0.1:99999/0", "port that is not a number"),
        ("redis://127.0.0.1:0/0", "port that is not a number"),
        ("redis://[::1/0", "unclosed \\["),
        ("redis://127.0.0.1:6379/abc", "must end in a database number"),
        ("redis://127.0.0.1:6379/0?db=x", "option db must be a database number"),
        ("redis://127.0.0.1:6379/0?protocol=4", "option protocol must be 2 or 3"),
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "they need a rediss:// URL"),
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "option ssl_cert_reqs must be"),
        ("rediss://127.0.0.1:6379/0?ssl_min_version=TLSv1_2", "option ssl_min_version must be"),
        ("redis://127.0.0.1:6379/0?db=1&db=2", "more than once"),
        ("redis://127.0.0.1:6379/0#top", "must not contain #"),
        ("unix://", "socket's path"),
        ("redis:127.0.0.1", "must start with redis://"),
    ],
)
def test_a_malformed_redis_url_is_named_at_start(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^REDIS_URL .*{problem}"):
        Settings.from_env({"REDIS_URL": url})


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:63a9/0", "redis://127.0.0.1:99999/0", "redis://[::1/0", "redis://127.0.0.1:6379/abc"],
)
def test_a_malformed_redis_url_stops_every_script_with_one_line_and_exit_2(url: str) -> None:
    for module in ("status", "producer", "deadletter"):
        args = ["list"] if module == "deadletter" else []
        result = run_script(module, script_env(url), *args)
        assert result.returncode == 2, (module, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"{module}: error: REDIS_URL "), line


PASSWORD_PART = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)


@given(password=PASSWORD_PART, passphrase=PASSWORD_PART, db=st.integers(0, 15), port=st.integers(1, 65535))
def test_an_accepted_url_is_the_one_redis_py_connects_to_and_shows_no_secret(
    password: str, passphrase: str, db: int, port: int
) -> None:
    password, passphrase = f"Pw-{password}", f"Pp-{passphrase}"
    url = (
        f"rediss://app:{quote(password, safe='')}@[::1]:{port}/{db}"
        f"?ssl_password={quote(passphrase, safe='')}&ssl_ca_certs=/etc/ca.pem"
    )
    settings = Settings.from_env({"REDIS_URL": url})
    read: dict[str, Any] = dict(parse_url(settings.redis_url))
    assert (read["host"], read["port"], read.get("db"), read["password"]) == ("::1", port, db, password)
    assert read["ssl_password"] == passphrase
    shown = settings.safe_redis_url
    assert shown == f"rediss://app:***@[::1]:{port}/{db}?ssl_password=***&ssl_ca_certs=/etc/ca.pem"


@given(st.text(max_size=80))
def test_any_redis_url_is_either_refused_in_words_or_read_by_redis_py(url: str) -> None:
    try:
        settings = Settings.from_env({"REDIS_URL": url})
    except ConfigError as error:
        refusal = str(error)
    else:
        parse_url(settings.redis_url)  # never a ValueError from redis-py once accepted
        return
    assert refusal.startswith("REDIS_URL ")


@given(st.text(min_size=1, max_size=30).map(lambda s: "S3cret-" + s))
def test_redaction_never_shows_a_password_or_a_passphrase(secret: str) -> None:
    for url in (
        f"redis://user:{quote(secret, safe='')}@h:6379/0",
        f"redis://:{quote(secret, safe='')}@h/0",
        f"rediss://h:6379/0?ssl_password={quote(secret, safe='')}",
        f"rediss://u:{secret}@h:6379/0?ssl_certfile=/c.pem&ssl_password={secret}",  # unescaped: never parsed
        f"redis://u:{quote(secret, safe='')}@h:63a9/0",  # a bad port does not stop the masking
        f"redis://u:{secret}@[::1]:6379/0?ssl_ca_certs=/ca@corp.pem",  # an @ in an option's value
    ):
        shown = redact_url(url)
        assert "S3cret-" not in shown, shown
        assert "***" in shown


# --- Dead letters show a readable order id ----------------------------------------------------

INVALID_BUT_NAMED = {
    "ord-bad-mail": b'{"order_id": "ord-bad-mail", "customer_email": "not an address"}',
    "ord-extra-field": b'{"order_id": "ord-extra-field", "customer_email": "a@example.com", "note": "x"}',
    "ord-bad-qty": b'{"order_id": "ord-bad-qty", "customer_email": "a@example.com", "total": -1}',
}
UNNAMED = [
    b"{not json",
    b'{"order_id": "a", "order_id": "b", "customer_email": "a@example.com"}',
    b'{"order_id": 7}',
]


@given(
    order_id=st.text(min_size=1, max_size=128).filter(lambda s: s.isprintable() and not s.isspace()),
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k != "order_id"),
        st.integers() | st.text(max_size=10),
        max_size=4,
    ),
)
def test_the_order_id_is_read_from_any_json_object_that_has_one(
    order_id: str, extra: dict[str, object]
) -> None:
    payload = json.dumps({**extra, "order_id": order_id})
    assert readable_order_id(payload.encode(), 65536) == order_id
    assert readable_order_id(payload.encode(), len(payload.encode()) - 1) is None  # over the cap: unread


async def test_an_invalid_order_s_readable_id_is_shown_in_every_tool(
    redis: Redis, redis_url: str, settings: Settings, scripts: Start
) -> None:
    await initialize(redis, settings)
    for payload in [*INVALID_BUT_NAMED.values(), *UNNAMED]:
        await redis.xadd(STREAM, {"data": payload})
    env = script_env(redis_url, MAINTENANCE_INTERVAL_MS="0")
    consumer = scripts("consumer2", env)
    await wait_until(
        lambda: caught_up(redis, STREAM, ["email_group"]), "the email group to dead-letter them", 20
    )
    consumer.process.terminate()
    assert await asyncio.to_thread(consumer.wait) == 0
    log = consumer.output()
    for order_id in INVALID_BUT_NAMED:
        assert f"(order {order_id}) to orders:dead-letter: invalid order" in log
    assert log.count("(order unknown)") == len(UNNAMED)

    rows = json.loads(run_script("deadletter", env, "list", "--json").stdout)
    assert [row["order_id"] for row in rows] == [*INVALID_BUT_NAMED, "", "", ""]
    listed = run_script("deadletter", env, "list").stdout
    for order_id in INVALID_BUT_NAMED:
        assert f"order {order_id}  invalid order" in listed
    report = json.loads(run_script("status", env, "--json").stdout)
    newest = {row["id"]: row["order_id"] for row in report["newest_dead_letters"]}
    assert newest == {row["id"]: row["order_id"] for row in rows[-5:]}


# --- Partitioned dead letters: one address names one dead letter -----------------------------

SAME_ID = "1764000000000-0"  # the id two partitions' dead-letter streams both made


def order_in(partition: int, count: int, name: str) -> Order:
    """An order whose id routes it to `partition` of `count`."""
    return next(
        Order(f"{name}-{n}", f"{name}@example.com")
        for n in range(1000)
        if partition_of(f"{name}-{n}", count) == partition
    )


async def colliding_dead_letters(redis: Redis, settings: Settings) -> dict[str, Order]:
    """Dead letters of different orders under the same entry id in partitions 0 and 2 (and one in 1);
    their addresses and orders."""
    await initialize(redis, settings)
    parts = partitions(settings)
    made = {}
    for index, entry_id in ((0, SAME_ID), (2, SAME_ID), (1, "1764000000000-1")):
        order = order_in(index, len(parts), f"ord-p{index}")
        meta: dict[str, str | int] = {
            "group": "email_group",
            "consumer": "gone-pod",
            "source_id": f"1-{index}",
            "deliveries": 3,
            "error": "handler failed",
            "dead_lettered_at": "2026-11-29T10:00:00.000+00:00",
        }
        record: Any = dead_letter_fields({b"data": serialize(order)}, meta)
        await redis.xadd(parts[index].dead_letter_stream, record, id=entry_id)
        made[f"{index}:{entry_id}"] = order
    return made


async def dead_letter_orders(redis: Redis, settings: Settings) -> dict[str, str]:
    """Every dead letter's address -> its order id, read from Redis itself."""
    found = {}
    for index, part in enumerate(partitions(settings)):
        entries: Any = await redis.xrange(part.dead_letter_stream)
        for entry_id, fields in entries:
            found[f"{index}:{text(entry_id)}"] = readable_order_id(fields[b"data"], 65536) or ""
    return found


async def test_deadletter_acts_on_the_one_dead_letter_its_address_names(redis: Redis, redis_url: str) -> None:
    settings = make_settings(redis_url, STREAM_PARTITIONS="3")
    made = await colliding_dead_letters(redis, settings)
    env = script_env(redis_url, STREAM_PARTITIONS="3")

    rows = json.loads(run_script("deadletter", env, "list", "--json").stdout)
    assert {row["id"]: row["order_id"] for row in rows} == {a: o.order_id for a, o in made.items()}
    report = json.loads(run_script("status", env, "--json").stdout)
    assert {row["id"] for row in report["newest_dead_letters"]} == set(made)  # the same addresses

    # An entry id alone names two of them: refused, nothing done.
    for command in ("show", "purge", "redrive"):
        refused = run_script("deadletter", env, command, SAME_ID)
        assert refused.returncode == 2, refused.stdout
        [line] = refused.stderr.strip().splitlines()
        assert "is an entry id alone" in line
        assert f"like 0:{SAME_ID}" in line
    for wrong in ("3:1764000000000-0", "0:1-1-1", "x:1-1"):
        assert run_script("deadletter", env, "show", wrong).returncode == 2
    assert await dead_letter_orders(redis, settings) == {a: o.order_id for a, o in made.items()}

    shown = json.loads(run_script("deadletter", env, "show", f"2:{SAME_ID}").stdout)
    assert json.loads(shown["data"])["order_id"] == made[f"2:{SAME_ID}"].order_id
    purged = run_script("deadletter", env, "purge", f"2:{SAME_ID}")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines() == [f"2:{SAME_ID}: purged in {{orders:2}}", "purge: 1 of 1 entries"]
    left = {a: o.order_id for a, o in made.items() if a != f"2:{SAME_ID}"}
    assert await dead_letter_orders(redis, settings) == left

    redriven = run_script("deadletter", env, "redrive", f"0:{SAME_ID}")
    assert redriven.returncode == 0, redriven.stderr
    assert "redrive: 1 of 1 entries" in redriven.stdout
    back: Any = await redis.xrange("{orders:0}")
    assert [readable_order_id(f[b"data"], 65536) for _, f in back] == [made[f"0:{SAME_ID}"].order_id]
    assert [await redis.xlen(part.stream_key) for part in partitions(settings)] == [1, 0, 0]


async def test_the_dashboard_s_json_acts_on_the_one_dead_letter_its_address_names(
    redis: Redis, redis_url: str
) -> None:
    settings = make_settings(redis_url, STREAM_PARTITIONS="3", DASHBOARD_TOKEN="t0ken")
    made = await colliding_dead_letters(redis, settings)
    pipeline = Pipeline(redis, settings, build_parser().parse_args([]))
    await pipeline.refresh()
    auth = {"Authorization": "Bearer t0ken"}
    async with test_utils.TestClient(test_utils.TestServer(make_app(pipeline, "127.0.0.1"))) as client:
        body = await (await client.get("/api/status")).json()
        assert {row["id"]: row["order_id"] for row in body["report"]["newest_dead_letters"]} == {
            a: o.order_id for a, o in made.items()
        }
        for address, order in made.items():
            fields = await (await client.get(f"/api/dead-letters/{address}")).json()
            assert json.loads(fields["data"])["order_id"] == order.order_id
        alone = await client.get(f"/api/dead-letters/{SAME_ID}")
        assert alone.status == 400
        assert "is an entry id alone" in (await alone.json())["error"]
        refused = await client.post(f"/api/dead-letters/{SAME_ID}/purge", headers=auth)
        assert refused.status == 400
        assert (await client.get("/api/dead-letters/5:1764000000000-0")).status == 400
        purged = await client.post(f"/api/dead-letters/0:{SAME_ID}/purge", headers=auth)
        assert purged.status == 200
        assert await purged.json() == {"id": f"0:{SAME_ID}", "outcome": "purged"}
    left = {a: o.order_id for a, o in made.items() if a != f"0:{SAME_ID}"}
    assert await dead_letter_orders(redis, settings) == left
