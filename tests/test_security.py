"""Security against real servers: least-privilege ACL users, TLS, and no secrets or payloads in output."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import (
    IN_CI,
    ROOT,
    make_settings,
    need_redis_server,
    run_script,
    script_env,
    wait_until,
)
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from test_pipeline import Recorder

import consumer1
from initialization_stream import initialize
from producer import publish_many, sample_orders
from status import caught_up
from stream_consumer import StreamConsumer
from tools.local_redis import LocalRedis, free_port

PASSWORDS = {
    "REDIS_ADMIN_PASSWORD": "adm1n secret&|",
    "PRODUCER_PASSWORD": "pr0ducer-secret",
    "CONSUMER_PASSWORD": "c0nsumer-secret",
}


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server with the users of redis/users.acl.template, rendered by redis/start.sh."""
    need_redis_server()
    acl = tmp_path / "users.acl"
    env = {**os.environ, **PASSWORDS, "ACL_FILE": str(acl), "RENDER_ONLY": "1"}
    subprocess.run(["sh", str(ROOT / "redis" / "start.sh")], env=env, check=True, timeout=10)
    assert "secret" not in acl.read_text()  # hashes only
    server = LocalRedis(free_port(), tmp_path, ["--aclfile", str(acl)])
    server.start()
    yield server
    server.stop()


def url_for(server: LocalRedis, user: str, password: str) -> str:
    return f"redis://{user}:{quote(password, safe='')}@127.0.0.1:{server.port}/0"


@pytest.fixture
async def clients(acl_server: LocalRedis) -> AsyncIterator[dict[str, Redis]]:
    made = {
        "admin": Redis.from_url(url_for(acl_server, "admin", PASSWORDS["REDIS_ADMIN_PASSWORD"])),
        "producer": Redis.from_url(url_for(acl_server, "producer", PASSWORDS["PRODUCER_PASSWORD"])),
        "consumer": Redis.from_url(url_for(acl_server, "consumer", PASSWORDS["CONSUMER_PASSWORD"])),
    }
    yield made
    for client in made.values():
        await client.aclose()


async def denied(call: Any) -> bool:
    try:
        await call
    except (NoPermissionError, ResponseError) as error:
        # Redis 7.0 says "no permissions", 8.6 "No permissions" (redis-py drops the NOPERM prefix).
        return isinstance(error, NoPermissionError) or "no permissions" in str(error).lower()
    return False


async def test_the_default_user_is_off(acl_server: LocalRedis) -> None:
    anonymous = Redis.from_url(acl_server.url)
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.ping()
    finally:
        await anonymous.aclose()


async def test_the_producer_user_publishes_a_file_once_however_often_it_is_run(
    acl_server: LocalRedis, clients: dict[str, Redis], tmp_path: Path
) -> None:
    """The producer user reads and moves the input's checkpoint, {orders}:input:*, and nothing else."""
    admin, producer = clients["admin"], clients["producer"]
    await initialize(admin, make_settings(acl_server.url))
    orders = tmp_path / "orders.jsonl"
    orders.write_text("".join(f'{{"order_id":"p-{n}","customer_email":"p@example.com"}}\n' for n in range(3)))
    env = script_env(url_for(acl_server, "producer", PASSWORDS["PRODUCER_PASSWORD"]))
    first, again = (run_script("producer", env, "--file", str(orders)) for _ in range(2))
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert again.stdout.endswith(", 3 already there: 3 published before from this input\n")
    assert await admin.xlen("orders") == 3
    [checkpoint] = await admin.keys("{orders}:input:*")
    assert await denied(producer.get("orders"))
    assert await denied(producer.set("{orders}:lease:email_group:c", "x"))
    assert await producer.get(checkpoint)  # its own


async def test_each_app_user_can_do_its_job_and_nothing_else(
    acl_server: LocalRedis, clients: dict[str, Redis]
) -> None:
    admin, producer, consumer = clients["admin"], clients["producer"], clients["consumer"]
    settings = make_settings(url_for(acl_server, "consumer", PASSWORDS["CONSUMER_PASSWORD"]))
    await initialize(admin, settings)

    orders = sample_orders(30)
    ids = await publish_many(producer, "orders", orders)  # no scripts for it: pipelines
    assert len(ids) == 30
    await admin.xadd("orders", {"data": b"not an order"})
    for call in (
        producer.xadd("elsewhere", {"data": b"x"}),
        producer.get("orders"),
        producer.xreadgroup("email_group", "p", {"orders": ">"}),
        producer.xdel("orders", ids[0]),
        producer.flushall(),
        producer.config_get("*"),
        producer.eval("return 1", 0),
        producer.script_load("return 1"),
    ):
        assert await denied(call)

    recorder = Recorder()
    worker = StreamConsumer(consumer, settings, "email_group", "c1", recorder.handler("c1"))
    # The fulfillment service's transactional handler: its stock and outbox writes under {orders}:.
    fulfiller = StreamConsumer(consumer, settings, "fulfillment_group", "f1", consumer1.handle)
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(fulfiller.run())]
    groups = ["email_group", "fulfillment_group"]
    await wait_until(lambda: caught_up(admin, "orders", groups), "the consumer user to work")
    worker.stop.set()
    fulfiller.stop.set()
    await asyncio.gather(*tasks)
    assert len(recorder.handled) == 30
    assert await admin.xlen("{orders}:shipments") == 30  # each order's event, written as the consumer user
    assert await admin.xlen("orders:dead-letter") == 2  # each group dead-lettered the bad entry: XADD allowed
    assert worker.maintenance_refused  # trimming is the admin's job
    for call in (
        consumer.xadd("orders", {"data": b"x"}),
        consumer.xadd("other", {"data": b"x"}),
        consumer.xdel("orders", ids[0]),
        consumer.xtrim("orders", maxlen=0),
        consumer.delete("orders"),
        consumer.set("elsewhere", 1),
        consumer.flushall(),
        consumer.config_get("*"),
        consumer.eval("return 1", 0),
        consumer.keys("*"),
    ):
        assert await denied(call)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, and a second CA that signed nothing."""
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("openssl is missing")
        pytest.skip("openssl is not installed")
    files = {name: directory / name for name in ("ca.key", "ca.crt", "other.key", "other.crt")}
    files |= {name: directory / name for name in ("server.key", "server.csr", "server.crt", "san.cnf")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    new_key = ["-newkey", "rsa:2048", "-nodes"]
    for ca in ("ca", "other"):
        subject = f"/CN={ca}-test-ca"
        openssl("req", "-x509", *new_key, "-days", "1", "-subj", subject, "-keyout", str(files[f"{ca}.key"]),
                "-out", str(files[f"{ca}.crt"]))  # fmt: skip
    files["san.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", str(files["server.key"]),
            "-out", str(files["server.csr"]))  # fmt: skip
    ca_args = ["-CA", str(files["ca.crt"]), "-CAkey", str(files["ca.key"]), "-CAcreateserial"]
    openssl("x509", "-req", "-in", str(files["server.csr"]), *ca_args, "-days", "1",
            "-extfile", str(files["san.cnf"]), "-out", str(files["server.crt"]))  # fmt: skip
    return files


def start_tls_redis(tmp_path: Path, certs: dict[str, Path], client_certificates: bool) -> LocalRedis:
    """A redis-server on TLS only (a free port), with the certificates of `make_certificates`;
    `client_certificates`: clients must show one the CA signed."""
    port = free_port()
    tls_only = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-auth-clients",
        "yes" if client_certificates else "no",
    ]
    tls_only += ["--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"])]
    tls_only += ["--tls-ca-cert-file", str(certs["ca.crt"])]
    server = LocalRedis(port, tmp_path, tls_only, tls=True)
    server.start()
    return server


async def test_the_pipeline_runs_over_tls_and_a_wrong_ca_is_refused(tmp_path: Path) -> None:
    need_redis_server()
    certs = make_certificates(tmp_path)
    server = start_tls_redis(tmp_path, certs, client_certificates=False)
    port = server.port
    try:
        good = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['ca.crt']}"
        env = script_env(good)
        assert run_script("initialization_stream", env).returncode == 0
        assert run_script("producer", env, "--count", "5").returncode == 0
        client = Redis.from_url(good)
        recorder = Recorder()
        worker = StreamConsumer(client, make_settings(good), "email_group", "t", recorder.handler("t"))
        try:
            task = asyncio.create_task(worker.run())
            await wait_until(lambda: len(recorder.handled) == 5, "orders over TLS")
            worker.stop.set()
            await task
        finally:
            await client.aclose()
        wrong_ca = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['other.crt']}"
        wrong = run_script("producer", script_env(wrong_ca))
        plain = run_script("producer", script_env(f"redis://127.0.0.1:{port}/0"))
    finally:
        server.stop()
    assert wrong.returncode == 1
    last = wrong.stderr.strip().splitlines()[-1]
    assert last.startswith("producer: error: ")
    assert "certificate verify failed" in last
    assert plain.returncode == 1  # a TLS-only server refuses plain text
    assert "Traceback" not in wrong.stderr + plain.stderr


PII = (
    '{"order_id": "pii-1", "customer_email": "jane.private@example.org",'
    ' "items": [{"sku": "PRIVATE-SKU", "qty": 1}]}\n'
    '{"order_id": "pii-2", "customer_email": "john.private@example.org", "total": 12.5}\n'
)
POISON = b'{"order_id": "pii-3", "customer_email": "bad address jane.private"}'
SECRETS = ("Sup3r-Secret-PW", "Wr0ng-Secret-PW", "private@example.org", "PRIVATE-SKU", "jane.private")


async def test_no_secret_and_no_payload_in_any_output(tmp_path: Path, scripts: Any) -> None:
    need_redis_server()
    server = LocalRedis(free_port(), tmp_path, ["--requirepass", "Sup3r-Secret-PW"])
    server.start()
    try:
        url = f"redis://:Sup3r-Secret-PW@127.0.0.1:{server.port}/0"
        env = script_env(url, CLAIM_IDLE_MS="200", LOG_LEVEL="DEBUG")
        orders = tmp_path / "orders.jsonl"
        orders.write_text(PII)
        runs = [run_script("initialization_stream", env), run_script("producer", env, "--file", str(orders))]
        client = Redis.from_url(url)
        try:
            await client.xadd("orders", {"data": POISON})
            consumers = [scripts(module, env) for module in ("consumer1", "consumer2")]
            await wait_until(
                lambda: caught_up(client, "orders", ["fulfillment_group", "email_group"]),
                "both services to finish",
                20,
            )
        finally:
            await client.aclose()
        for consumer in consumers:
            consumer.process.terminate()
            consumer.wait()
        runs += [run_script(module, env, *args) for module, args in TOOLS]
        runs.append(run_script("producer", script_env(url.replace("Sup3r", "Wr0ng"))))
    finally:
        server.stop()
    everything = "\n".join([c.output() for c in consumers] + [r.stdout + r.stderr for r in runs])
    assert "pii-1" in everything  # order ids are fine to log
    assert "refused" in everything  # the wrong password was reported...
    for secret in SECRETS:
        assert secret not in everything  # ...without echoing it, or any payload


TOOLS = [("status", ()), ("deadletter", ("list",)), ("maintenance", ())]
