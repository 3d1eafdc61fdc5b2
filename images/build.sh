#!/usr/bin/env bash
# Build the medtune images and tag them <version> and <version>-<git sha>.
#
#   images/build.sh                 build medtune-cpu and medtune-cuda locally
#   images/build.sh --push          build, push both tags, print the digests for the cluster profile
#   images/build.sh --lock-bases    record the base images' digests in images/bases.lock
#   images/build.sh --dry-run       print the commands instead of running them
#
# REGISTRY (default ghcr.io/medtune) picks where the images go; DOCKER (default docker) the client.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-ghcr.io/medtune}
DOCKER=${DOCKER:-docker}
PUSH=0 DRY=0 LOCK=0
for arg in "$@"; do
  case "$arg" in
    --push) PUSH=1 ;;
    --dry-run) DRY=1 ;;
    --lock-bases) LOCK=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

run() { if [ "$DRY" = 1 ]; then echo "$*"; else "$@"; fi; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SHORT_SHA=${GIT_SHA:0:12}
if [ "$GIT_SHA" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  SHORT_SHA="${SHORT_SHA}-dirty"   # never let a tag claim a commit the image was not built from
fi

base_of() { sed -n 's/^ARG BASE_IMAGE=//p' "images/Dockerfile.$1"; }
locked_base() {  # tag@digest when bases.lock has a digest for the tag, else the tag
  local tag=$1 digest
  digest=$(awk -v t="$tag" '$1 == t && $2 != "-" {print $2}' images/bases.lock)
  if [ -n "$digest" ]; then echo "${tag}@${digest}"; else echo "$tag"; fi
}

if [ "$LOCK" = 1 ]; then
  for variant in cpu cuda; do
    tag=$(base_of "$variant")
    run "$DOCKER" pull "$tag" >&2
    digest=$("$DOCKER" image inspect --format '{{index .RepoDigests 0}}' "$tag" | sed 's/.*@//')
    awk -v t="$tag" -v d="$digest" '$1 == t {$2 = d} {print}' images/bases.lock > images/bases.lock.new
    mv images/bases.lock.new images/bases.lock
    echo "$tag $digest"
  done
  exit 0
fi

for variant in cpu cuda; do
  image="${REGISTRY}/medtune-${variant}"
  run env DOCKER_BUILDKIT=1 "$DOCKER" build \
    --file "images/Dockerfile.${variant}" \
    --build-arg "BASE_IMAGE=$(locked_base "$(base_of "$variant")")" \
    --build-arg "MEDTUNE_VERSION=${VERSION}" \
    --build-arg "GIT_SHA=${GIT_SHA}" \
    --tag "${image}:${VERSION}" \
    --tag "${image}:${VERSION}-${SHORT_SHA}" \
    .
done

if [ "$PUSH" = 1 ]; then
  echo "# cluster: section of configs/qwen2.5-0.5b-qlora.yaml, then run: medtune compile"
  for variant in cpu cuda; do
    image="${REGISTRY}/medtune-${variant}"
    run "$DOCKER" push "${image}:${VERSION}" >&2
    run "$DOCKER" push "${image}:${VERSION}-${SHORT_SHA}" >&2
    if [ "$DRY" = 0 ]; then
      digest=$("$DOCKER" image inspect --format '{{index .RepoDigests 0}}' "${image}:${VERSION}" | sed 's/.*@//')
      key=$([ "$variant" = cpu ] && echo cpu_image || echo cuda_image)
      echo "  ${key}: ${image}:${VERSION}@${digest}"
    fi
  done
fi
