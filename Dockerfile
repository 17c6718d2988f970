# mtls-proxy as a small, non-root container image.
#
#   docker build -t mtls-proxy:0.1.0 .
#   docker run --read-only -p 8443:8443 -p 9090:9090 \
#     -v "$PWD/config.yaml:/etc/mtls-proxy/config.yaml:ro" -v "$PWD/tls:/etc/mtls-proxy/tls:ro" mtls-proxy:0.1.0
#
# BASE_IMAGE is any Debian-like image with python3 (>= 3.11) and its venv module on PATH; both stages use it, so
# the virtual environment's interpreter link points at the same Python. deploy/build-image.sh builds one locally
# with debootstrap where no registry is reachable.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# ---- build: install the project and its dependencies into /opt/venv ------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# pip compiles the bytecode at install time (the root filesystem is read-only at run time). pip and setuptools
# leave the environment afterwards: nothing installs packages at run time. Behind a TLS-intercepting proxy or with
# a private index, pass its CA bundle as a build secret (--secret id=ca-bundle,src=FILE) and the index as
# --build-arg PIP_INDEX_URL=...; neither is stored in the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
RUN --mount=type=secret,id=ca-bundle,required=false \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "$PIP_INDEX_URL" . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/mtls-proxy --help > /dev/null

# ---- run: the interpreter from the base image, the venv, and nothing else ------------------------------------
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mtls-proxy" \
      org.opencontainers.image.description="An mTLS-terminating reverse proxy: client-certificate auth, authorization, TCP forwarding, Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# PYTHONMALLOC=malloc: Python objects come from glibc, whose free pages the proxy hands back after a burst of
# connections; CPython's own allocator keeps most of them (bench/README.md, "Memory after a burst").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    MTLS_PROXY_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
# 8443: the TLS listener; 9090: the admin endpoint (/metrics /healthz /readyz /status).
EXPOSE 8443 9090
# A numeric user (no passwd entry needed), so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /etc/mtls-proxy
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MTLS_PROXY_HEALTHCHECK_URL'], timeout=4)"]
# SIGTERM drains (listeners close, open connections get drain_timeout), SIGHUP reloads certificates.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mtls-proxy"]
CMD ["run", "--config", "/etc/mtls-proxy/config.yaml"]
