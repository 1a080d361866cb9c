#!/usr/bin/env bash
# Build a minimal Debian image locally, for machines that cannot pull from
# Docker Hub: debootstrap a root file system from the Debian mirror, then
# `docker import` it. The images' Dockerfile installs Python and torch on top
# when the base has none (docs/deployment.md, "Images without Docker Hub").
#
#   deploy/docker/debian-base.sh            # builds $DEBIAN_BASE_IMAGE once
#   FORCE=1 deploy/docker/debian-base.sh    # rebuilds it
#
# Needs root (debootstrap), and a Docker engine (deploy/docker/with-dockerd.sh).
set -euo pipefail

image="${DEBIAN_BASE_IMAGE:-clsp-positives-debian:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image is already built (FORCE=1 rebuilds it)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "debootstrap needs root: run this as root" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap) >/dev/null
fi

rootfs="$(mktemp -d /tmp/clsp-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "debootstrap $suite from $mirror (a few minutes)"
# minbase: only the Essential and Priority: required packages (apt, bash,
# coreutils, passwd...), about 150 MB unpacked.
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  exit 1
}
# Security updates too (debootstrap writes only the main suite), and no
# package caches or lists in the image: the Dockerfile runs apt-get update.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main
SOURCES
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  --message "debootstrap --variant=minbase $suite $mirror" \
  - "$image"
echo "built $image"
