#!/usr/bin/env bash
# Set-up-as-you-go entry point: `./dev.sh demo` runs the pipeline, `./dev.sh test` runs lint and tests.
# Creates .venv and installs the requirements when they change; finds or installs a Redis.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat >&2 <<'EOF'
usage: ./dev.sh demo [--count N] | test [PYTEST ARGS] | bench [ARGS] | run MODULE [ARGS] | redis8
  demo          the whole pipeline end to end (./dev.sh demo --help: its options)
  test          ruff, mypy, then pytest on Debian's redis-server and (version-dependent tests) on Redis 8.6
                (REDIS_SERVER=PATH ./dev.sh test: on that redis-server only)
  bench         the benchmark (./dev.sh bench --help)
  redis8        build Redis 8.6 from Debian's source package (cached); prints its redis-server
  run MODULE    a script with .venv's Python, e.g. ./dev.sh run status --help; modules:
                initialization_stream producer consumer1 consumer2 status deadletter
                dashboard maintenance tools.demo tools.bench tools.chaos
Every script's --help lists its options with their defaults.
EOF
  exit 2
}

ensure_venv() {  # runtime (the scripts) | dev (the tests, linters and tools as well)
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv || {
      echo "dev.sh: cannot create a virtual environment; install python3-venv (Debian) or Python 3.11+" >&2
      exit 1
    }
  fi
  local runtime dev have
  runtime=runtime:$(sha256sum < requirements.txt | cut -d' ' -f1)
  dev=dev:$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  have=$(cat .venv/.installed 2>/dev/null || true)
  [ "$have" = "$dev" ] && return 0  # the development set holds the runtime one
  [ "$1" = runtime ] && [ "$have" = "$runtime" ] && return 0
  if [ "$1" = dev ]; then
    echo "dev.sh: installing requirements-dev.txt into .venv" >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
    echo "$dev" > .venv/.installed
  else
    echo "dev.sh: installing requirements.txt into .venv" >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$runtime" > .venv/.installed
  fi
}

# A local redis-server binary, installing Debian's package where this user may.
ensure_redis_server() {
  command -v redis-server >/dev/null && return 0
  if command -v apt-get >/dev/null; then
    local sudo=""
    [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"; } || return 1
    echo "dev.sh: installing redis-server with apt-get" >&2
    $sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  fi
  command -v redis-server >/dev/null
}

# docker-compose.yaml needs its ACL users' passwords: keep them in .env, made up once if missing.
compose_passwords() {
  touch .env
  local name
  for name in REDIS_ADMIN_PASSWORD PRODUCER_PASSWORD CONSUMER_PASSWORD; do
    if ! grep -qE "^${name}=.+" .env; then
      sed -i "/^${name}=\$/d" .env
      echo "${name}=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')" >> .env
      echo "dev.sh: made up ${name} in .env" >&2
    fi
  done
  set -a; . ./.env; set +a
  REDIS_URL="redis://admin:$(.venv/bin/python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$REDIS_ADMIN_PASSWORD")@127.0.0.1:6379/0"
  export REDIS_URL
}

no_redis() {
  echo "dev.sh: no Redis: set $1, start Docker (then docker compose up -d), or install redis-server (apt-get install redis-server / brew install redis)" >&2
  exit 1
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
  demo)
    ensure_venv runtime
    if [ -z "${REDIS_URL:-}" ]; then
      if docker info >/dev/null 2>&1; then
        compose_passwords
        docker compose up -d --wait
      else
        ensure_redis_server || no_redis REDIS_URL  # the demo starts a throwaway server itself
      fi
    fi
    exec .venv/bin/python -m tools.demo "$@"
    ;;
  test)
    ensure_venv dev
    if [ -z "${TEST_REDIS_URL:-}" ]; then ensure_redis_server || no_redis TEST_REDIS_URL; fi
    .venv/bin/ruff format --check --diff .
    .venv/bin/ruff check .
    .venv/bin/mypy
    if [ -n "${REDIS_SERVER:-}${TEST_REDIS_URL:-}" ]; then exec .venv/bin/python -m pytest "$@"; fi
    # The whole suite on Debian's redis-server (7.0), then on Redis 8.6 (built once, cached)
    # every test file that runs a path chosen by version (IDMP, XREADGROUP CLAIM, ACKED
    # trimming, the library's functions); the rest (parsing, settings, compose, demo,
    # dashboard, README commands) run the same code on both.
    echo "dev.sh: tests on $(redis-server --version | cut -d' ' -f1-3)" >&2
    .venv/bin/python -m pytest "$@"
    redis8=$(scripts/redis-8.sh)
    echo "dev.sh: version-dependent tests on $("$redis8" --version | cut -d' ' -f1-3) ($redis8)" >&2
    versioned=(bench cluster faults generative health operations operators pipeline processes producer
      promises publishing retention retries seams security sentinel transactions tracing)
    versioned=("${versioned[@]/#/tests/test_}")
    REDIS_SERVER=$redis8 exec .venv/bin/python -m pytest "${versioned[@]/%/.py}" "$@"
    ;;
  redis8)
    scripts/redis-8.sh
    ;;
  bench)
    ensure_venv dev
    [ -n "${REDIS_URL:-}" ] || ensure_redis_server || no_redis REDIS_URL
    exec .venv/bin/python -m tools.bench "$@"
    ;;
  run)
    [ $# -ge 1 ] || usage
    ensure_venv runtime
    exec .venv/bin/python -m "$@"
    ;;
  *) usage ;;
esac
