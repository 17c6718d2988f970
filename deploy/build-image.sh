#!/usr/bin/env bash
# Build the mtls-proxy container image with podman (or buildah), no Docker engine needed.
#
#   deploy/build-image.sh                          # FROM the Dockerfile's default base (needs a registry)
#   deploy/build-image.sh --local-base             # FROM a Debian base made here by deploy/local-base-image.sh
#   deploy/build-image.sh --tag mtls-proxy:dev --base-image registry.example/python:3.11-slim
#
# --isolation chroot builds without a container runtime or user namespaces, so it also works inside a VM or a
# CI job that cannot start nested containers. The image is written in Docker format: the OCI format has no
# HEALTHCHECK. Prints the image name on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=localhost/mtls-proxy:dev
base=
local_base=0
while [ $# -gt 0 ]; do
    case $1 in
        --tag|-t) tag=$2; shift 2 ;;
        --base-image) base=$2; shift 2 ;;
        --local-base) local_base=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-image: unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ "$local_base" = 1 ]; then
    base=$(bash deploy/local-base-image.sh | tail -n 1)
fi

args=(--format docker --isolation chroot --tag "$tag"
      --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
      --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
      --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
[ -n "${PIP_INDEX_URL:-}" ] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
# The CA bundle this machine trusts goes into the build as a secret, so pip inside the build trusts the same
# CAs (a TLS-intercepting proxy's, a private index's); it is not stored in the image. First found of:
# $MTLS_PROXY_BUILD_CA_BUNDLE, $PIP_CERT, $SSL_CERT_FILE, $REQUESTS_CA_BUNDLE, Debian's system bundle.
ca_bundle=
for candidate in "${MTLS_PROXY_BUILD_CA_BUNDLE:-}" "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" \
                 /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -s "$candidate" ]; then ca_bundle=$candidate; break; fi
done
[ -n "$ca_bundle" ] && args+=(--secret "id=ca-bundle,src=$ca_bundle")

if command -v podman >/dev/null; then
    builder=(podman build)
elif command -v buildah >/dev/null; then
    builder=(buildah bud)
else
    echo "build-image: neither podman nor buildah is installed (bash deploy/ci-setup.sh installs both)" >&2
    exit 1
fi
echo "build-image: ${builder[*]} ${args[*]} ." >&2
"${builder[@]}" "${args[@]}" . >&2
echo "$tag"
