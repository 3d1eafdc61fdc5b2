"""Library output that is only noise in a step's log, silenced at its source.

Scoped to the libraries that print it (by module or logger name and message), never to medtune's own
warnings. Progress bars of downloads and dataset maps are off: `medtune run` shows the step's own progress.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def library_noise_off() -> None:
    # Deprecation notices about transformers' own internals (e.g. is_gradient_checkpointing in v5).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    # bitsandbytes tries an optional Hub kernel on AVX512-BF16 CPUs; the Hub is often unreachable and the
    # built-in kernel is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _Drop("Failed to load CPU gemm_4bit_forward from kernels-community"))
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # "Loading weights" bars (a second per model, hundreds of lines per run): transformers reads the variable above
    # when it is imported; only an already imported one is told. Importing it here would cost every step that
    # never loads a model (gate, register, audit...) over a second.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()
