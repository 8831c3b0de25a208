# One image for every service; each is a command: python -m consumer1, python -m consumer2,
# python -m initialization_stream, python -m maintenance, python -m dashboard (docs/deploying.md).
#   docker build -t orders-redis-streams .
#   docker run --rm --network host -e REDIS_URL=redis://127.0.0.1:6379/0 orders-redis-streams python -m consumer1
# BASE: a Debian-based image with Python 3.11+ and its venv module (Debian: python3-venv).
# The tests build on a Debian 12 root file system made locally (scripts/base-image.sh).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# Log lines reach `docker logs` / `kubectl logs` as they are written.
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Runtime dependencies only (not requirements-dev.txt), in a venv: Debian's own Python refuses
# a system-wide pip install, and `python` then means the venv's on both kinds of base.
COPY requirements.txt /opt/requirements.txt
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --disable-pip-version-check -r /opt/requirements.txt

# A fixed numeric id: Kubernetes' runAsNonRoot can only check a number.
RUN useradd --uid 10001 --user-group --no-log-init --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin orders

WORKDIR /app
COPY *.py ./
COPY core/ core/
COPY static/ static/
# Compiled now: at run time the code is not writable (non-root, or a read-only root file system).
RUN python -m compileall -q /app

USER 10001:10001
# Exec form, here and in every command given to it: the service is PID 1 and gets the SIGTERM
# itself. It finishes the batches in hand, then tells its lease keeper (a child that ignores
# SIGTERM) to release the lease and end; if PID 1 dies instead, the kernel ends the keeper too.
CMD ["python", "-m", "status"]
