"""Container images the compiled pipeline runs in (built from `images/` by `make images`).

The components name these defaults; `medtune/pipeline.py` replaces them per task with the images in the
profile's `cluster:` section (`cluster.cpu_image`, `cluster.cuda_image`), which `make images` prints with
their registry digests so the compiled YAML pins `repository:tag@sha256:...`. `place` also hands each task
its image in $MEDTUNE_IMAGE, so a step records the image its pod runs, not what a config says.
"""

from __future__ import annotations

import os

from medtune import __version__

REGISTRY = "ghcr.io/medtune"
CPU_IMAGE = f"{REGISTRY}/medtune-cpu:{__version__}"
GPU_IMAGE = f"{REGISTRY}/medtune-cuda:{__version__}"
# repository[:port/path]:tag[@sha256:digest]; group 1 is the tag (required: an image needs a pin).
IMAGE_REF = r"^[a-z0-9][a-z0-9._/:-]*?:([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(@sha256:[0-9a-f]{64})?$"
ENV = "MEDTUNE_IMAGE"


def runner() -> str:
    """Where this step runs: "kubernetes" in a KFP task pod (the launcher sets KFP_POD_NAME), else "kfp.local",
    which runs every task in the current virtualenv whatever image the DAG names."""
    return "kubernetes" if os.environ.get("KFP_POD_NAME") else "kfp.local"


def current() -> str | None:
    """The image this step's pod runs; None under kfp.local, where no image ran and naming one would lie."""
    return os.environ.get(ENV) if runner() == "kubernetes" else None
