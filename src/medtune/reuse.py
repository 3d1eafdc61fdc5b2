"""A model's outputs on a set of questions, computed once and reused by later runs.

Every run scores the base model (and, once one exists, the champion) on the same split and suites again; on a
CPU that is most of the evaluate step. What a model answers is decided by its weights, how they are loaded, the
exact prompts, the generation or scoring settings, the code that runs them and the library versions, so those
are the key: a run that changes any of them computes afresh. Only the costly outputs are kept (greedy answers,
choice log-likelihoods, answer NLLs); metrics and intervals are always recomputed from them. Kept answers are
masked as the answer files are (personal data never lands in the cache), and a fresh computation goes through
the same path, so a reused output and a recomputed one are the same value.

The store is `scores/` beside the converted models (`model.cache_dir`, or `MEDTUNE_CACHE` on a cluster's model
volume); `MEDTUNE_SCORE_CACHE` moves it. `eval.reuse_outputs: false` turns reuse off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medtune.config import Config

# the modules whose code decides an output: a change to any of them is a new key
_CODE = ("evaluate.py", "choices.py", "decoding.py", "models.py")


def store_dir(cfg: Config) -> Path | None:
    from medtune import models

    if not cfg.eval.reuse_outputs:
        return None
    return Path(os.environ.get("MEDTUNE_SCORE_CACHE") or models.cache_root(cfg.model) / "scores").expanduser()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _environment() -> dict:
    import peft
    import torch
    import transformers

    from medtune import models

    here = Path(__file__).parent
    return {"code": _digest({name: (here / name).read_text() for name in _CODE}), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "device": str(models.device()),
            "threads": torch.get_num_threads()}


def weights_identity(cfg: Config) -> dict:
    """The base model by content, and how evaluate loads it (4-bit for QLoRA, the training dtype); {} (nothing
    reused) when its files cannot be hashed: a name or a moving revision such as `main` is no identity."""
    from medtune import lineage, models

    base = lineage.base_model_record(cfg)
    if not base["sha256"]:
        return {}
    # the dtype it is loaded in, not the config's name for it: `auto` is bf16 on some CPUs and float32 on others
    return {"base": base["sha256"], "method": cfg.train.method, "dtype": str(models.compute_dtype(cfg.train)),
            "quantization": cfg.train.quantization.model_dump()}


def files_digest(directory: str | Path) -> str:
    """A trained result (adapter or whole model) by the content of its files."""
    from medtune import lineage

    return lineage.tree_digest(lineage.hash_files(Path(directory)))


@dataclass
class Outputs:
    """One model's outputs, looked up before they are computed. `root` None: always computed, nothing kept."""

    root: Path | None
    model: dict
    environment: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: Config, model: dict) -> Outputs:
        root = store_dir(cfg)
        return cls(root, model, _environment() if root else {})

    def get(self, what: str, inputs: dict, compute: Callable[[], Any]) -> Any:
        """The JSON value `compute()` returns for `inputs`, from the store when this model already computed it."""
        if self.root is None:
            return compute()
        key = _digest({"what": what.split(":")[0], "model": self.model, "inputs": inputs, "env": self.environment})
        path = self.root / key[:2] / f"{key}.json"
        try:
            value = json.loads(path.read_text())["value"]
            self.reused.append(what)
            return value
        except (OSError, ValueError, KeyError):
            pass
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole or not at all: concurrent runs may compute the same key
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            json.dump({"value": value, "what": what, "model": self.model, "created": time.time()}, fh)
        os.replace(fh.name, path)
        self.computed.append(what)
        return value
