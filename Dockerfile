# syntax=docker/dockerfile:1
# The poolkit sidecar image: wheels are built in the first stage, the runtime stage installs only those
# wheels (no compiler, no build tools, no source tree) and runs as a non-root numeric user.
#   docker build -t poolkit:0.1.0 .
#   docker run --rm -e POOLKIT_POOLED_URL=... -e POOLKIT_SIDECAR_LISTEN_HOST=0.0.0.0 \
#     -e POOLKIT_SIDECAR_HTTP_HOST=0.0.0.0 -p 127.0.0.1:6432:6432 -p 127.0.0.1:9930:9930 poolkit:0.1.0
# (The sidecar listens on loopback by default, which is right in a pod; published ports need 0.0.0.0, and then
# client passwords: POOLKIT_SIDECAR_USERS='{"app": "..."}', since trust only admits loopback clients.)

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY poolkit ./poolkit
# poolkit and every dependency as wheels. [binary] brings psycopg's wheel that carries its own libpq,
# [fast] uvloop: the runtime stage then needs no system packages at all.
RUN pip wheel ".[binary,fast]" --wheel-dir /wheels

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# Exactly the wheels the build stage made (--no-index: nothing else can be fetched). They are bind-mounted
# from the build stage rather than copied, so they never become an image layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 poolkit \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin poolkit
# Numeric, so Kubernetes' runAsNonRoot can verify it without resolving a name.
USER 10001:10001
WORKDIR /tmp
# 6432: PostgreSQL clients; 9930: /metrics, /healthz, /readyz.
EXPOSE 6432 9930
# The sidecar drains on SIGTERM: stop accepting, finish in-flight transactions, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["poolkit", "health", "--url", "http://127.0.0.1:9930/readyz"]
ENTRYPOINT ["poolkit", "sidecar"]
CMD []
