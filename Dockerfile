# syntax=docker/dockerfile:1
# credproxy as a sidecar image.
#
#   docker build -t credproxy .
#   docker run --rm credproxy --help
#
# Mount the config at /etc/credproxy/config.yaml (read-only), keep the store in the
# /var/lib/credproxy volume, and give the master key as the secret /run/secrets/credproxy.key.
# See examples/compose.yaml and docs/DEPLOY.md.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: a wheel from this repository, installed into a venv ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Every dependency comes as a prebuilt wheel (--only-binary): no compiler is needed here,
# and none reaches the final image, which gets the finished venv alone.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/credproxy \
 && python -m pip --python /opt/credproxy/bin/python install --only-binary=:all: /wheels/*.whl \
 && /opt/credproxy/bin/credproxy --version

# ---- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="credproxy" \
      org.opencontainers.image.description="Local credential proxy sidecar: apps call APIs through it and never hold a key"
RUN groupadd --system --gid 10001 credproxy \
 && useradd --system --uid 10001 --gid credproxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin credproxy \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/credproxy \
 && install -d -m 0755 /etc/credproxy
COPY --from=build /opt/credproxy /opt/credproxy
ENV PATH=/opt/credproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CREDPROXY_CONFIG=/etc/credproxy/config.yaml \
    CREDPROXY_MASTER_KEY_FILE=/run/secrets/credproxy.key \
    CREDPROXY_HEALTHCHECK_URL=http://127.0.0.1:8786/healthz
USER 10001:10001
WORKDIR /var/lib/credproxy
VOLUME ["/var/lib/credproxy"]
# The main listener; the admin listener (8786) stays on the container's loopback.
EXPOSE 8787
STOPSIGNAL SIGTERM
# /healthz on the admin listener, with the Python already in the image (no curl);
# proxy variables are ignored so the check never leaves the container.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['CREDPROXY_HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["credproxy"]
CMD ["serve", "--log-format", "json"]
