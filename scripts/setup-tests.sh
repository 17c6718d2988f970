#!/usr/bin/env bash
# Install what the test suite needs; README.md ("Run the tests") gives the command, and .ci/run runs exactly it:
#
#   bash scripts/setup-tests.sh && python -m pytest
#
# Run as root on Debian 12 (apt-get). Idempotent and fast when everything is there. ruff and mypy run inside the
# suite (tests/test_lint.py), so any pytest run also fails on a lint or type finding.
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    # Debian tools the tests drive as real peers: openssl (s_client), curl, promtool (from the prometheus package)
    # to lint /metrics, and the proxies the benchmark's --quick smoke test measures mtls-proxy against.
    local missing=()
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v promtool >/dev/null || missing+=(prometheus)
    { command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ]; } \
        || missing+=(nginx-light libnginx-mod-stream)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v stunnel4 >/dev/null || missing+=(stunnel4)
    command -v wrk >/dev/null || missing+=(wrk)
    # The benchmark's HTTP/2 row: h2load and nghttp, and a C compiler for the small library that gives h2load the
    # client certificate (bench/h2load_cert.c).
    { command -v h2load >/dev/null && command -v nghttp >/dev/null; } || missing+=(nghttp2-client)
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi

    # The tools the deployment tests drive: podman, debootstrap, hadolint, kustomize, kubernetes-validate, CRD
    # models (idempotent, fast when present).
    bash deploy/ci-setup.sh

    # The package, editable, with the test extra: pytest and its plugins, hypercorn, ruff, mypy and stubs.
    python -m pip install -q --disable-pip-version-check -e '.[test]'
}

setup
