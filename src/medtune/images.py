"""Container images the compiled pipeline runs in (built from `images/` by `make images`).

The components name these defaults; `medtune/pipeline.py` replaces them per task with the images in the
profile's `cluster:` section (`cluster.cpu_image`, `cluster.cuda_image`), which `make images` prints with
their registry digests so the compiled YAML pins `repository:tag@sha256:...`.
"""

from __future__ import annotations

import os
import re

from medtune import __version__

REGISTRY = "ghcr.io/medtune"
CPU_IMAGE = f"{REGISTRY}/medtune-cpu:{__version__}"
GPU_IMAGE = f"{REGISTRY}/medtune-cuda:{__version__}"

_REF = re.compile(r"^(?P<repository>[a-z0-9][a-z0-9._/:-]*?):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
                  r"(@(?P<digest>sha256:[0-9a-f]{64}))?$")


def parse(ref: str) -> dict[str, str | None]:
    """Split `repository:tag[@sha256:...]`; raise ValueError for a reference without a tag."""
    match = _REF.match(ref)
    if not match:
        raise ValueError(f"{ref}: expected repository:tag[@sha256:<64 hex>]")
    return match.groupdict()


def pinned(ref: str, digest: str | None) -> str:
    """`repository:tag@digest`: the tag stays for people, the digest is what the kubelet pulls."""
    parts = parse(ref)
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError(f"{digest}: expected sha256:<64 hex>")
    digest = digest or parts["digest"]
    return f"{parts['repository']}:{parts['tag']}" + (f"@{digest}" if digest else "")


def runner() -> str:
    """Where this step runs: "kubernetes" in a KFP task pod (the launcher sets KFP_POD_NAME), else "kfp.local",
    which runs every task in the current virtualenv whatever image the DAG names."""
    return "kubernetes" if os.environ.get("KFP_POD_NAME") else "kfp.local"


def ran_in(cpu_image: str, gpu_image: str) -> dict[str, str] | None:
    """The images the DAG's tasks ran in; None under kfp.local, where no image ran and naming one would lie."""
    return {"cpu": cpu_image, "gpu": gpu_image} if runner() == "kubernetes" else None


def tags(cpu_image: str, gpu_image: str) -> dict[str, str]:
    """MLflow tags for where a run's steps ran: the runner, and the images when there were any."""
    ran = ran_in(cpu_image, gpu_image) or {}
    return {"medtune.runner": runner(), **{f"medtune.image.{kind}": ref for kind, ref in ran.items()}}
