#!/usr/bin/env bash
# `make demo`: the main job end to end on local defaults.
#  1. the generic pipeline, built twice (the second time entirely from the cache)
#  2. torch-mlp: torch 2.13 CPU serving a ~400 MB MLP, warmed up and checkpointed with
#     CRIU, restored by the runner, queried, then cold boot vs restore benchmarked
# Needs root (CRIU); ci/setup.sh (run by `make demo`) installs what is missing.
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

step "torch-mlp: build (first time: installs torch into the store, ~1 min; then cached)"
$sb build recipes/examples/torch-mlp.yaml --progress plain
$sb inspect torch-mlp:dev

step "restore it with the runner and query it"
out=$($runner restore torch-mlp:dev --json)
pid=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])' <<<"$out")
python3 -c 'import json,sys; r=json.load(sys.stdin); print("mode:", r["mode"], "| timings:", r["timings"])' <<<"$out"
port=$(grep -E '^  port:' recipes/examples/torch-mlp.yaml | awk '{print $2}')
curl -s -X POST "http://127.0.0.1:$port/infer" -d '{}'; echo
$runner stop "$pid"

step "cold boot vs restore (medians of 3, alternated)"
$sb bench torch-mlp:dev --runs 3
