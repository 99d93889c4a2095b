#!/usr/bin/env bash
# `make demo`: build the example pipeline twice in a fresh store (the second build
# comes entirely from the cache), then show and pull the published snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
export SNAPBUILD_HOME=${SNAPBUILD_DEMO_HOME:-$PWD/.snapbuild/demo}
rm -rf "$SNAPBUILD_HOME"
sb=.venv/bin/snapbuild
recipe=recipes/examples/pipeline.yaml

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "plan (fresh store: everything runs)"
$sb plan $recipe
step "build"
$sb build $recipe --progress plain
step "build again (all cached)"
$sb build $recipe --progress plain
step "what is in the registry"
$sb ls
$sb inspect pipeline:1.0
step "pull it like a node would"
rm -rf "$SNAPBUILD_HOME/pulled"
SNAPBUILD_HOME=$SNAPBUILD_HOME/node .venv/bin/snapbuild-runner pull pipeline:1.0 \
    --registry "file://$SNAPBUILD_HOME/registry" --dest "$SNAPBUILD_HOME/pulled"
cat "$SNAPBUILD_HOME/pulled/bundle/bundle/VERSION"
