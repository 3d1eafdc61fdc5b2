"""Shared fixtures: a tiny random Llama with a real word-level tokenizer and chat template.

Unit tests build the model from a config (no download), so every library step can run in seconds.
The integration tests (marked slow) use the real SmolLM2 model instead.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from medtune import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "medqa_sample.jsonl"
# MedQuAD is read where it lies (never copied into the repo); MEDTUNE_MEDQUAD points elsewhere.
MEDQUAD = Path(os.environ.get("MEDTUNE_MEDQUAD") or ROOT.parent / "shared" / "data" / "medquad")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for line in SAMPLE.read_text().splitlines():
        row = json.loads(line)
        words.update(re.findall(r"\w+|[^\w\s]", f"{row['question']} {row['answer']}".lower()))
    words.update(re.findall(r"\w+|[^\w\s]", config_mod.PreprocessConfig().system_prompt.lower()))
    return SPECIALS + sorted(words)


def build_tiny_model(directory: Path) -> Path:
    """Save a 2-layer random Llama and a word-level tokenizer (vocabulary of the sample data)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.add_special_tokens(SPECIALS)  # keeps "<|user|>" whole instead of splitting its punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["<|end|>"],
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def tiny_config_tree(model_dir: Path, data_path: Path = SAMPLE) -> dict:
    """The local profile pointed at the tiny model and cut to a few steps."""
    tree = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    tree["name"] = "tiny"
    tree["data"]["path"] = str(data_path)
    tree["model"] = {"id": str(model_dir), "source": "path"}
    tree["train"].update(max_steps=4, batch_size=8, logging_steps=1, learning_rate=3e-3, warmup_ratio=0.0,
                         # the figures these tests expect were set with padding-free batches; the profile's padded,
                         # length-grouped layout is the shipped-profile run's and test_padded_batches_...'s
                         padding_free=True)
    # the shipped suites are scored in their own tests and the slow runs; unit tests keep to the split
    tree["eval"].update(max_rows=8, batch_size=4, max_new_tokens=8, suites=[])
    return tree


@pytest.fixture
def tiny_config(tiny_model_dir) -> config_mod.Config:
    return config_mod.from_dict(tiny_config_tree(tiny_model_dir))


@pytest.fixture(scope="session")
def splits(tiny_model_dir) -> dict:
    """The sample data prepared (normalised, split, rendered) for the tiny model: train/validation/test frames."""
    import pandas as pd

    from medtune import models
    from medtune import preprocess as prep

    cfg = config_mod.from_dict(tiny_config_tree(tiny_model_dir))
    rows = pd.read_json(SAMPLE, orient="records", lines=True)
    return prep.prepare(rows, models.load_tokenizer(cfg.model), cfg.preprocess).splits


def open_sqlite_run(tree: dict, tmp_path: Path, experiment: str) -> tuple[str, str]:
    """Point the config `tree` at a real SQLite MLflow store in tmp_path and open a parent run there.

    Returns (config JSON, parent run id). The experiment is created up front so artifacts land in tmp_path,
    not in ./mlruns (the default next to a SQLite store)."""
    import mlflow

    from medtune.steps import open_run

    tree["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": experiment}
    cfg_json = config_mod.from_dict(tree).to_json()
    mlflow.set_tracking_uri(tree["tracking"]["tracking_uri"])
    mlflow.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    return cfg_json, open_run.run(cfg_json, f"{experiment}-run")


@contextmanager
def medtune_run(tree: dict, tmp_path: Path, timeout: int = 1500):
    """`medtune run --json` on a profile written from `tree`: the committed compiled DAG under kfp.local,
    logging to a real MLflow server on loopback. Yields (profile path, server URI, the run's summary, its
    console output) while the server is up."""
    import subprocess
    import sys

    from medtune import tracking

    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(tree))
    scratch = tmp_path / "tmp"  # the steps' temporary folders (TMPDIR), to see that none is left behind
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TMPDIR": str(scratch)}
    with tracking.local_server(tmp_path / "mlflow") as uri:
        proc = subprocess.run([str(Path(sys.executable).parent / "medtune"), "run", "--config", str(profile),
                               "--json", "--output-dir", str(tmp_path / "run"), "--set",
                               f"tracking.tracking_uri={uri}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        assert not list(scratch.glob("medtune-*")), "a step left its work folder (checkpoints) behind"
        yield profile, uri, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.fixture(scope="session", autouse=True)
def _outputs_store(tmp_path_factory):
    """Model outputs are reused within this session only, never from (or into) the user's cache (medtune.reuse);
    steps run as subprocesses inherit it."""
    os.environ["MEDTUNE_SCORE_CACHE"] = str(tmp_path_factory.mktemp("scores"))
