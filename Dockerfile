# Switchboard container image: multi-stage, slim, non-root.
#
#   docker build -t switchboard .
#   docker run -p 8080:8080 -p 50051:50051 switchboard          # the echo demo
#   docker run -p 8080:8080 -p 50051:50051 -e OPENAI_API_KEY -e APP_KEY \
#     -v $PWD/config.yaml:/etc/switchboard/config.yaml:ro switchboard
#
# The config is read from $SWITCHBOARD_CONFIG, by default /etc/switchboard/config.yaml:
# the echo demo on all interfaces (deploy/demo.yaml). Mount your own over it, or set
# SWITCHBOARD_CONFIG=/etc/switchboard/example.yaml (deploy/config.yaml: every secret and
# address from the environment). `docker kill -s HUP` reloads it. scripts/container_check.sh
# builds and runs this image for real. See docs/operations.md.

ARG PYTHON=python:3.11-slim

# ---- build: a virtualenv with Switchboard and its dependencies ----------------------
FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/switchboard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY facade ./facade
# `otel` adds OpenTelemetry tracing (off unless observability.otel_endpoint is set).
RUN /opt/switchboard/bin/pip install '.[otel]'

# ---- runtime: the virtualenv only, no compiler, no pip cache, no source tree ------------
FROM ${PYTHON}
RUN groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid switchboard --no-create-home --home-dir /var/lib/switchboard switchboard \
 && mkdir -p /var/lib/switchboard /etc/switchboard \
 && chown switchboard:switchboard /var/lib/switchboard
COPY --from=build /opt/switchboard /opt/switchboard
COPY deploy/demo.yaml /etc/switchboard/config.yaml
COPY deploy/config.yaml /etc/switchboard/example.yaml
ENV PATH=/opt/switchboard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SWITCHBOARD_CONFIG=/etc/switchboard/config.yaml \
    SWITCHBOARD_HEALTH_URL=http://127.0.0.1:8080/healthz
# The embedded SQLite store (when the config uses a relative sqlite path) lives here.
WORKDIR /var/lib/switchboard
USER 10001:10001
EXPOSE 8080 50051
# No curl in a slim image: the probe is the image's own Python.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['SWITCHBOARD_HEALTH_URL'], timeout=2).status == 200 else 1)"]
# SIGTERM drains in-flight requests for shutdown_grace_s, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchboard"]
CMD ["serve"]
