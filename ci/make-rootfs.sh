#!/usr/bin/env bash
# Makes a Debian root filesystem tarball with mmdebstrap, once per package list, and
# prints its path. The container examples and tests use it as their base image.
#
#   ci/make-rootfs.sh [SUITE] [PACKAGES]      # default: bookworm python3,python3-numpy
#
# The tarball is cached as $SNAPBUILD_ROOTFS_CACHE/<suite>-<packages>.tar (default
# ${XDG_CACHE_HOME:-~/.cache}/snapbuild/rootfs): the suite and the package list are its
# key. mmdebstrap takes its mirror from its own default (the one apt uses here).
# About 40 s the first time; instant after.
set -euo pipefail
suite=${1:-bookworm}
packages=${2:-python3,python3-numpy}
cache=${SNAPBUILD_ROOTFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/snapbuild/rootfs}
out="$cache/$suite-${packages//,/-}.tar"
if [ -f "$out" ] && [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
if ! command -v mmdebstrap >/dev/null; then
    echo "make-rootfs: mmdebstrap is not installed (run ci/setup.sh as root)" >&2
    exit 1
fi
mkdir -p "$cache"
tmp="$cache/.partial-$$-$(basename "$out")"   # mmdebstrap picks the format by the .tar suffix
trap 'rm -f "$tmp"' EXIT
echo "make-rootfs: building $suite with $packages (about 40 s, once)" >&2
mmdebstrap --quiet --variant=apt --include="$packages" "$suite" "$tmp" >&2
mv "$tmp" "$out"   # only complete tarballs appear under their name
echo "$out"
