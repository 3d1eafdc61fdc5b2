# Container images for the cluster (images/); see "Run on Kubeflow" in README.md.
REGISTRY ?= ghcr.io/medtune

.PHONY: images images-push constraints test-images

images:  ## build medtune-cpu and medtune-cuda, tagged <version> and <version>-<git sha>
	REGISTRY=$(REGISTRY) images/build.sh

images-push:  ## build, push, and print the digests to paste into the cluster profile
	REGISTRY=$(REGISTRY) images/build.sh --push

constraints:  ## re-resolve images/constraints.txt (requirements.lock for Linux x86_64, Python 3.12) and its hashed lists; needs uv
	uv pip compile pyproject.toml --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
	  -c requirements.lock --index-url https://pypi.org/simple --no-emit-package medtune --no-annotate \
	  --custom-compile-command "make constraints" -q -o images/constraints.txt
	python3 images/hashes.py

test-images:  ## build medtune-cpu with podman and run the compiled DAG in it (as root; see scripts/test-images)
	scripts/test-images
