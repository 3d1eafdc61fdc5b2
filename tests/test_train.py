"""Training on the tiny random Llama: LoRA/QLoRA/DoRA/full runs, loss masking, faults, checkpoint resume, export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune import config as config_mod
from medtune import models
from medtune import preprocess as prep
from medtune import train as trainer_mod
from conftest import ROOT, tiny_config_tree


def _cfg(model_dir: Path, **train) -> config_mod.Config:
    tree = tiny_config_tree(model_dir)
    tree["train"].update({"checkpoint_steps": 0, **train})
    return config_mod.from_dict(tree)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, splits, tmp_path_factory):
    cfg = _cfg(tiny_model_dir, export_merged=True)
    out = tmp_path_factory.mktemp("lora")
    return cfg, trainer_mod.train(cfg, splits["train"], splits["validation"], out / "adapter", out / "work")


def test_lora_trains_saves_safetensors_and_moves_the_adapter(lora_run):
    cfg, result = lora_run
    steps = [h for h in result.history if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) for h in steps)
    assert result.metrics["steps"] == 4 and math.isfinite(result.metrics["eval_loss"])
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    # 2 layers x 7 projections ("all-linear"); lora_B starts at zero, so non-zero means the optimizer moved it
    assert len(lora_b) == 14
    assert all(v.abs().max() > 0 for v in lora_b.values())
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == cfg.train.lora.r


def test_per_step_metrics_are_logged(lora_run):
    _, result = lora_run
    steps = [h for h in result.history if "loss" in h]
    for entry in steps:
        assert entry["learning_rate"] > 0 and math.isfinite(entry["grad_norm"]) and entry["peak_memory_mb"] > 50
    # step 1 is the untimed warm-up: no speed yet; afterwards a measured CPU peak gives an MFU
    assert "tokens_per_s" not in steps[0] and "mfu" not in steps[0]
    for entry in steps[1:]:
        assert entry["tokens_per_s"] > 0 and 0 < entry["mfu"] < 1
    tokens = [h["tokens"] for h in result.history if "tokens" in h]
    assert tokens == sorted(tokens) and tokens[0] > 0
    # the run's figure is the cumulative one at the last step (total timed tokens / total timed time)
    assert result.metrics["tokens_per_s"] == pytest.approx(steps[-1]["tokens_per_s"])
    assert result.metrics["mfu"] == pytest.approx(steps[-1]["mfu"]) and result.metrics["peak_memory_mb"] > 50


def test_unknown_peak_reports_no_mfu(tiny_model_dir, splits, tmp_path, monkeypatch):
    # Stands in for a GPU missing from the peak table (no GPU here): MFU must be absent, not invented.
    monkeypatch.setattr(trainer_mod.throughput, "device_peak", lambda *a, **k: None)
    cfg = _cfg(tiny_model_dir, max_steps=2)
    result = trainer_mod.train(cfg, splits["train"], splits["validation"].head(0), tmp_path / "a", tmp_path / "w")
    assert result.metrics["tokens_per_s"] > 0 and "mfu" not in result.metrics
    assert not any("mfu" in h for h in result.history)


def test_merged_export_matches_base_plus_adapter(lora_run):
    cfg, result = lora_run
    merged = result.adapter_dir / "merged"
    assert (merged / "model.safetensors").exists()
    assert result.metrics["merge_max_abs_diff"] <= cfg.train.merge_tolerance
    parity = json.loads((merged / "PARITY.json").read_text())
    assert parity["max_abs_logit_diff"] == result.metrics["merge_max_abs_diff"]


def test_merged_export_fails_when_merge_is_wrong(lora_run, tmp_path, monkeypatch):
    from peft import LoraModel

    cfg, result = lora_run
    real = LoraModel.merge_and_unload

    def broken(self, *a, **k):
        model = real(self, *a, **k)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    with pytest.raises(trainer_mod.ExportError, match="merge_tolerance"):
        trainer_mod.export_merged(cfg, result.adapter_dir, tmp_path / "merged", ["what is asthma ?"])
    assert not (tmp_path / "merged").exists()


def test_loss_is_on_answer_tokens_only(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir)
    rows = splits["train"].head(3)
    trainer = trainer_mod.build_trainer(cfg, rows, rows.head(0), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class
    # padding-free: one row, the sequences back to back, positions restarting at 0
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) == 4
    seen = set()
    for a, b in zip(starts, starts[1:]):
        ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
        row = next(r for r in rows.itertuples() if tokenizer(r.prompt + r.completion, add_special_tokens=False)
                   ["input_ids"] == ids.tolist())
        seen.add(row.id)
        n_prompt = len(tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == -100).all()                     # question and system prompt: no loss
        assert labels[n_prompt:].tolist() == ids[n_prompt:].tolist()  # answer and end token: loss
        assert b - a - n_prompt > 3
    assert len(seen) == 3

    # The loss is the mean NLL over exactly those tokens, computed from the full logits here.
    model = trainer.model.eval()
    with torch.no_grad():
        nll, n = trainer_mod.labelled_nll(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, :-1]
        target = batch["labels"][0, 1:]
        keep = target != -100
        expected = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
    assert int(n) == int(keep.sum())
    assert float(nll) == pytest.approx(float(expected), rel=1e-5)

    # Padding-free packing keeps the sequences apart: same loss as the padded batch.
    padded = tokenizer([r.prompt + r.completion for r in rows.itertuples()], add_special_tokens=False,
                       padding=True, return_tensors="pt")
    pad_labels = padded["input_ids"].clone()
    pad_labels[padded["attention_mask"] == 0] = -100
    for i, r in enumerate(rows.itertuples()):
        pad_labels[i, : len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"])] = -100
    with torch.no_grad():
        nll_pad, n_pad = trainer_mod.labelled_nll(model, {**padded, "labels": pad_labels})
    assert int(n_pad) == int(n)
    assert float(nll_pad) == pytest.approx(float(nll), rel=1e-4)


def test_qlora_trains_an_adapter_on_4bit_layers(tiny_model_dir, splits, tmp_path):
    from bitsandbytes.nn import Linear4bit

    cfg = _cfg(tiny_model_dir, method="qlora", max_steps=2)
    trainer = trainer_mod.build_trainer(cfg, splits["train"], splits["validation"].head(0), tmp_path / "ck")
    four_bit = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 14  # every projection of both layers is 4-bit NF4 under its LoRA adapter
    assert four_bit[0].weight.quant_type == "nf4"
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 14 and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all((after[n].detach() - before).abs().max() > 0 for n, before in lora_b.items())
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert len([k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if "lora_B" in k]) == 14


def test_dora_and_rslora_reach_peft(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, max_steps=1, lora={"r": 4, "alpha": 8, "use_dora": True, "use_rslora": True})
    lc = trainer_mod.lora_config(cfg)
    assert lc.use_dora and lc.use_rslora
    result = trainer_mod.train(cfg, splits["train"], splits["validation"].head(0), tmp_path / "a", tmp_path / "w")
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)
    model = trainer_mod.build_trainer(cfg, splits["train"].head(8), splits["train"].head(0), tmp_path / "x").model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)


def test_full_fine_tune_with_frozen_bottom_layers(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, method="full", freeze_layers=1, max_steps=2, learning_rate=1e-3)
    base = load_file(tiny_model_dir / "model.safetensors")
    result = trainer_mod.train(cfg, splits["train"], splits["validation"].head(0), tmp_path / "m", tmp_path / "w")
    tuned = load_file(result.adapter_dir / "model.safetensors")
    # Saved in the training dtype (bf16 where `auto` picks it); compare in that dtype so rounding alone
    # neither breaks "frozen" nor passes for "trained".
    base = {k: v.to(tuned[k].dtype) for k, v in base.items()}
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(tuned[q0], base[q0])                      # frozen
    assert torch.equal(tuned["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert (tuned[q1] - base[q1]).abs().max() > 0               # trained
    n_layer = sum(p.numel() for k, p in base.items() if k.startswith("model.layers.1."))
    assert result.metrics["trainable_params"] == n_layer + base["model.norm.weight"].numel()
    loaded = models.load_trained(cfg.model, cfg.train, result.adapter_dir)
    assert torch.equal(loaded.model.layers[1].self_attn.q_proj.weight.detach(), tuned[q1])


def test_freeze_layers_needs_full_method(tiny_model_dir):
    with pytest.raises(config_mod.ConfigError, match="freeze_layers"):
        _cfg(tiny_model_dir, freeze_layers=1)


def test_nan_loss_stops_with_a_message(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, max_steps=2)
    model = trainer_mod.prepare_model(cfg)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    trainer = trainer_mod.build_trainer(cfg, splits["train"], splits["train"].head(0), tmp_path, model=model)
    with pytest.raises(trainer_mod.TrainingFault, match="train.learning_rate") as err:
        trainer.train()
    assert err.value.kind == "nan_loss" and "step 0" in str(err.value)


def test_learning_rate_explosion_stops_with_a_message(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, method="full", learning_rate=1.0, max_steps=8)
    with pytest.raises(trainer_mod.TrainingFault) as err:
        trainer_mod.train(cfg, splits["train"], splits["train"].head(0), tmp_path / "a", tmp_path / "w")
    assert err.value.kind == "lr_explosion"
    assert "Lower train.learning_rate (now 1)" in str(err.value)
    assert not (tmp_path / "a").exists()  # nothing exported from a diverged run


def test_out_of_memory_stops_with_a_message(tiny_model_dir, splits, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, max_steps=2, batch_size=8, grad_accum=1)

    def oom(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(trainer_mod.SFTTrainer, "training_step", oom)
    with pytest.raises(trainer_mod.TrainingFault) as err:
        trainer_mod.train(cfg, splits["train"], splits["train"].head(0), tmp_path / "a", tmp_path / "w")
    assert err.value.kind == "out_of_memory"
    for hint in ("train.batch_size (now 8)", "train.grad_accum (now 1)", "gradient_checkpointing=true", "qlora"):
        assert hint in str(err.value)


def test_last_checkpoint_skips_incomplete_saves(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert trainer_mod.last_checkpoint(tmp_path).name == "checkpoint-4"
    assert trainer_mod.last_checkpoint(tmp_path / "missing") is None


RUNNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import pandas as pd
    sys.path.insert(0, {root!r})
    from medtune import config, train
    from medtune import rows
    cfg = config.from_json(Path(sys.argv[1]).read_text())
    split = rows.read(Path(sys.argv[2]))
    try:
        result = train.train(cfg, split, split.head(0), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    except train.Preempted as exc:
        print("PREEMPTED", exc, flush=True)
        sys.exit(143)
""")


def test_sigterm_checkpoint_and_resume_continue_the_same_run(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, max_steps=6, checkpoint_steps=2, logging_steps=1, learning_rate=1e-3)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    prep.write_split(splits["train"], tmp_path / "rows")
    ck = tmp_path / "ck"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=str(ROOT)))
    args = [sys.executable, str(script), str(tmp_path / "cfg.json"), str(tmp_path / "rows"), str(tmp_path / "a1"),
            str(tmp_path / "w1"), str(ck)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 90
    while trainer_mod.last_checkpoint(ck) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)  # as on a preempted node: mid-run, after the first periodic checkpoint
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    saved = trainer_mod.last_checkpoint(ck)
    killed_at = int(saved.name.split("-")[1])
    assert 2 <= killed_at < 6 and not (tmp_path / "a1").exists()
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["global_step"] == killed_at
    optimizer = torch.load(saved / "optimizer.pt", weights_only=False)
    assert optimizer["state"] and all(int(s["step"]) == killed_at for s in optimizer["state"].values())

    resumed = trainer_mod.train(cfg, splits["train"], splits["train"].head(0), tmp_path / "a2", tmp_path / "w2", ck)
    assert resumed.metrics["resumed_from_step"] == killed_at and resumed.metrics["steps"] == 6
    assert [h["step"] for h in resumed.history if "loss" in h][-1] == 6

    # The interrupted run ends where an uninterrupted one does: same data order, optimizer state and RNG.
    straight = trainer_mod.train(cfg, splits["train"], splits["train"].head(0), tmp_path / "a3", tmp_path / "w3",
                                 tmp_path / "ck3")
    a = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    b = load_file(tmp_path / "a3" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    losses = {h["step"]: h["loss"] for h in straight.history if "loss" in h}
    for h in resumed.history:
        if "loss" in h and h["step"] > killed_at:
            assert h["loss"] == pytest.approx(losses[h["step"]], rel=1e-5)


def test_checkpoint_key_is_stable_per_run_and_config(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    assert trainer_mod.checkpoint_key(cfg, "r1") == trainer_mod.checkpoint_key(cfg, "r1")
    assert trainer_mod.checkpoint_key(cfg, "r1") != trainer_mod.checkpoint_key(cfg, "r2")
    other = _cfg(tiny_model_dir, learning_rate=1e-4)
    assert trainer_mod.checkpoint_key(cfg, "r1") != trainer_mod.checkpoint_key(other, "r1")


@pytest.mark.parametrize("setting, dtype, packing, expected", [
    ("auto", "float32", False, False),    # on CPU padded, length-grouped batches measured faster in float32
    ("auto", "bfloat16", False, False),   # and in bf16
    ("auto", "bfloat16", True, True),     # packing is padding-free by construction
    (False, "float32", False, False), (True, "bfloat16", False, True)])
def test_padding_free_auto_is_padded_on_cpu(tiny_model_dir, setting, dtype, packing, expected):
    cfg = _cfg(tiny_model_dir, padding_free=setting, dtype=dtype, packing=packing)
    assert trainer_mod.padding_free(cfg.train) is expected


def test_padded_batches_are_length_grouped(tiny_model_dir, splits, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    cfg = _cfg(tiny_model_dir, padding_free=False)
    trainer = trainer_mod.build_trainer(cfg, splits["train"], splits["train"].head(0), tmp_path)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == cfg.train.batch_size and "attention_mask" in batch
    free = trainer_mod.build_trainer(_cfg(tiny_model_dir), splits["train"], splits["train"].head(0), tmp_path / "f")
    assert not isinstance(free._get_train_sampler(), LengthGroupedSampler)


def test_packing_with_padded_batches_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="padding_free"):
        _cfg(tiny_model_dir, padding_free=False, packing=True)
    assert _cfg(tiny_model_dir, padding_free="auto", packing=True).train.packing


SAVE_TWICE = textwrap.dedent("""
    import sys
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from medtune import models

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                           LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(sys.argv[2] + "/peft")  # PEFT's own save, for comparison
    models.save_result(model, AutoTokenizer.from_pretrained(sys.argv[1]), sys.argv[2] + "/medtune")
""")


def test_the_same_training_result_is_saved_as_the_same_bytes_in_every_process(tiny_model_dir, tmp_path):
    from medtune import lineage

    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tiny_model_dir), str(tmp_path / seed)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    peft_configs = [json.loads((tmp_path / s / "peft" / "adapter_config.json").read_text()) for s in ("1", "2")]
    # PEFT writes target_modules from a set: its order follows the process's hash seed
    assert peft_configs[0]["target_modules"] != peft_configs[1]["target_modules"]
    digests = {lineage.tree_digest(lineage.hash_files(tmp_path / s / "medtune")) for s in ("1", "2")}
    assert len(digests) == 1, "the same weights must hash the same (audit record, medtune.reuse)"
    config = json.loads((tmp_path / "1" / "medtune" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(peft_configs[0]["target_modules"]) and len(config["target_modules"]) == 14


@pytest.mark.parametrize("eval_steps, screened_evals, finished_evals", [
    (None, [3], [3, 6]),         # validation at the end of the epoch, as the local profile has it
    (3, [3], [3, 6]),            # the screen falls on a scheduled validation
    (2, [2, 3], [2, 3, 4, 6]),   # an extra validation at the screen, between scheduled ones
])
def test_a_screened_run_stops_validated_and_resumes_to_the_straight_run(tiny_model_dir, splits, tmp_path, eval_steps,
                                                                        screened_evals, finished_evals):
    """Successive halving: a trial stops at its screen with a validation loss and a checkpoint; the winner's
    resumed run ends with the weights, losses and schedule of a run that trained straight through."""
    cfg = _cfg(tiny_model_dir, max_steps=6, logging_steps=1, learning_rate=1e-3, eval_steps=eval_steps)
    train_rows, val_rows = splits["train"], splits["validation"]
    screened = trainer_mod.train(cfg, train_rows, val_rows, tmp_path / "a1", tmp_path / "w1", tmp_path / "ck1",
                                 screen_fraction=0.5)
    assert screened.metrics["steps"] == 3 and screened.metrics["planned_steps"] == 6
    assert [h["step"] for h in screened.history if "eval_loss" in h] == screened_evals, "once at the screen"
    assert screened.checkpoint == tmp_path / "ck1" / "checkpoint-3" and trainer_mod.last_checkpoint(tmp_path / "ck1")
    assert screened.metrics["eval_loss"] == [h["eval_loss"] for h in screened.history if "eval_loss" in h][-1]
    # the schedule is the full run's: the learning rate at the screen is not yet decayed to zero
    assert [h for h in screened.history if "loss" in h][-1]["learning_rate"] > 0

    finished = trainer_mod.train(cfg, train_rows, val_rows, tmp_path / "a2", tmp_path / "w2", tmp_path / "ck1")
    assert finished.checkpoint is None and "planned_steps" not in finished.metrics
    assert finished.metrics["resumed_from_step"] == 3 and finished.metrics["steps"] == 6
    assert [h["step"] for h in finished.history if "eval_loss" in h] == finished_evals

    straight = trainer_mod.train(cfg, train_rows, val_rows, tmp_path / "a3", tmp_path / "w3", tmp_path / "ck3")
    a = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    b = load_file(tmp_path / "a3" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert finished.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-5)
    early = load_file(tmp_path / "a1" / "adapter_model.safetensors")
    assert max(float((early[k] - b[k]).abs().max()) for k in b) > 1e-4, "the screen saved the weights at step 3"


def test_kept_checkpoints_are_per_run_and_config_under_checkpoint_dir(tiny_model_dir, tmp_path):
    """Where a retried train or finish step finds the checkpoints to resume (a PVC on the cluster)."""
    from medtune.steps import train as train_step

    assert train_step.kept_checkpoints(_cfg(tiny_model_dir), "r1") is None  # a temporary folder of the step's own
    cfg = _cfg(tiny_model_dir, checkpoint_dir=str(tmp_path))
    assert train_step.kept_checkpoints(cfg, "r1") == tmp_path / trainer_mod.checkpoint_key(cfg, "r1")
