"""Container images the compiled pipeline runs in (built from `images/`)."""

from medtune import __version__

CPU_IMAGE = f"ghcr.io/medtune/medtune-cpu:{__version__}"
GPU_IMAGE = f"ghcr.io/medtune/medtune-cuda:{__version__}"
