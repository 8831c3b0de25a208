#!/usr/bin/env bash
# A base image for the Dockerfile made without an image registry: Debian 12 with Python 3.11 and its
# venv module, like python:3.11-slim-bookworm, bootstrapped from the machine's Debian mirror into a
# cached tarball outside the repository, then imported into podman. Prints the image's name.
# Needs root (debootstrap; installed with apt-get when missing) and podman. About a minute and
# 180 MB the first time; afterwards the tarball (or the image already imported) is reused.
# Set BASE_IMAGE_CACHE to move the cache.
set -euo pipefail
image=localhost/orders-base:bookworm
cache=${BASE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orders-base}
tarball=$cache/debian-12-python3.tar
say() { echo "base-image.sh: $*" >&2; }

command -v podman >/dev/null || { say "needs podman (apt-get install podman)"; exit 1; }
# One build at a time: a second caller waits, then reuses the first one's.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if podman image exists "$image"; then
  echo "$image"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  [ "$(id -u)" = 0 ] || { say "needs root to bootstrap a Debian root file system"; exit 1; }
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  # The machine's own Debian mirror, from its apt sources.
  mirror=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$root" "$tarball.tmp"' EXIT
  say "bootstrapping Debian 12 with python3 from $mirror (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
say "importing $tarball as $image"
podman import --quiet --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV=LANG=C.UTF-8' "$tarball" "$image" >/dev/null
echo "$image"
