"""Preference tuning on the tiny random Llama: self-play and dataset pairs, DPO from the SFT adapter, early stopping,
the feature method, and what evaluate, the gate and the report make of the SFT-only adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from medtune import config as config_mod
from medtune import models
from medtune import preference as pref
from medtune import preprocess as prep
from medtune import train as trainer_mod
from medtune.evaluate import generate
from conftest import SAMPLE, open_sqlite_run, tiny_config_tree


def _tree(model_dir: Path, train: dict | None = None, **preference) -> dict:
    tree = tiny_config_tree(model_dir)
    tree["train"].update({"checkpoint_steps": 0, "max_steps": 8, **(train or {})})
    tree["preference"].update({"enabled": True, "max_pairs": 12, "max_new_tokens": 8, "batch_size": 4,
                               "max_steps": 6, "learning_rate": 5e-3, "eval_steps": 2, "logging_steps": 1,
                               "early_stopping": None, "sft_weight": 0.0, **preference})
    return tree


def _cfg(model_dir: Path, train: dict | None = None, **preference) -> config_mod.Config:
    return config_mod.from_dict(_tree(model_dir, train, **preference))


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, splits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    cfg = _cfg(tiny_model_dir)
    return trainer_mod.train(cfg, splits["train"], splits["validation"], out / "adapter", out / "work").adapter_dir


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, splits, sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    cfg = _cfg(tiny_model_dir)
    result, pairs = pref.run(cfg, sft_adapter, splits["train"], splits["validation"], splits["test"],
                             out / "adapter", out / "pairs", out / "work")
    return cfg, result, pairs, out


# ---------------------------------------------------------------------------------------------- pairs


def test_self_play_pairs_come_from_the_sft_data_with_counts_and_fingerprints(dpo_run, splits):
    cfg, _, pairs, out = dpo_run
    summary = json.loads((out / "pairs" / "summary.json").read_text())
    assert summary["source"] == "self_play"
    assert summary["rows_read"] == 12 + min(12, len(splits["validation"]))
    kept = summary["splits"]["train"]["pairs"] + summary["splits"]["validation"]["pairs"]
    assert summary["rows_read"] == kept + summary["dropped_by_rule"]["pair.near_identical"]
    train = pref.read_pairs(out / "pairs", "train")
    assert summary["splits"]["train"]["fingerprint"] == prep.fingerprint(train, pref.PAIR_FIELDS)
    # chosen is the SFT split's reference answer for that very question; rejected is the model's own answer
    reference = dict(zip(splits["train"]["id"].astype(str), splits["train"]["answer"]))
    assert all(reference[i] == c for i, c in zip(train["id"], train["chosen"]))
    assert (train["chosen"] != train["rejected"]).all()


def test_self_play_drops_near_identical_pairs_and_counts_them(tiny_model_dir, splits, sft_adapter):
    cfg = _cfg(tiny_model_dir)
    tokenizer = models.load_tokenizer(cfg.model)
    policy = pref.load_policy(cfg, sft_adapter)
    rows = splits["train"].head(8).reset_index(drop=True)
    own = generate(policy, tokenizer, rows["prompt"].tolist(), 4, 8, desc="probe", decoding=cfg.decoding)
    tokenizer.padding_side = "right"
    # where the reference answer is what the SFT model says anyway, there is no preference to learn
    rows.loc[:2, "answer"] = own[:3]
    val = splits["validation"].head(4).reset_index(drop=True)
    pairs = pref.self_play_pairs(cfg.model_copy(update={"preference": cfg.preference.model_copy(
        update={"max_pairs": None})}), policy, tokenizer, rows, val)
    dropped_ids = {d["row"]["id"] for d in pairs.dropped}
    assert set(rows["id"].astype(str)[:3]) <= dropped_ids
    assert all(d["rule"] == "pair.near_identical" for d in pairs.dropped)
    assert pairs.counts["dropped_by_rule"]["pair.near_identical"] == len(pairs.dropped)
    assert len(pairs.train) + len(pairs.validation) + len(pairs.dropped) == 12


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preference_dataset_goes_through_the_data_contract(tiny_model_dir, splits, tmp_path):
    sample = pd.read_json(SAMPLE, orient="records", lines=True)
    good = [{"prompt": q, "chosen": a, "rejected": "Drink more water and rest."}
            for q, a in zip(sample["question"][:20], sample["answer"][:20])]
    conversational = {"prompt": [{"role": "user", "content": sample["question"][20]}],
                      "chosen": [{"role": "assistant", "content": sample["answer"][20]}],
                      "rejected": [{"role": "assistant", "content": "I do not know."}]}
    bad = [
        {"prompt": sample["question"][21], "chosen": "Rest.", "rejected": " rest. "},          # same text
        {"prompt": sample["question"][22], "chosen": sample["answer"][22], "rejected": ""},    # empty side
        {"prompt": sample["question"][23], "chosen": sample["answer"][23], "rejected": "x" * 5000},  # too long
        {"prompt": sample["question"][24], "chosen": sample["answer"][24], "rejected": "Call 301-496-5248."},
    ]
    path = _write_jsonl(tmp_path / "prefs.jsonl", good + [conversational] + bad)
    cfg = _cfg(tiny_model_dir, data={"path": str(path), "max_answer_chars": 2000, "min_kept_fraction": 0.5})
    test_rows = pd.DataFrame({"question": [sample["question"][0]]})  # a prompt the test split holds
    pairs = pref.pairs_from_dataset(cfg, models.load_tokenizer(cfg.model), test_rows)
    counts = pairs.counts
    assert counts["rows_read"] == 25
    assert counts["quarantined_by_rule"] == {"pair.sides_differ": 1, "rejected.not_blank": 1,
                                             "rejected.length_chars": 1, "rejected.phi_phone": 1}
    quarantine = pairs.validation_result.quarantine
    assert {q["line"] for q in quarantine} == {22, 23, 24, 25}
    same = next(q for q in quarantine if q["rule"] == "pair.sides_differ")
    assert "same text" in same["detail"] and same["file"] == str(path)
    assert counts["dropped_by_rule"] == {"pair.test_overlap": 1}
    assert len(pairs.train) + len(pairs.validation) == 25 - 4 - 1
    merged = pd.concat([pairs.train, pairs.validation])
    assert sample["answer"][20] in set(merged["chosen"])  # the conversational row, read as text
    assert all(p.endswith("<|assistant|> ") for p in merged["prompt"])  # rendered with the chat template


def test_preference_dataset_without_a_rejected_column_names_the_file(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "What is asthma and how is it treated?",
                                                    "chosen": "A lung condition."}])
    cfg = _cfg(tiny_model_dir, data={"path": str(path)})
    with pytest.raises(ValueError, match=r"prefs\.jsonl: preference data needs a rejected answer column"):
        pref.pairs_from_dataset(cfg, models.load_tokenizer(cfg.model), pd.DataFrame({"question": []}))


# ---------------------------------------------------------------------------------------------- DPO


def test_dpo_lowers_the_held_out_dpo_loss(dpo_run):
    _, result, _, _ = dpo_run
    m = result.metrics
    # step 0 is the SFT policy against itself: log(2), zero margin
    assert m["before_loss"] == pytest.approx(0.6931, abs=1e-3) and m["before_rewards/margins"] == 0
    assert m["after_loss"] < m["before_loss"] - 0.01
    assert m["after_rewards/margins"] > 0 and m["after_rewards/accuracies"] > 0.5
    evals = [h for h in result.history if "dpo_eval_rewards/margins" in h]
    assert [h["step"] for h in evals][:4] == [0, 2, 4, 6]


def test_output_is_one_servable_adapter_without_a_reference_copy(dpo_run, sft_adapter):
    cfg, result, _, _ = dpo_run
    files = sorted(p.relative_to(result.adapter_dir).as_posix() for p in result.adapter_dir.rglob("*"))
    assert "adapter_model.safetensors" in files and not any(f.startswith("ref") for f in files)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert not any(".ref." in k for k in weights)
    sft_weights = load_file(sft_adapter / "adapter_model.safetensors")
    assert weights.keys() == sft_weights.keys()  # the SFT adapter continued, no second one added
    assert any(not torch.equal(weights[k], sft_weights[k]) for k in weights)
    assert not any(p.is_dir() for p in result.adapter_dir.iterdir())  # PEFT saves a second adapter in a folder
    model = models.load_trained(cfg.model, cfg.train, result.adapter_dir)
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    assert len(generate(model, tokenizer, ["<|user|> what is asthma? <|end|> <|assistant|> "], 1, 4, "x")) == 1


def test_evaluate_scores_the_sft_only_adapter_and_the_gate_says_what_dpo_added(dpo_run, splits, sft_adapter,
                                                                               tmp_path):
    from medtune import evaluate as ev
    from medtune import gate

    cfg, result, pairs, _ = dpo_run
    both = ev.evaluate(cfg, splits["test"], result.adapter_dir, splits["validation"], sft_dir=sft_adapter)
    comparison = ev.write_outputs(both, tmp_path / "both.json", tmp_path / "both")
    # the SFT-only adapter answered the same questions: its own scores, and candidate - SFT with a CI
    assert list(both.runs) == ["base", "candidate", "sft"] and "sft_answer" in both.predictions
    assert comparison["sft"]["perplexity"] != comparison["candidate"]["perplexity"]
    assert comparison["ci"]["candidate_vs_sft"]["perplexity"]["delta"] == pytest.approx(
        comparison["candidate"]["perplexity"] - comparison["sft"]["perplexity"])
    # scored as the candidate on its own, the SFT adapter gets the same numbers and intervals
    alone = ev.write_outputs(ev.evaluate(cfg, splits["test"], sft_adapter, splits["validation"]),
                             tmp_path / "alone.json", tmp_path / "alone")
    assert alone["candidate"] == comparison["sft"]
    assert alone["ci"]["candidate_vs_base"] == comparison["ci"]["sft_vs_base"]
    # so the gate's view of the SFT-only adapter is its decision on that adapter alone
    decision = gate.decide(cfg, comparison)
    on_sft = gate.decide(cfg, alone)
    assert decision["sft_only"] == {"passed": on_sft["passed"], "summary": on_sft["summary"]}
    assert "sft_only" not in on_sft
    note = pref.closing_note({"enabled": True, "pairs": pairs.summary(), "metrics": result.metrics}, decision,
                             comparison)
    m = result.metrics
    assert f"held-out preference accuracy {m['before_rewards/accuracies']:.3f} -> " \
           f"{m['after_rewards/accuracies']:.3f}" in note[1]
    assert note[2].startswith("gate on SFT only: ") and note[3].startswith("test: SFT -> SFT + DPO rougeL ")


def test_dpo_continues_a_qlora_adapter_on_the_4bit_base(tiny_model_dir, splits, tmp_path):
    """The cluster profile's method: the base stays 4-bit NF4, the SFT adapter is what DPO trains."""
    from bitsandbytes.nn import Linear4bit

    cfg = _cfg(tiny_model_dir, train={"method": "qlora"}, max_steps=4)
    sft_dir = trainer_mod.train(cfg, splits["train"], splits["validation"], tmp_path / "sft",
                                tmp_path / "sft-work").adapter_dir
    policy = pref.load_policy(cfg, sft_dir)
    assert len([m for m in policy.modules() if isinstance(m, Linear4bit)]) == 14
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    rows = splits["train"].head(16).reset_index(drop=True)
    pairs = pd.DataFrame({"id": rows["id"].astype(str), "question": rows["question"], "prompt": rows["prompt"],
                          "chosen": rows["answer"], "rejected": "i do not know ."})
    result = pref.train(cfg, policy, models.load_tokenizer(cfg.model),
                        pref.Pairs(pairs.head(8), pairs.tail(8).reset_index(drop=True), "self_play"),
                        tmp_path / "adapter", tmp_path / "work")
    m = result.metrics
    assert m["steps"] == 4 and math.isfinite(m["train_loss"])
    assert m["before_rewards/margins"] == pytest.approx(0, abs=1e-3)  # the SFT policy is the reference
    assert m["after_rewards/margins"] > m["before_rewards/margins"] + 0.01
    weights, sft_weights = (load_file(d / "adapter_model.safetensors") for d in (result.adapter_dir, sft_dir))
    assert weights.keys() == sft_weights.keys() and any(not torch.equal(weights[k], sft_weights[k]) for k in weights)


def test_dpo_early_stopping_restores_the_best_checkpoint(tiny_model_dir, splits, sft_adapter, tmp_path):
    # held-out pairs that prefer the opposite of the training pairs: their margin falls from the first update on,
    # so the best checkpoint is the first validation's and patience 1 stops at the second
    cfg = _cfg(tiny_model_dir, max_steps=12, early_stopping={"patience": 1})
    rows = splits["train"].head(16).reset_index(drop=True)
    good = pd.DataFrame({"id": rows["id"].astype(str), "question": rows["question"], "prompt": rows["prompt"],
                         "chosen": rows["answer"], "rejected": "i do not know ."})
    flipped = good.tail(8).rename(columns={"chosen": "rejected", "rejected": "chosen"}).reset_index(drop=True)
    pairs = pref.Pairs(good.head(8), flipped, "self_play")
    tokenizer = models.load_tokenizer(cfg.model)
    result = pref.train(cfg, pref.load_policy(cfg, sft_adapter), tokenizer, pairs, tmp_path / "adapter",
                        tmp_path / "work")
    margins = {h["step"]: h["dpo_eval_rewards/margins"] for h in result.history
               if "dpo_eval_rewards/margins" in h and h["step"] > 0}
    m = result.metrics
    best_step, last_step = max(margins, key=margins.get), max(margins)
    assert best_step < last_step and margins[last_step] < margins[best_step]
    assert m["best_step"] == best_step and m["best_metric"] == pytest.approx(margins[best_step])
    assert m["early_stopped_at_step"] == last_step == m["steps"] < 12
    # what is saved is reported with the best step's scores, and it is that checkpoint, weight for weight
    assert m["after_rewards/margins"] == pytest.approx(margins[best_step], abs=1e-5)
    reloaded = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    best = load_file(tmp_path / "work" / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert all(torch.equal(reloaded[k], best[k]) for k in best)


def test_sft_early_stopping_restores_the_best_checkpoint(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, train={"max_steps": 24, "eval_steps": 2, "learning_rate": 0.05,
                                      "early_stopping": {"patience": 1, "threshold": 0.0}})
    result = trainer_mod.train(cfg, splits["train"], splits["validation"], tmp_path / "adapter", tmp_path / "work")
    losses = {h["step"]: h["eval_loss"] for h in result.history if "eval_loss" in h}
    best_step = min(losses, key=losses.get)
    assert result.metrics["best_step"] == best_step and result.metrics["eval_loss"] == pytest.approx(losses[best_step])
    assert result.metrics["early_stopped_at_step"] in (max(losses), -1)
    # the saved adapter is the best checkpoint's, not the last step's
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    best = load_file(tmp_path / "work" / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)


# ---------------------------------------------------------------------------------------------- feature method


def test_feature_method_trains_only_the_top_blocks_and_the_head(tiny_model_dir, splits, tmp_path):
    cfg = _cfg(tiny_model_dir, train={"method": "feature", "feature_layers": 1, "feature_head": True,
                                      "max_steps": 3, "learning_rate": 1e-3})
    before = models.load_model(cfg.model, cfg.train).state_dict()
    result = trainer_mod.train(cfg, splits["train"], splits["validation"], tmp_path / "model", tmp_path / "work")
    after = load_file(result.adapter_dir / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k].to(after[k].dtype))}
    assert changed and all(k.startswith("model.layers.1.") or k == "lm_head.weight" for k in changed)
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" not in changed
    assert not any(k.startswith("model.layers.0.") for k in changed)
    expected = sum(v.numel() for k, v in before.items() if k.startswith("model.layers.1.")) + \
        before["model.embed_tokens.weight"].numel()  # the untied head's own copy
    assert result.metrics["trainable_params"] == expected
    reloaded = models.load_trained(cfg.model, cfg.train, result.adapter_dir)
    assert torch.equal(reloaded.get_output_embeddings().weight.detach().cpu(), after["lm_head.weight"])


def test_feature_method_needs_something_to_train(tiny_model_dir):
    with pytest.raises(config_mod.ConfigError, match="method=feature trains nothing"):
        _cfg(tiny_model_dir, train={"method": "feature", "feature_layers": 0, "feature_head": False})


# ---------------------------------------------------------------------------------------------- step and report


def test_disabled_stage_passes_the_sft_adapter_and_history_through(tiny_model_dir, tmp_path):
    from medtune.steps import preference as step

    cfg = _cfg(tiny_model_dir, enabled=False)
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "adapter_model.safetensors").write_bytes(b"weights")
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"step": 1, "loss": 2.0}]))
    summary = tmp_path / "summary.json"
    out = step.run(cfg.to_json(), "run", str(sft_dir), str(history), "", "", "", str(tmp_path / "adapter"),
                   str(tmp_path / "history-out.json"), str(tmp_path / "pairs"), str(summary), str(tmp_path / "work"))
    assert out["enabled"] is False and json.loads(summary.read_text()) == out
    assert json.loads((tmp_path / "pairs" / "summary.json").read_text()) == out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((tmp_path / "history-out.json").read_text()) == [{"step": 1, "loss": 2.0}]
    assert pref.closing_note(out, {"passed": True}, {}) == []


def test_enabled_step_tunes_a_whole_model_logs_its_pairs_and_evaluate_scores_both(tiny_model_dir, splits, tmp_path):
    import mlflow

    from medtune import evaluate as ev
    from medtune.steps import preference as step

    # the SFT result is a whole model here (method feature): DPO continues it with the same freezing
    tree = _tree(tiny_model_dir, train={"method": "feature", "feature_layers": 1, "max_steps": 2}, max_pairs=8,
                 max_steps=2)
    tree["eval"]["max_rows"] = 4
    cfg_json, run_id = open_sqlite_run(tree, tmp_path, "preference")
    cfg = config_mod.from_json(cfg_json)
    sft_dir = trainer_mod.train(cfg, splits["train"], splits["validation"], tmp_path / "sft",
                                tmp_path / "sft-work").adapter_dir
    for name, split in splits.items():
        prep.write_split(split, tmp_path / name)
    (tmp_path / "sft-history.json").write_text(json.dumps([{"step": 1, "loss": 2.0}]))
    out = {name: tmp_path / name for name in ("adapter", "history.json", "pairs", "summary.json", "work")}
    summary = step.run(cfg_json, run_id, str(sft_dir), str(tmp_path / "sft-history.json"),
                       *(str(tmp_path / name) for name in ("train", "validation", "test")),
                       *(str(out[name]) for name in ("adapter", "history.json", "pairs", "summary.json", "work")))
    assert summary["enabled"] is True and json.loads(out["summary.json"].read_text())["pairs"] == summary["pairs"]
    # the history: SFT's, then the preference stage's own entries
    history = json.loads(out["history.json"].read_text())
    assert history[0] == {"step": 1, "loss": 2.0} and "dpo_eval_rewards/margins" in history[1]
    assert all(k in ("step", "epoch") or k.startswith("dpo_") for entry in history[1:] for k in entry)
    # only the unfrozen top block and the head moved
    before, after = load_file(sft_dir / "model.safetensors"), load_file(out["adapter"] / "model.safetensors")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "lm_head.weight" for k in changed)
    # the pairs' fingerprints on the step's MLflow run, its scores on the parent
    client = mlflow.MlflowClient()
    (child,) = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.data.tags["medtune.pairs.train.sha256"] == summary["pairs"]["splits"]["train"]["fingerprint"] == \
        prep.fingerprint(pref.read_pairs(out["pairs"], "train"), pref.PAIR_FIELDS)
    assert client.get_run(run_id).data.metrics["preference.after_rewards_margins"] == pytest.approx(
        summary["metrics"]["after_rewards/margins"])
    # evaluate loads both whole models on their own
    comparison = ev.evaluate(cfg, splits["test"], out["adapter"], splits["validation"], sft_dir=sft_dir).comparison()
    assert comparison["sft"]["perplexity"] != comparison["candidate"]["perplexity"] != comparison["base"]["perplexity"]


def test_report_shows_the_held_out_preference_curve_and_the_sft_only_decision():
    from medtune import report

    history = [{"step": 4, "loss": 1.0},
               {"step": 0, "dpo_eval_rewards/margins": 0.0, "dpo_eval_rewards/accuracies": 0.0},
               {"step": 2, "dpo_eval_rewards/margins": 0.4, "dpo_eval_rewards/accuracies": 0.8}]
    comparison = {"kind": "free_text", "base": {"rougeL": 0.1}, "candidate": {"rougeL": 0.3}, "sft": {"rougeL": 0.25},
                  "ci": {"candidate_vs_sft": {"rougeL": {"delta": 0.05, "low": 0.01, "high": 0.09,
                                                         "significant": True}}}}
    decision = {"passed": True, "sft_only": {"passed": False, "summary": "rougeL 0.25 < 0.3"}}
    html = report.preference_section(comparison, decision, history)
    assert html.count("<img") == 1 and "+0.0500 [+0.0100, +0.0900] *" in html
    assert 'id="sft-only-gate">The same gate on the SFT-only result: FAILED. rougeL 0.25 &lt; 0.3' in html
    assert report.preference_section({"kind": "free_text"}, {"passed": True}, [{"step": 1, "loss": 1.0}]) == ""
