# optserve: the server in one container. Sessions live in this one process's memory (with snapshots in /data), so it
# runs one uvicorn process: several workers would each hold a different subset of the sessions.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    OPTSERVE_HOST=0.0.0.0 \
    OPTSERVE_PORT=8000 \
    OPTSERVE_DATA_DIR=/data \
    OPTSERVE_GRACEFUL_SHUTDOWN_SECONDS=5

WORKDIR /app

# The extra installed: "server" (the default image, no Ray), or "ray" for the Ray cluster of docker-compose.ray.yml
# (the server plus Ray; the same code, a larger image).
ARG OPTSERVE_EXTRAS=server

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes, not on every code change.
# The stub packages and setuptools' build folder go with it: the build folder's empty stub __init__.py files are
# newer than the copied code's, and setuptools would put them, not the code, into the wheel.
# The server's dependencies are the [server] extra (pip only warns while a pyproject.toml has no such extra), or the
# [ray] one.
COPY pyproject.toml README.md ./
RUN mkdir -p service/algorithms client \
    && touch service/__init__.py service/algorithms/__init__.py client/__init__.py \
    && pip install "./[${OPTSERVE_EXTRAS}]" \
    && pip uninstall --yes optserve \
    && rm -rf build ./*.egg-info service client

COPY service/ service/
COPY client/ client/
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin optserve \
    && mkdir -p /data \
    && chown optserve /data

USER 10001
VOLUME ["/data"]
EXPOSE 8000

# SIGTERM starts the graceful shutdown: stop accepting, finish in-flight steps (5 s), snapshot, exit; within
# Docker's default 10 s stop timeout.
STOPSIGNAL SIGTERM
# The slim image has no curl: ask /healthz with the Python that is there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('OPTSERVE_PORT', '8000')}/healthz\", timeout=2).status != 200)"]

CMD ["optserve", "serve"]
