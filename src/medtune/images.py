"""Container images the compiled pipeline runs in (built from `images/` by `make images`).

The components name these defaults; `medtune/pipeline.py` replaces them per task with the images in the
profile's `cluster:` section (`cluster.cpu_image`, `cluster.cuda_image`), which `make images` prints with
their registry digests so the compiled YAML pins `repository:tag@sha256:...`. `place` also hands each task
its image in $MEDTUNE_IMAGE, so a step records the image its pod runs, not what a config says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medtune import __version__

REGISTRY = "ghcr.io/medtune"
CPU_IMAGE = f"{REGISTRY}/medtune-cpu:{__version__}"
GPU_IMAGE = f"{REGISTRY}/medtune-cuda:{__version__}"
# repository[:port/path]:tag[@sha256:digest]; group 1 is the tag (required: an image needs a pin).
IMAGE_REF = r"^[a-z0-9][a-z0-9._/:-]*?:([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(@sha256:[0-9a-f]{64})?$"
ENV = "MEDTUNE_IMAGE"


# Set by images/Dockerfile: a process that sees it runs in one of our images.
VARIANT_ENV = "MEDTUNE_IMAGE_VARIANT"


def runner() -> str:
    """Where this step runs: "kubernetes" in a KFP task pod (the launcher sets KFP_POD_NAME), "container" in
    one of our images outside Kubernetes (kfp.local.DockerRunner, as scripts/test-images runs it), else
    "kfp.local", which runs every task in the current virtualenv whatever image the DAG names."""
    if os.environ.get("KFP_POD_NAME"):
        return "kubernetes"
    return "container" if os.environ.get(VARIANT_ENV) else "kfp.local"


def current() -> str | None:
    """The image this step runs in; None under kfp.local's SubprocessRunner, where no image ran and naming one
    would lie."""
    return os.environ.get(ENV) if runner() != "kfp.local" else None


def pin(refs: dict[str, str], profile: Path, kustomization: Path) -> None:
    """Write pushed image references (`repository:tag@sha256:...`, by variant "cpu"/"cuda") where the cluster
    reads them: the profile's `cluster:` images (then `medtune compile` pins them in the compiled DAG) and,
    for the CPU image, the MLflow Deployment's kustomization (`newTag: <tag>@<digest>`, which kustomize
    writes as `name:tag@digest`). Lines are replaced or added in place so the files keep their comments."""
    text = profile.read_text()
    for variant, ref in refs.items():
        match = re.match(IMAGE_REF, ref)
        if not match or not match.group(2):
            raise ValueError(f"{ref}: pin by digest (repository:tag@sha256:...)")
        text, found = re.subn(rf"^(  {variant}_image:) .*$", lambda m: f"{m[1]} {ref}", text, flags=re.M)
        if not found:  # after the section's comments, replacing an empty `{}`
            text, found = re.subn(r"^(cluster:.*\n(?:  #.*\n)*)(  \{\}\n)?", lambda m: f"{m[1]}  {variant}_image: {ref}\n",
                                  text, count=1, flags=re.M)
        if not found:
            raise ValueError(f"{profile}: no cluster: section to pin {variant}_image in")
    profile.write_text(text)
    if "cpu" in refs:
        repository, _, rest = refs["cpu"].rpartition(":")
        tag = rest  # "<tag>@sha256:..."
        text = kustomization.read_text()
        entry = re.compile(rf"^(  - name: {re.escape(f'{REGISTRY}/medtune-cpu')}\b.*\n)((?:    .*\n)*)", re.M)
        if not entry.search(text):
            raise ValueError(f"{kustomization}: no images entry for {REGISTRY}/medtune-cpu")
        fields = f"    newName: {repository}\n" if repository != f"{REGISTRY}/medtune-cpu" else ""
        kustomization.write_text(entry.sub(lambda m: m[1] + fields + f"    newTag: {tag}\n", text, count=1))


if __name__ == "__main__":  # images/build.sh --push: python -m medtune.images PROFILE KUSTOMIZATION cpu=REF cuda=REF
    import sys

    pin(dict(arg.split("=", 1) for arg in sys.argv[3:]), Path(sys.argv[1]), Path(sys.argv[2]))
