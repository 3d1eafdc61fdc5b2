"""Evaluation with the tiny model: batching, perplexity, three models on the same rows, the CLI on a
closed-form dataset, and the evaluate -> gate -> register flow against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medtune import champion as champ
from medtune import config as config_mod
from medtune import evaluate as ev
from medtune import metrics, models
from medtune.preprocess import ROW_FIELDS, render_prompt, write_split

from conftest import SAMPLE, tiny_config_tree


def _adapter(model_dir: Path, path: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights: it changes the model's answers without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(tiny_model_dir, root / "candidate", 1), _adapter(tiny_model_dir, root / "champion", 2)


def _cfg(model_dir: Path, **gate) -> config_mod.Config:
    tree = tiny_config_tree(model_dir)
    tree["eval"].update(max_rows=6, batch_size=3, max_new_tokens=6, bootstrap_samples=200)
    if gate:
        tree["gate"] = gate
    return config_mod.from_dict(tree)


@pytest.fixture(scope="module")
def test_rows(tiny_model_dir) -> pd.DataFrame:
    rows = pd.read_json(SAMPLE, lines=True).iloc[:6].copy()
    # a second answer to the first question: scored as one question with two references
    extra = rows.iloc[[0]].assign(id="dup", answer="Type 2 diabetes means blood sugar stays too high.")
    rows = pd.concat([rows.iloc[:1], extra, rows.iloc[1:]], ignore_index=True)
    tokenizer = models.load_tokenizer(_cfg(tiny_model_dir).model)
    rows["prompt"] = [render_prompt(tokenizer, config_mod.PreprocessConfig().system_prompt, q)
                      for q in rows["question"]]
    rows["completion"] = rows["answer"] + tokenizer.eos_token
    for column in ROW_FIELDS:  # the split files' full schema
        if column not in rows:
            rows[column] = None
    return rows


@pytest.fixture(scope="module")
def three_models(tiny_model_dir, adapters, test_rows):
    cfg = _cfg(tiny_model_dir)
    # as registered from this config, so it answers with the config's decoding (see the real-server test below)
    local = champ.Champion(name="m", version="1", run_id=None, adapter_dir=adapters[1], decoding=cfg.decoding)
    return ev.evaluate(cfg, test_rows, adapters[0], test_rows.iloc[:4], local, local.info())


def test_rows_sharing_a_question_become_one_question_with_all_references(test_rows):
    items = ev.questions(test_rows)
    assert len(items) == len(test_rows) - 1
    assert items.iloc[0]["references"] == [test_rows.iloc[0]["answer"], test_rows.iloc[1]["answer"]]
    assert ev.questions(test_rows, max_rows=2)["id"].tolist() == ["s0001", "s0002"]


def test_batched_generation_gives_the_answers_of_one_at_a_time(tiny_model_dir, adapters, test_rows):
    from peft import PeftModel

    cfg = _cfg(tiny_model_dir)
    # float32: in bf16 (what `auto` picks on CPUs with AVX512-BF16) a padded batch rounds differently from a
    # single row, and the random model's near-tied logits then flip; this test is about the padding.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"dtype": "float32"})})
    # the random base model stops at once; with the random adapter it answers with words
    model = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.train), str(adapters[0]))
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    prompts = test_rows["prompt"].tolist()[:5]
    batched = ev.generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=6, desc="batched")
    single = [ev.generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6, desc="single")[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # answers depend on the question (not all padding artefacts)


def test_decoding_settings_reach_generation(tiny_model_dir, adapters, test_rows):
    """The recipe's no_repeat_ngram_size holds in every answer; plain greedy on the same model repeats, so the
    check can fail."""
    from peft import PeftModel

    cfg = _cfg(tiny_model_dir)
    model = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.train), str(adapters[0]))
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    prompts = test_rows["prompt"].tolist()[:4]

    def repeats(answers: list[str]) -> int:
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        return sum(len(seq) - 1 - len(set(zip(seq, seq[1:]))) for seq in ids)

    plain = ev.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=24, desc="plain")
    blocked = ev.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=24, desc="blocked",
                          decoding=config_mod.DecodingConfig(no_repeat_ngram_size=2))
    assert repeats(plain) > 0
    assert repeats(blocked) == 0 and blocked != plain


def test_answer_nll_matches_the_models_own_loss(tiny_model_dir, test_rows):
    cfg = _cfg(tiny_model_dir)
    model = models.load_model(cfg.model, cfg.train)
    tokenizer = models.load_tokenizer(cfg.model)
    prompts, answers = test_rows["prompt"].tolist()[:3], test_rows["answer"].tolist()[:3]
    nll, counts = ev.answer_nll(model, tokenizer, prompts, answers, batch_size=2)
    for i in range(3):
        p_ids = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answers[i] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        labels = torch.tensor([[-100] * len(p_ids) + a_ids])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()  # mean over the answer tokens
        assert counts[i] == len(a_ids)
        assert nll[i] == pytest.approx(loss * len(a_ids), rel=1e-4)
    ppl = ev.perplexity_aggregator(nll, counts)(np.arange(3)[None, :])[0]
    assert ppl == pytest.approx(np.exp(nll.sum() / counts.sum()))


def test_three_models_are_scored_on_the_same_questions(three_models, test_rows):
    comp = three_models.comparison()
    assert comp["n"] == 6 and comp["n_references"] == 7
    assert set(three_models.runs) == {"base", "candidate", "champion"}
    preds = three_models.predictions
    assert preds["id"].tolist() == ev.questions(test_rows, 6)["id"].tolist()
    # the adapters change the answers, so the three models are really three
    assert preds["base_answer"].tolist() != preds["candidate_answer"].tolist()
    assert preds["candidate_answer"].tolist() != preds["champion_answer"].tolist()
    # each model's reported metric is the mean of its per-question scores, recomputed here independently
    for name in ("base", "candidate", "champion"):
        f1 = [metrics.token_f1(a, refs) for a, refs in zip(preds[f"{name}_answer"], preds["references"])]
        assert comp[name]["token_f1"] == pytest.approx(np.mean(f1))
        assert comp[name]["bleu"] == pytest.approx(metrics.corpus_bleu(preds[f"{name}_answer"].tolist(),
                                                                       preds["references"].tolist()))
        assert comp[name]["perplexity"] > 1
    for pair in ("candidate_vs_base", "candidate_vs_champion"):
        intervals = comp["ci"][pair]
        assert {"token_f1", "rougeL", "bleu", "perplexity", "empty_rate"} <= set(intervals)
        for ci in intervals.values():
            if ci["low"] is not None:
                assert ci["low"] <= ci["delta"] + 1e-9 and ci["delta"] <= ci["high"] + 1e-9
    assert comp["ci"]["candidate_vs_base"]["token_f1"]["delta"] == pytest.approx(
        comp["candidate"]["token_f1"] - comp["base"]["token_f1"])
    assert comp["perplexity_split"] == "validation"


def test_cli_scores_a_closed_form_dataset_and_reports_unparseable_answers(tiny_model_dir, adapters, tmp_path,
                                                                          monkeypatch):
    from typer.testing import CliRunner

    from medtune.cli import app

    # no server to ask for a champion: mlflow.set_tracking_uri in an earlier test of this process exports one
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    data = tmp_path / "pubmedqa-like.csv"
    pd.DataFrame({
        "q": ["Can type 2 diabetes be prevented?", "Is asthma caused by bacteria?",
              "Can a cold lead to pneumonia?", "Is high blood pressure often silent?"],
        "label": ["yes", "no", "maybe", "yes"],
        "kind_of_question": ["prevention", "causes", "complications", "symptoms"],
    }).to_csv(data, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "evaluate", "--data", str(data), "--adapter", str(adapters[0]), "--json", "--out", str(out),
        "--set", f"model.id={tiny_model_dir}", "--set", "model.source=path", "--set", "data.kind=closed_form",
        "--set", "data.columns={q: question, label: answer, kind_of_question: qtype}",
        "--set", "eval.max_new_tokens=4", "--set", "eval.bootstrap_samples=200", "--set", "eval.suites=[]",
        "--set", "eval.closed_form=generate"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    comp = summary["comparison"]
    assert summary["kind"] == "closed_form" and comp["n"] == 4
    assert comp["champion"] is None and "no tracking server" in comp["champion_info"]["reason"]
    # the rates are those of the written answers, parsed again here
    preds = pd.read_json(out / "predictions.jsonl", lines=True)
    for name in ("base", "candidate"):
        parsed = [metrics.parse_choice(a, metrics.YES_NO_MAYBE) for a in preds[f"{name}_answer"]]
        gold = preds["answer"].tolist()
        assert comp[name]["unparseable_rate"] == pytest.approx(np.mean([p is None for p in parsed]))
        assert comp[name]["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(parsed, gold)]))
    # a random tiny model answers in unrelated words: most answers commit to no label, and that is shown
    assert comp["candidate"]["unparseable_rate"] >= 0.5
    assert "unparseable_rate" in result.stdout
    # the local profile gates free-text metrics: on a closed-form dataset they are missing, so it fails
    assert summary["gate"]["passed"] is False and "missing or not a number" in summary["gate"]["summary"]
    assert (out / "report.html").exists() and (out / "decision.json").exists()

    # by likelihood (the default), every answer is one of yes/no/maybe: nothing is unparseable
    result = CliRunner().invoke(app, [
        "evaluate", "--data", str(data), "--adapter", str(adapters[0]), "--json",
        "--set", f"model.id={tiny_model_dir}", "--set", "model.source=path", "--set", "data.kind=closed_form",
        "--set", "data.columns={q: question, label: answer, kind_of_question: qtype}",
        "--set", "eval.bootstrap_samples=200", "--set", "eval.suites=[]"])
    assert result.exit_code == 0, result.output
    comp = json.loads(result.stdout.strip().splitlines()[-1])["comparison"]
    assert comp["scoring"] == "likelihood" and "unparseable_rate" not in comp["candidate"]
    assert 0.0 <= comp["candidate"]["accuracy"] <= 1.0 and "accuracy_norm" in comp["candidate"]


def test_evaluate_gate_register_with_a_real_mlflow_server(tiny_model_dir, adapters, test_rows, three_models,
                                                          tmp_path):
    """Champion lookup, the three-way comparison in the pipeline step, a failing gate that is not an error,
    and challenger/champion aliases that move only when the policy promotes."""
    import mlflow

    from medtune import registry, tracking
    from medtune.steps import evaluate as evaluate_step
    from medtune.steps import gate as gate_step
    from medtune.steps import open_run, register

    passing = {"rules": [{"metric": "empty_rate", "max": 1.0}, {"metric": "rougeL", "max_regression": 1.0}]}
    with tracking.local_server(tmp_path / "mlflow") as uri:
        def cfg_json(promote: bool, gate=passing) -> str:
            cfg = _cfg(tiny_model_dir, **gate, promote=promote)
            return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})}).to_json()

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        name = config_mod.from_json(cfg_json(False)).tracking.registered_model
        assert champ.lookup(name)["available"] is False

        run_id = open_run.run(cfg_json(True), "test-run")
        seed = tmp_path / "seed-decision.json"
        seed.write_text(json.dumps({"passed": True, "promote": True, "summary": "seed champion"}))
        first = register.run(cfg_json(True), run_id, str(adapters[1]), str(seed), str(tmp_path / "r1.json"))
        assert first["aliases"] == ["challenger", "champion"] and first["previous_champion"] is None

        write_split(test_rows, tmp_path / "test")
        write_split(test_rows.iloc[:4], tmp_path / "val")
        comparison = evaluate_step.run(cfg_json(False), run_id, str(tmp_path / "test"), str(adapters[0]),
                                    str(tmp_path / "comparison.json"), str(tmp_path / "pred"),
                                    val_dir=str(tmp_path / "val"))
        assert comparison["champion_info"]["version"] == first["version"]
        preds = pd.read_json(tmp_path / "pred" / "predictions.jsonl", lines=True)
        # the champion downloaded from the registry answers exactly as the local champion adapter does
        assert preds["champion_answer"].tolist() == three_models.predictions["champion_answer"].tolist()
        assert comparison["ci"]["candidate_vs_champion"]["rougeL"]["n"] == 6

        history = tmp_path / "history.json"
        history.write_text(json.dumps([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]))
        strict = {"rules": [{"metric": "token_f1", "min": 0.99}]}
        outputs = [str(tmp_path / "comparison.json"), str(history), str(tmp_path / "pred")]
        rejected = gate_step.run(cfg_json(True, strict), run_id, *outputs, str(tmp_path / "d0.json"),
                              str(tmp_path / "r0.html"))
        assert rejected["passed"] is False and rejected["promote"] is False   # recorded, not raised
        assert client.get_run(run_id).data.tags["medtune.gate"] == "failed"

        with pytest.raises(registry.GateNotPassed, match="did not pass"):   # whatever calls it
            register.run(cfg_json(True), run_id, str(adapters[0]), str(tmp_path / "d0.json"),
                         str(tmp_path / "r0.json"))

        decision = gate_step.run(cfg_json(False), run_id, *outputs, str(tmp_path / "d1.json"),
                              str(tmp_path / "r1.html"))
        # 6 questions are under gate.min_questions, and the policy has no check against base: both fail
        assert decision["passed"] is False
        assert "questions scored >= 30" in decision["summary"] and "against the base model" in decision["summary"]
        assert f"champion: {name} version {first['version']}" in (tmp_path / "r1.html").read_text()
        # The alias moves below follow from a passing decision; a stand-in one, as for the seed champion.
        decision = {**decision, "passed": True, "promote": False, "summary": "stand-in passing decision"}
        (tmp_path / "d1.json").write_text(json.dumps(decision))
        second = register.run(cfg_json(False), run_id, str(adapters[0]), str(tmp_path / "d1.json"),
                                str(tmp_path / "r2.json"))
        assert second["aliases"] == ["challenger"] and second["promoted"] is False
        assert client.get_model_version_by_alias(name, "champion").version == first["version"]
        assert client.get_model_version_by_alias(name, "challenger").version == second["version"]

        promoted = tmp_path / "d2.json"
        promoted.write_text(json.dumps({**decision, "promote": True}))
        third = register.run(cfg_json(True), run_id, str(adapters[0]), str(promoted), str(tmp_path / "r3.json"))
        assert third["aliases"] == ["challenger", "champion"] and third["previous_champion"] == first["version"]
        assert client.get_model_version_by_alias(name, "champion").version == third["version"]
        versions = {v.version for v in client.search_model_versions(f"name='{name}'")}
        assert {first["version"], second["version"], third["version"]} <= versions   # nothing deleted
        assert client.get_model_version(name, third["version"]).tags["medtune.previous_champion"] == first["version"]


def test_outputs_are_reused_only_for_the_same_weights_inputs_and_settings(tiny_model_dir, adapters, test_rows,
                                                                          tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("MEDTUNE_SCORE_CACHE", str(store))
    cfg = _cfg(tiny_model_dir)
    ppl_rows = test_rows.iloc[:4]
    first = ev.evaluate(cfg, test_rows, adapters[0], ppl_rows).comparison()
    assert "reused_outputs" not in first
    assert len(list(store.rglob("*.json"))) == 4  # base and candidate: answers and reference NLLs

    second = ev.evaluate(cfg, test_rows, adapters[0], ppl_rows).comparison()
    both = ["generate:test", "answer_nll:test"]
    assert second.pop("reused_outputs") == {"base": both, "candidate": both}
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)  # same scores, same CIs

    # other adapter weights: the base model's outputs are reused, the new candidate's computed
    other = ev.evaluate(cfg, test_rows, adapters[1], ppl_rows).comparison()
    assert other["reused_outputs"] == {"base": both}
    assert other["candidate"] != first["candidate"]

    # longer answers: generated again; the reference NLLs do not depend on it and are reused
    longer = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": 7})})
    assert ev.evaluate(longer, test_rows, adapters[0], ppl_rows).comparison()["reused_outputs"] == {
        "base": ["answer_nll:test"], "candidate": ["answer_nll:test"]}

    kept = sorted(store.rglob("*.json"))
    off = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"reuse_outputs": False})})
    assert "reused_outputs" not in ev.evaluate(off, test_rows, adapters[0], ppl_rows).comparison()
    assert sorted(store.rglob("*.json")) == kept  # nothing read, nothing written


def test_a_damaged_stored_output_is_computed_again(tmp_path):
    from medtune import reuse

    def outputs():
        return reuse.Outputs(tmp_path, {"base": "digest"}, {"code": "digest"})

    first = outputs()
    assert first.get("generate:test", {"prompts": ["q"]}, lambda: ["an answer"]) == ["an answer"]
    assert first.computed == ["generate:test"]
    (stored,) = tmp_path.rglob("*.json")
    stored.write_text('{"value": ')  # a run killed mid-write elsewhere, or a damaged disk
    again = outputs()
    assert again.get("generate:test", {"prompts": ["q"]}, lambda: ["recomputed"]) == ["recomputed"]
    assert again.computed == ["generate:test"] and not again.reused
    third = outputs()
    assert third.get("generate:test", {"prompts": ["q"]}, lambda: pytest.fail("computed again")) == ["recomputed"]
    assert third.reused == ["generate:test"]
    # another input is another output
    assert third.get("generate:test", {"prompts": ["q2"]}, lambda: ["other"]) == ["other"]


def test_a_base_model_without_hashable_files_reuses_nothing(tiny_model_dir, monkeypatch):
    from medtune import lineage, reuse

    cfg = _cfg(tiny_model_dir)
    assert reuse.weights_identity(cfg)["base"] == lineage.base_model_record(cfg)["sha256"]
    # a Hub id whose snapshot is not on disk: only its name and revision are known, and `main` moves
    monkeypatch.setattr(lineage, "base_model_record", lambda c: {"id": "org/model", "source": "hub",
                                                                 "revision": "main", "commit": None, "sha256": None})
    assert reuse.weights_identity(cfg) == {}
