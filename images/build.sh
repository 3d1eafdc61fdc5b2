#!/usr/bin/env bash
# Build the medtune images from images/Dockerfile and tag them <version> and <version>-<git sha>.
#
#   images/build.sh                     build medtune-cpu and medtune-cuda
#   images/build.sh --variant cpu       build one of them
#   images/build.sh --push              build, push both tags, and pin the pushed digests where the cluster
#                                       reads them (profile's cluster: images, the MLflow kustomization),
#                                       then recompile pipelines/medtune.yaml
#   images/build.sh --lock-bases        record the base images' digests (images/bases.lock) and the torch
#                                       wheels' sha256 (images/torch.lock)
#   images/build.sh --dry-run           print the build/push commands instead of running them
# Options for builds where the defaults cannot be reached (scripts/test-images uses them):
#   --base REF            base image instead of the Dockerfile's (one variant)
#   --torch-wheel FILE    a local torch wheel instead of downloading it from PyTorch's index (one variant);
#                         its sha256 must still be in images/torch.lock
#   --ca-bundle FILE      CA certificates the build's pip trusts (mounted read-only; podman/buildah)
#
# Environment: REGISTRY (default ghcr.io/medtune) names the images; DOCKER picks the client (default: docker
# when a daemon answers, else podman, else buildah); PROFILE the profile --push pins the images in (default
# configs/qwen2.5-0.5b-qlora.yaml). --push needs medtune installed (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-ghcr.io/medtune}
PROFILE=${PROFILE:-configs/qwen2.5-0.5b-qlora.yaml}
PUSH=0 DRY=0 LOCK=0 VARIANTS="cpu cuda" BASE="" WHEEL="" CA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --push) PUSH=1 ;;
    --dry-run) DRY=1 ;;
    --lock-bases) LOCK=1 ;;
    --variant) VARIANTS=$2; shift ;;
    --base) BASE=$2; shift ;;
    --torch-wheel) WHEEL=$(realpath "$2"); shift ;;
    --ca-bundle) CA=$(realpath "$2"); shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$BASE$WHEEL" ] && [ "$VARIANTS" = "cpu cuda" ]; then
  echo "--base and --torch-wheel apply to one image: add --variant cpu or --variant cuda" >&2; exit 2
fi

run() { if [ "$DRY" = 1 ]; then echo "$*"; else "$@"; fi; }

if [ -z "${DOCKER:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then DOCKER=docker
  elif command -v podman >/dev/null; then DOCKER=podman
  elif command -v buildah >/dev/null; then DOCKER=buildah
  elif [ "$DRY" = 1 ]; then DOCKER=docker
  else echo "no image builder: need a Docker daemon, podman or buildah" >&2; exit 1
  fi
fi

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
TORCH_VERSION=$(sed -n 's/^torch==//p' images/constraints.txt)
GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SHORT_SHA=${GIT_SHA:0:12}
if [ "$GIT_SHA" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  SHORT_SHA="${SHORT_SHA}-dirty"   # never let a tag claim a commit the image was not built from
fi

# Per variant: base image, PyTorch wheel index (the PyPI torch for Linux is the CUDA build), Python of the base.
default_base() { case "$1" in cpu) echo python:3.12.12-slim-bookworm ;; cuda) echo nvidia/cuda:13.0.2-base-ubuntu24.04 ;; esac; }
torch_local() { case "$1" in cpu) echo cpu ;; cuda) echo cu130 ;; esac; }
locked() { awk -v k="$2" '$1 == k && $2 != "-" {print $2}' "$1"; }
locked_base() {  # tag@digest when bases.lock has a digest for the tag, else the tag
  local digest; digest=$(locked images/bases.lock "$1")
  if [ -n "$digest" ]; then echo "$1@$digest"; else echo "$1"; fi
}
set_lock() {  # set_lock FILE KEY VALUE: replace KEY's value, or append the line
  awk -v k="$2" -v v="$3" '$1 == k {$2 = v; found = 1} {print} END {if (!found) print k, v}' "$1" > "$1.new"
  mv "$1.new" "$1"
}
digest_of() {  # the registry digest of a pushed or pulled image
  "$DOCKER" image inspect --format '{{index .RepoDigests 0}}' "$1" | sed 's/.*@//'
}

fetch_torch() {  # fetch_torch VARIANT DIR: the variant's torch wheel into DIR (PyPI-style pip download)
  local local_tag; local_tag=$(torch_local "$1")
  run python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_28_x86_64 --index-url "https://download.pytorch.org/whl/${local_tag}" \
    --dest "$2" "torch==${TORCH_VERSION}+${local_tag}"
}

if [ "$LOCK" = 1 ]; then
  for variant in $VARIANTS; do
    tag=$(default_base "$variant")
    run "$DOCKER" pull "$tag" >&2
    [ "$DRY" = 1 ] || { set_lock images/bases.lock "$tag" "$(digest_of "$tag")"; echo "$tag $(locked images/bases.lock "$tag")"; }
    dir=$(mktemp -d); fetch_torch "$variant" "$dir"
    for wheel in "$dir"/torch-*.whl; do
      [ -e "$wheel" ] || continue
      set_lock images/torch.lock "$(basename "$wheel")" "sha256:$(sha256sum "$wheel" | cut -d' ' -f1)"
      echo "$(basename "$wheel") $(locked images/torch.lock "$(basename "$wheel")")"
    done
    rm -rf "$dir"
  done
  # The one other base image the manifests run (the model cache's init Job).
  run "$DOCKER" pull busybox:1.37.0 >&2
  if [ "$DRY" = 0 ]; then
    set_lock images/bases.lock busybox:1.37.0 "$(digest_of busybox:1.37.0)"
    sed -i -E "s|image: busybox:1\.37\.0(@sha256:[0-9a-f]+)?|image: busybox:1.37.0@$(locked images/bases.lock busybox:1.37.0)|" \
      manifests/runs/cache-init-job.yaml
  fi
  exit 0
fi

stage_torch() {  # build/torch-wheel/: the wheel and torch.txt, its pin and locked hash for pip --require-hashes
  local variant=$1 stage=build/torch-wheel wheel name hash want
  if [ "$DRY" = 1 ]; then [ -n "$WHEEL" ] || fetch_torch "$variant" "$stage"; return 0; fi
  rm -rf "$stage"; mkdir -p "$stage"
  if [ -n "$WHEEL" ]; then cp "$WHEEL" "$stage/"; else fetch_torch "$variant" "$stage"; fi
  wheel=$(ls "$stage"/torch-*.whl); name=$(basename "$wheel")
  hash="sha256:$(sha256sum "$wheel" | cut -d' ' -f1)"
  want=$(locked images/torch.lock "$name")
  if [ -z "$want" ]; then
    echo "$name is not in images/torch.lock: record it with images/build.sh --lock-bases (or add its sha256)" >&2
    exit 1
  elif [ "$want" != "$hash" ]; then
    echo "$name: sha256 is $hash, images/torch.lock says $want" >&2; exit 1
  fi
  echo "torch==${TORCH_VERSION}+$(torch_local "$variant") --hash=$hash" > "$stage/torch.txt"
}

for variant in $VARIANTS; do
  image="${REGISTRY}/medtune-${variant}"
  base=${BASE:-$(locked_base "$(default_base "$variant")")}
  stage_torch "$variant"
  extra=()
  case "$DOCKER" in
    docker) build=(env DOCKER_BUILDKIT=1 docker build) ;;
    podman) build=(podman build --network host --ignorefile images/Dockerfile.dockerignore) ;;
    buildah) build=(buildah bud --network host --ignorefile images/Dockerfile.dockerignore) ;;
    *) build=("$DOCKER" build) ;;
  esac
  if [ -n "$CA" ]; then
    [ "$DOCKER" = docker ] && { echo "--ca-bundle needs podman or buildah (docker build mounts no volumes)" >&2; exit 2; }
    extra+=(--volume "$CA:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  run "${build[@]}" "${extra[@]}" \
    --file images/Dockerfile \
    --build-arg "BASE_IMAGE=${base}" \
    --build-arg "VARIANT=${variant}" \
    --build-arg "MEDTUNE_VERSION=${VERSION}" \
    --build-arg "GIT_SHA=${GIT_SHA}" \
    --tag "${image}:${VERSION}" \
    --tag "${image}:${VERSION}-${SHORT_SHA}" \
    .
  [ "$DRY" = 1 ] || rm -rf build/torch-wheel
done

if [ "$PUSH" = 1 ]; then
  pins=()
  for variant in $VARIANTS; do
    image="${REGISTRY}/medtune-${variant}"
    digestfile=$(mktemp)
    if [ "$DOCKER" = docker ]; then
      run docker push "${image}:${VERSION}" >&2
      [ "$DRY" = 1 ] || digest_of "${image}:${VERSION}" > "$digestfile"
    else  # podman's RepoDigests name its local manifest, not necessarily the one the registry stored
      run "$DOCKER" push --digestfile "$digestfile" "${image}:${VERSION}" >&2
    fi
    run "$DOCKER" push "${image}:${VERSION}-${SHORT_SHA}" >&2
    [ "$DRY" = 1 ] || pins+=("${variant}=${image}:${VERSION}@$(cat "$digestfile")")
    rm -f "$digestfile"
  done
  # The cluster pulls by digest: the profile's cluster: images (compiled into pipelines/medtune.yaml) and
  # the MLflow Deployment's image (the CPU one).
  printf '%s\n' "${pins[@]}"
  run python3 -m medtune.images "$PROFILE" manifests/mlflow/kustomization.yaml "${pins[@]}"
  run medtune compile
fi
