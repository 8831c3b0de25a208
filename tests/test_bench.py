"""The bench's own parts: the template's users on its throwaway server, and the table it prints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import need_redis_server
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from initialization_stream import initialize
from producer import CHUNK, publish_many, sample_orders
from tools import bench, bench_cluster
from tools.local_redis import LocalRedis, start_local_redis


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    """A throwaway redis-server of this test's own: the bench adds users to it."""
    need_redis_server()
    server = start_local_redis()
    try:
        yield server
    finally:
        server.close()


async def test_the_template_users_work_as_in_production_and_default_stays_usable(server: LocalRedis) -> None:
    admin = Redis.from_url(server.url)
    users = await bench.add_template_users(admin, server.url)
    producer = Redis.from_url(users.producer_url)
    consumer = Redis.from_url(users.consumer_url)
    try:
        await initialize(admin, bench.bench_settings(server.url, bench.PRODUCTION_STREAM, 100))
        assert await admin.ping()  # the template's `default off` is left out
        # The append's XADD is allowed only by a selector: its words were joined as in an ACL file.
        assert len(await publish_many(producer, bench.PRODUCTION_STREAM, sample_orders(3))) == 3
        with pytest.raises(NoPermissionError):
            await producer.xadd(bench.STREAM, {"data": b"x"})
        assert await consumer.xlen(bench.PRODUCTION_STREAM) == 3
        with pytest.raises(NoPermissionError):
            await consumer.xtrim(bench.PRODUCTION_STREAM, maxlen=0)
    finally:
        for client in (admin, producer, consumer):
            await client.aclose()
    assert "secret" not in repr(users)


def results(production: float | None) -> dict[str, Any]:
    return {
        "cores": 2,
        "batch_size": 1000,
        "date": "2026-11-29",
        "redis_version": "7.0.15",
        "ceiling_per_s": 500_000.0,
        "baseline_per_s": 5_000.0,
        "publish_per_s": 100_000.0,
        "publish_production_per_s": production,
        "publish_idmp_per_s": None,
        "publish_id_map_per_s": 25_000.0,
        "publish_id_map_redis_us_per_order": 3.5,
        "ceiling_redis_us_per_order": 1.1,
        "publish_redis_us_per_order": 1.4,
        "publish_production_redis_us_per_order": production and 1.5,
        "publish_idmp_redis_us_per_order": None,
        "publish_one_calls": 5000,
        "publish_one_p50_ms": 0.21,
        "publish_one_p99_ms": 0.48,
        "consume_per_s": 40_000.0,
        "e2e_per_s": 30_000.0,
        "e2e_2x2_per_s": 35_000.0,
        "e2e_bare_per_s": 60_000.0,
        "e2e_safety_on_per_s": 30_000.0,
        "e2e_safety_ratios": [0.5],
        "e2e_production_per_s": production and production / 4,
        "e2e_no_dedupe_per_s": 45_000.0,
        "e2e_tx_per_s": 20_000.0,
        "latency_rate_per_s": 4_990.0,
        "latency_p50_ms": 2.0,
        "latency_p99_ms": 4.0,
        "latency_p99_rounds_ms": [4.0],
        "latency_bare_p50_ms": 1.5,
        "latency_bare_p99_ms": 3.0,
        "latency_bare_p99_rounds_ms": [3.0],
        "consumer_rss_mb_first": 39.0,
        "consumer_rss_mb_last": 39.0,
        "redis_used_mb": 500.0,
        "redis_entries": 1_000_000,
        "memory_orders": 100_000,
        "dedupe_window_ms": 3_600_000,
        "bytes_per_order_own": 0.4,
        "stream_length_after_trim_own": 0,
        "producer_calls_bytes": 480,
        "producer_calls": 2,
        "bytes_per_order_foreign": 224.0,
        "stream_length_after_trim_foreign": 12,
        "tracing_off_us_per_order": 0.08,
        "decode_strict_us": 1.8,
        "decode_tolerant_us": 1.8,
        "decode_tolerant_unknown_field_us": 6.2,
        "tracing_span_us_per_order": 9.0,
        "e2e_untraced_per_s": 30_000.0,
        "e2e_traced_per_s": 25_000.0,
        "tracing_cost_us_per_order": 6.7,
    }


def test_the_table_puts_the_production_rows_beside_the_admin_rows() -> None:
    lines = bench.table(results(90_000.0)).splitlines()
    assert "redis-server 7.0.15" in lines[0]
    names = [line[:62].strip() for line in lines]
    publish = names.index(f"publish_many: one check per FCALL of {CHUNK}")
    assert names[publish + 1].startswith("publish_many as the producer user")
    assert names[publish + 2] == f"per-order id map (the append before): FCALL of {CHUNK}"
    assert not any(name.startswith("XADD IDMP") for name in names)  # Redis 7.0: not measured
    again = names.index("end to end: ours again (same size)")
    assert names[again + 1].startswith("end to end: as the producer and consumer users")
    text = "\n".join(lines)
    assert "publish at 90% of the admin's rate, end to end at 75%" in text
    assert "224.0 bytes each (112.0 per group" in text
    assert (
        "parsing an order: strict (the producer; consumers before) 1.80 us, tolerant (consumers now) 1.80 us"
        in text
    )
    assert "the producer's record of its calls: 480 bytes for 2 calls (it keeps the last 2,000)" in text
    assert (
        "publishing: publish_many at 20% of the ceiling; XADD IDMP: not measured, Redis 8.6+ only; " in text
    )
    assert "publish() of one order (5,000 calls in turn): p50 0.21 ms, p99 0.48 ms" in text
    assert (
        "Redis's CPU time per order published: the ceiling's XADD 1.10 us, publish_many 1.40 us, as the "
        "producer user 1.50 us, the id map 3.50 us\n" in text
    )
    # 1/20,000 - 1/30,000 s per order: 16.7 us
    assert "a transactional commit (2 staged writes per order per group) costs 16.7 us per order" in text
    assert "tracing with a provider costs 6.7 us per order end to end" in text
    assert "83% of the rate without); in-process, a consumer span 9.0 us per order" in text
    assert "the hook without a provider 0.08 us" in text


def test_the_table_puts_xadd_idmp_beside_ours_where_redis_has_it() -> None:
    r = results(90_000.0) | {"redis_version": "8.6.3", "publish_idmp_per_s": 80_000.0}
    r |= {"publish_idmp_redis_us_per_order": 1.9}
    r |= {"publish_per_s": 320_000.0, "e2e_safety_ratios": [0.9, 0.8, 1.0]}
    lines = bench.table(r).splitlines()
    names = [line[:62].strip() for line in lines]
    ours = names.index(f"publish_many: one check per FCALL of {CHUNK}, median of 3")
    assert names[ours + 3] == f"XADD IDMP: a check per order, FCALL of {CHUNK}, median of 3"
    assert lines[ours + 3].split()[-3:] == ["80,000", "16%", "16.0x"]  # beside the ceiling and the baseline
    text = "\n".join(lines)
    assert "publishing: publish_many at 64% of the ceiling; 4.00x XADD IDMP's rate; " in text
    assert ", as the producer user 1.50 us, the id map 3.50 us, XADD IDMP 1.90 us\n" in text


def test_the_safety_cost_is_the_median_of_rounds_run_in_turn() -> None:
    r = results(90_000.0) | {"e2e_safety_ratios": [0.81, 0.62, 0.74]}
    text = bench.table(r)
    assert "safety features: ours runs at 74% of the hand-written loop's rate (they cost 26%) " in text
    assert "(rounds in turn: 81%, 62%, 74%)" in text
    assert "end to end: hand-written loop, no safety features, median of 3 " in text
    assert "end to end: ours again (same size), median of 3 " in text
    assert "safety features: ours runs at 50%" in bench.table(results(90_000.0))  # one round: its ratio
    faster = bench.table(results(90_000.0) | {"e2e_safety_ratios": [1.2]})
    assert "ours runs at 120% of the hand-written loop's rate (no cost measured: ours reads ahead)" in faster


def test_latency_is_the_median_of_rounds_beside_the_hand_written_loop() -> None:
    r = results(90_000.0) | {"e2e_safety_ratios": [0.8, 0.7, 0.9]}
    r |= {"latency_p99_rounds_ms": [4.0, 9.5, 3.0], "latency_bare_p99_rounds_ms": [3.0, 8.0, 2.5]}
    text = bench.table(r)
    assert "(4,990/s reached, median of 3): p50 2.00 ms, p99 4.00 ms (rounds: 4.00, 9.50, 3.00)" in text
    assert (
        "the hand-written loop in the same rounds: p50 1.50 ms, p99 3.00 ms (rounds: 3.00, 8.00, 2.50)"
        in text
    )
    one = bench.table(results(90_000.0))
    assert "(4,990/s reached): p50 2.00 ms, p99 4.00 ms\n" in one  # one round: no list


def test_without_the_production_users_the_table_says_why() -> None:
    text = bench.table(results(None))
    assert "as the producer user" not in text
    assert "not measured, REDIS_URL is set" in text


def test_without_the_sdk_the_table_says_tracing_was_not_measured() -> None:
    r = results(None) | {"tracing_span_us_per_order": None, "e2e_traced_per_s": None}
    text = bench.table(r | {"e2e_untraced_per_s": None, "tracing_cost_us_per_order": None})
    assert "not measured with a provider, opentelemetry-sdk is not installed" in text
    assert "SDK tracer provider" not in text


def test_the_cluster_table_compares_cpu_per_order_and_projects() -> None:
    one = {
        "publish_per_s": 100_000.0,
        "e2e_per_s": 30_000.0,
        "redis_cpu_s_per_1000_orders": [0.02],
        "orders_per_redis_cpu_s": [50_000.0],
    }
    many = {
        "publish_per_s": 80_000.0,
        "e2e_per_s": 20_000.0,
        "redis_cpu_s_per_1000_orders": [0.025, None, 0.025],
        "orders_per_redis_cpu_s": [40_000.0, 0.0, 40_000.0],
    }
    results = {
        "date": "2026-11-29",
        "shards": 3,
        "single": one,
        "cluster": many,
        "shard_vs_single": 0.8,
        "projected_per_s": {1: 40_000.0, 3: 120_000.0, 6: 240_000.0},
    }
    text = bench_cluster.table(results)
    assert "each shard 0.025, -, 0.025 s" in text
    assert "a shard 40,000 (80% of one Redis)" in text
    assert "3 shards 120,000/s" in text
