#!/usr/bin/env bash
# Makes sure a `criu` >= 4.2 that passes `criu check` is on PATH, built with this
# project's patches (ci/criu-patches: `criu restore --thp-fill`, docs/runner.md).
#
# Debian 12 ships CRIU 3.17, which fails on current kernels ("Unexpected rt vDSO area
# bounds"), and 4.1 cannot dump TCP sockets on kernels >= 6.16. So unless this script
# already installed a criu from the current patches, it fetches the source package
# from Debian's `sid` suite through apt's own configured mirror (never a hard-coded
# host), applies the patches, builds only the criu binary (about 40 s on 2 cores) and
# installs it as /usr/local/sbin/criu. A second run finds it and does nothing.
#
# A patch that does not apply to the version Debian has is left out, with a warning
# (snapbuild asks `criu --help` and restores without the option). Where a good enough
# criu is installed already and the build cannot be done (not root, no mirror), that
# criu is kept, with a warning.
set -euo pipefail

MIN_VERSION=4.2
CACHE=${SNAPBUILD_SETUP_CACHE:-/var/cache/snapbuild-setup}
PATCHES=$(cd "$(dirname "$0")" && pwd)/criu-patches

criu_works() {  # a criu >= MIN_VERSION that passes criu check
    command -v criu >/dev/null 2>&1 || return 1
    local v
    v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$MIN_VERSION" || return 1
    # criu prints a harmless rlimit error in sandboxes; judge by the exit status.
    criu check >/dev/null 2>&1
}

marker() {  # what this script leaves once it installed a criu from these patches
    echo "$CACHE/criu/installed-$(cat "$PATCHES"/*.patch 2>/dev/null | sha256sum | cut -c1-16)"
}

if criu_works && [ -e "$(marker)" ]; then
    echo "setup: $(criu --version | head -1) passes criu check"
    exit 0
fi
had=false
criu_works && had=true
keep() {  # $1: why the installed criu stays as it is
    echo "setup: warning: $1; keeping $(command -v criu) ($(criu --version | head -1)) as it is" >&2
    exit 0
}
if [ "$(id -u)" != 0 ]; then
    $had && keep "building CRIU with ci/criu-patches needs root"
    echo "setup: building CRIU needs root (apt-get, /usr/local/sbin); run as root: sudo ci/install-criu.sh" >&2
    exit 1
fi

build() {
    echo "setup: building CRIU >= $MIN_VERSION from Debian's source package"
    export DEBIAN_FRONTEND=noninteractive
    deps=(build-essential patch pkgconf xz-utils libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
          libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
          protobuf-compiler uuid-dev python3-protobuf iproute2)
    missing=()
    for p in "${deps[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi

    # A private apt source list for sid's deb-src, derived from the mirror the system
    # already uses (deb822 .sources or one-line .list format).
    mirror=$( { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}';
                 cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '/^deb / {print $2}'; } \
              | grep -v -- '-security' | head -1 || true)
    if [ -z "$mirror" ]; then
        echo "setup: cannot find a Debian mirror in /etc/apt/sources.list*; add one and rerun" >&2
        exit 1
    fi
    work=$CACHE/criu
    mkdir -p "$work/lists/partial"
    echo "deb-src $mirror sid main" > "$work/sid.list"
    aptsid=(-o "Dir::Etc::SourceList=$work/sid.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$work/lists")
    apt-get "${aptsid[@]}" update -qq
    cd "$work"
    rm -rf src && mkdir src && cd src
    # Only the upstream tarball is needed (the .debian part is not used, and may 404).
    apt-get "${aptsid[@]}" source --download-only criu >/dev/null 2>&1 || true
    orig=$(ls criu_*.orig.tar.* 2>/dev/null | head -1)
    if [ -z "$orig" ]; then
        echo "setup: could not download CRIU's source package from $mirror (suite sid)" >&2
        exit 1
    fi
    version=$(echo "$orig" | sed -E 's/^criu_([0-9.]+)\.orig.*/\1/')
    if ! dpkg --compare-versions "$version" ge "$MIN_VERSION"; then
        echo "setup: Debian sid has CRIU $version, older than $MIN_VERSION" >&2
        exit 1
    fi
    tar xf "$orig"
    cd criu-"$version"
    for p in "$PATCHES"/*.patch; do
        if patch -p1 --forward --quiet --dry-run <"$p" >/dev/null 2>&1; then
            patch -p1 --forward --quiet <"$p" >/dev/null
            echo "setup: applied $(basename "$p") to CRIU $version"
        else
            echo "setup: warning: $(basename "$p") does not apply to CRIU $version; building without it" >&2
        fi
    done
    make -j"$(nproc)" criu >build.log 2>&1 || { tail -30 build.log >&2; exit 1; }
    if ! ./criu/criu check >/dev/null 2>&1; then  # checked before it replaces a working one
        echo "setup: the freshly built criu $version does not pass 'criu check':" >&2
        ./criu/criu check >&2 || true
        exit 1
    fi
    install -m 0755 criu/criu /usr/local/sbin/criu
    hash -r
    criu_works
    rm -f "$CACHE"/criu/installed-*
    touch "$(marker)"
    echo "setup: installed $(criu --version | head -1) as /usr/local/sbin/criu"
}

set +e
(set -e; build)
rc=$?
set -e
if [ $rc != 0 ]; then
    $had && keep "the build of CRIU with ci/criu-patches failed (above)"
    exit $rc
fi
