#!/usr/bin/env bash
# Build a recipe in CI and publish its snapshot, signed: what the GitHub Actions
# workflow (ci/github-actions/snapshot.yml) runs, and what any other CI can run.
#
#   ci/publish-snapshot.sh RECIPE [--set NAME=VALUE ...]
#
# Environment:
#   SNAPBUILD_PUBLISH_TO   registry to push the snapshot to (oci://, s3:// or file://)  required
#   SNAPBUILD_CACHE        registry of the shared build cache (default: the same registry)
#   SNAPBUILD_SIGNING_KEY  the ed25519 private key (PEM text, or a file's path)         required
#   SNAPBUILD_TAG          NAME:TAG to publish (default: the recipe's publish.tag)
# Credentials come from the usual places (SNAPBUILD_REGISTRY_USERNAME/PASSWORD,
# docker/podman login files, the AWS credential chain).
# The shared cache is trusted only where this key signed it: the build signs every entry
# it sends (--sign-key) and takes only entries signed so (--cache-trust, the public key,
# derived with openssl), so a job that can write the cache but lacks the key (a pull
# request's CI) cannot put its code into a signed snapshot; `snapbuild sign` refuses
# a snapshot with steps from an unverified cache.
# Prints the build's JSON result on stdout; exit status is snapbuild's.
set -euo pipefail
recipe=${1:?usage: ci/publish-snapshot.sh RECIPE [--set NAME=VALUE ...]}
shift
: "${SNAPBUILD_PUBLISH_TO:?set SNAPBUILD_PUBLISH_TO to the registry to publish to}"
: "${SNAPBUILD_SIGNING_KEY:?set SNAPBUILD_SIGNING_KEY to the signing key (PEM text or a path)}"
cache=${SNAPBUILD_CACHE:-$SNAPBUILD_PUBLISH_TO}
sb=${SNAPBUILD:-snapbuild}

scratch=$(mktemp -d)  # mode 0700: the key's files are private for the time of the job
trap 'rm -rf "$scratch"' EXIT
key=$SNAPBUILD_SIGNING_KEY
if [ ! -f "$key" ]; then  # PEM text from a CI secret
    (umask 077 && printf '%s\n' "$SNAPBUILD_SIGNING_KEY" > "$scratch/key")
    key=$scratch/key
fi
pub=$scratch/key.pub
openssl pkey -in "$key" -pubout -out "$pub"
tag_args=()
[ -n "${SNAPBUILD_TAG:-}" ] && tag_args=(--tag "$SNAPBUILD_TAG")

result=$("$sb" build "$recipe" "$@" "${tag_args[@]}" --cache-from "$cache" --cache-trust "$pub" \
         --cache-to "$cache" --sign-key "$key" --push "$SNAPBUILD_PUBLISH_TO" --progress plain --json)
printf '%s\n' "$result"
tag=$(printf '%s' "$result" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("tag") or d["builds"][0]["tag"])')
"$sb" sign "$tag" --key "$key" --registry "$SNAPBUILD_PUBLISH_TO" >&2
