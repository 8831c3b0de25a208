"""The operator's tools keep their promises: REDIS_URL read right or refused in one line, every
secret it carries masked wherever it is shown, dead letters named by unambiguous addresses, a
readable order id shown, and a lag that is right whatever Redis's own figure says."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from conftest import run_script, script_env
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import parse_url

from config import ConfigError, Settings, redact_url

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


PASSWORD_PART = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


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
    read = parse_url(settings.redis_url)
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
