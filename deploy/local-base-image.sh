#!/usr/bin/env bash
# Make a local container base image with python3 and python3-venv, without any image registry: debootstrap a
# minimal Debian root filesystem from Debian's package mirror and import it into podman as a local image.
#
#   deploy/local-base-image.sh            # prints the image name, e.g. localhost/mtls-proxy-base:bookworm-1a2b3c4d5e6f
#
# The tag is a hash of everything that goes into the image (suite, mirror, packages, this recipe), so a rerun
# finds the image already in podman's store and returns at once. A copy of the root filesystem tarball is kept
# under $MTLS_PROXY_CACHE (default /var/cache/mtls-proxy) too, so a reset image store is refilled without a
# second debootstrap. Needs root (debootstrap), podman, debootstrap and network access to the Debian mirror.
#
# Environment: SUITE (bookworm), MIRROR (http://deb.debian.org/debian), MTLS_PROXY_CACHE.
# The image is meant for building and testing where no registry is reachable; for production prefer a
# maintained base image that receives security updates (the Dockerfile's default).
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv
CACHE=${MTLS_PROXY_CACHE:-/var/cache/mtls-proxy}
# Bump when the steps below change what ends up in the image.
RECIPE=3

log() { printf 'local-base-image: %s\n' "$*" >&2; }

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { log "$tool is not installed (bash deploy/ci-setup.sh installs it)"; exit 1; }
done

key=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "$RECIPE" "$(uname -m)" | sha256sum | cut -c1-12)
image="localhost/mtls-proxy-base:${SUITE}-${key}"
tarball="$CACHE/base-${SUITE}-${key}.tar"

if podman image exists "$image"; then
    log "cached: $image"
    echo "$image"
    exit 0
fi

if [ ! -s "$tarball" ]; then
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d /var/tmp/mtls-proxy-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs"
    start=$SECONDS
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2
    log "debootstrap took $((SECONDS - start)) s"
    # What a container never needs: package lists and archives, documentation, man pages, the apt caches.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
    "$rootfs"/usr/bin/python3 --version >&2
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
fi

log "importing $tarball as $image"
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tarball" "$image" >&2
echo "$image"
