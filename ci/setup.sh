#!/usr/bin/env bash
# Installs what snapbuild needs to build and test on a fresh Debian machine.
# Idempotent: a second run with nothing to do takes about a second.
#
#   ci/setup.sh            # venv + package + test dependencies
#
# Environment:
#   PYTHON   interpreter used to create .venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.snapbuild-setup

# The stamp records the inputs of the Python install; when they are unchanged the
# install is skipped entirely (pip's own no-op check costs several seconds).
want=$(cat pyproject.toml ci/setup.sh | sha256sum | cut -d' ' -f1)

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: snapbuild needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1 || echo missing)" >&2
    echo "setup: set PYTHON=/path/to/python3.11 and run again" >&2
    exit 1
fi

# Debian splits venv/ensurepip out of python3; install it when missing.
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup: installing python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

# System packages the tests use for real (not mocks). Root only; elsewhere say what
# is missing and carry on, so `make test` still explains what to install.
#   docker.io   image steps (the Docker engine; tests start a private dockerd)
#   runc        container checkpoints (engine runc)
#   mmdebstrap  base root filesystems for the container examples (ci/make-rootfs.sh)
#   iproute2    network namespaces for containers
#   podman      the peer that the container benchmark compares against
#   skopeo      OCI interoperability checks
#   docker-registry  a real OCI registry on 127.0.0.1 for the tests
#   systemd     systemd-analyze checks the node agent's unit file (runners/systemd)
#   erofs-utils mkfs.erofs: tree images, so nodes mount big trees instead of writing them out
#   openssl     ci/publish-snapshot.sh derives the cache's trusted public key from the signing key
#   libseccomp2 the io_uring deny filter of warm-ups and cold boots (runtime/seccomp.py, via pyseccomp)
SYSTEM_PACKAGES=(skopeo docker.io runc mmdebstrap iproute2 podman docker-registry systemd erofs-utils openssl libseccomp2)
missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages: ${missing[*]} (run ci/setup.sh as root to install them)" >&2
    fi
fi
if [ "$(id -u)" = 0 ]; then
    ci/install-criu.sh
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing snapbuild and its test dependencies into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    echo "$want" > "$stamp"
else
    echo "setup: $VENV is up to date"
fi
