#!/usr/bin/env bash
# The GPU device check: CUDA checkpointing of a live torch process, then the
# torch-cuda-mlp snapshot built and restored, cold start against restore (median of
# 3), then two replicas of it restored side by side on the GPU, outputs compared, and
# whether the real vLLM can run there (its CUDA build is not on those machines);
# prints a table (ci/gpu_check.py does the work). Under 8 minutes.
#
# It runs on a machine with an NVIDIA GPU, PyTorch and no internet, so what it needs
# travels with the checkout, in .gpu-check/ (ignored by git), made beforehand on a
# build machine that has run ci/setup.sh:
#
#   ci/gpu-check.sh --bundle    # here: CRIU (+ its libraries) and the wheels the GPU
#                               # machine's Python lacks (pydantic, zstandard)
#   ci/gpu-check.sh             # there: the check; carry .gpu-check along
#
# Environment: PYTHON (default python3: the one with a CUDA build of torch),
# GPU_CHECK_JSON (write the figures there too), GPU_CHECK_RUNS (default 3).
# Exit status: 0 every check passed, 1 one failed, 2 no GPU here.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu-check
# Wheels for the GPU machine's Python (3.12 there), pinned to what .venv holds here.
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 zstandard==0.25.0"

if [ "${1:-}" = "--bundle" ]; then
    set -e
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/criu/lib" "$BUNDLE/wheels"
    criu=$(command -v criu || echo /usr/local/sbin/criu)
    [ -x "$criu" ] || { echo "no criu here: run ci/setup.sh first" >&2; exit 1; }
    cp "$criu" "$BUNDLE/criu/criu"
    # Its shared libraries, but not the C library itself (the GPU machine's is newer).
    ldd "$criu" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|ld-linux)[.-]' |
        while read -r lib; do cp -L "$lib" "$BUNDLE/criu/lib/"; done
    for pyv in 3.12 3.11 3.13; do
        .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyv" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$BUNDLE/wheels" $WHEELS
    done
    grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
    du -sh "$BUNDLE"
    exit 0
fi

PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi missing or sees no device); nothing to check" >&2
    exit 2
fi
if ! "$PY" -c 'import pydantic, zstandard' 2>/dev/null; then
    [ -d "$BUNDLE/wheels" ] || { echo "gpu-check: $PY lacks pydantic/zstandard and there is no $BUNDLE/wheels" \
                                       "(run ci/gpu-check.sh --bundle on a build machine and carry $BUNDLE)" >&2; exit 1; }
    "$PY" -m pip install --quiet --no-index --no-deps --find-links "$BUNDLE/wheels" --target "$BUNDLE/site" $WHEELS \
        || exit 1
    export PYTHONPATH="$PWD/$BUNDLE/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! command -v criu >/dev/null && [ -z "${SNAPBUILD_CRIU:-}" ] && [ -x "$BUNDLE/criu/criu" ]; then
    cat > "$BUNDLE/criu/run" <<RUN
#!/bin/sh
LD_LIBRARY_PATH="$PWD/$BUNDLE/criu/lib" exec "$PWD/$BUNDLE/criu/criu" "\$@"
RUN
    chmod +x "$BUNDLE/criu/run"
    export SNAPBUILD_CRIU="$PWD/$BUNDLE/criu/run"
fi
args=(--runs "${GPU_CHECK_RUNS:-3}")
[ -n "${GPU_CHECK_JSON:-}" ] && args+=(--json "$GPU_CHECK_JSON")
exec timeout 470 env PYTHONUNBUFFERED=1 "$PY" ci/gpu_check.py "${args[@]}"
