"""Hub push and model card, against a local stand-in of the Hub HTTP API (tests/hub_standin.py).

The real Hub cannot be reached from here; the stand-in records exactly what `medtune.hub` would push.
"""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from hub_standin import HubStandIn
from medtune import hub, modelcard

TOKEN = "hf_test_not_a_real_token"
RUN = "0123abcd"
PASSED = {"passed": True, "summary": "all 2 checks passed",
          "checks": [{"rule": "rougeL >= 0.15", "value": 0.2, "passed": True, "verdict": "PASS"},
                     {"rule": "token_f1 >= 0.15", "value": 0.25, "passed": True, "verdict": "PASS"}]}
COMPARISON = {
    "n": 34, "base": {"token_f1": 0.19, "rougeL": 0.15}, "candidate": {"token_f1": 0.25, "rougeL": 0.2},
    "ci": {"candidate_vs_base": {"token_f1": {"delta": 0.06, "low": 0.035, "high": 0.087},
                                 "rougeL": {"delta": 0.05, "low": 0.033, "high": 0.078}}},
    "bootstrap": {"confidence": 0.95}}
SPLITS = {"train": {"rows": 254, "fingerprint": "a" * 64}, "test": {"rows": 34, "fingerprint": "b" * 64}}


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 16}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 4096)
    return folder


def _cfg(tiny_config, endpoint):
    return tiny_config.model_copy(update={"hub": tiny_config.hub.model_copy(
        update={"repo_id": "medtune-org/smollm2-medqa", "endpoint": endpoint})})


def _card(cfg):
    return modelcard.render(cfg, RUN, COMPARISON, PASSED, SPLITS, data_sha256="c" * 64)


def test_model_card_metadata_and_sections(tiny_config):
    cfg = _cfg(tiny_config, None)
    card = ModelCard(_card(cfg))
    meta = card.data.to_dict()
    assert meta["base_model"] == cfg.model.id
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"token_f1": 0.25, "rougeL": 0.2}
    assert meta["model-index"][0]["name"] == "medtune-org/smollm2-medqa"
    assert card.text.lstrip().splitlines()[0] == "# medtune-org/smollm2-medqa"  # titled by the repo
    for text in ("Not for diagnosis", "Not a substitute for a clinician", "a" * 64, "c" * 64,
                 "+0.0600 [+0.0350, +0.0870]", "**PASSED**", "| [test] rougeL >= 0.15 | 0.2000 | PASS |"):
        assert text in card.text, text


REGISTRATION = {"name": "medtune-qa", "version": "7"}


def _cards(cfg):
    card = _card(cfg)
    return {"adapter": card, "merged": modelcard.render(cfg, RUN, COMPARISON, PASSED, SPLITS, "c" * 64,
                                                        REGISTRATION, merged=True)}


def test_push_sends_adapter_and_card_once_per_run(tiny_config, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStandIn(TOKEN) as standin:
        cfg = _cfg(tiny_config, standin.url)
        standin.fail_next["tag"] = 503  # a transient error is retried, not fatal
        first = hub.push(cfg, adapter, RUN, PASSED, _cards(cfg), REGISTRATION)
        repo = standin.repos["medtune-org/smollm2-medqa"]
        assert first["pushed"] and first["tags"] == ["v7", f"run-{RUN}"]
        assert first["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert sorted(repo["files"]) == first["files"]
        assert repo["files"]["adapter_model.safetensors"] == b"\x00" * 4096
        assert repo["files"]["README.md"].decode() == _card(cfg)
        assert repo["private"] is True
        assert standin.validated[0]["base_model"] == cfg.model.id, "the card's metadata was validated"
        assert len(repo["commits"]) == 1
        assert repo["commits"][0]["summary"] == f"medtune run {RUN}: gate passed, medtune-qa version 7"
        assert repo["tags"] == {"v7": first["commit"], f"run-{RUN}": first["commit"]}
        assert "merged" not in first and "medtune-org/smollm2-medqa-merged" not in standin.repos

        again = hub.push(cfg, adapter, RUN, PASSED, _cards(cfg), REGISTRATION)
        assert again == {"pushed": False, "reason": f"run already pushed (tag run-{RUN})",
                         "repo_id": "medtune-org/smollm2-medqa", "commit": first["commit"],
                         "tags": [f"run-{RUN}", "v7"]}
        assert len(repo["commits"]) == 1, "a second push of the same run is a no-op"
    assert TOKEN not in json.dumps([first, again])


def test_merged_export_goes_to_its_own_repo_with_its_own_card(tiny_config, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (adapter / "merged").mkdir()
    (adapter / "merged" / "model.safetensors").write_bytes(b"\x01" * 8192)
    (adapter / "merged" / "config.json").write_text('{"model_type": "llama"}')
    with HubStandIn(TOKEN) as standin:
        cfg = _cfg(tiny_config, standin.url)
        result = hub.push(cfg, adapter, RUN, PASSED, _cards(cfg), REGISTRATION)
        adapter_repo = standin.repos["medtune-org/smollm2-medqa"]
        merged_repo = standin.repos["medtune-org/smollm2-medqa-merged"]
    assert not any(name.startswith("merged") for name in adapter_repo["files"]), "not nested in the adapter repo"
    assert result["merged"]["files"] == ["README.md", "config.json", "model.safetensors"] == sorted(merged_repo["files"])
    assert merged_repo["private"] and merged_repo["tags"] == {"v7": result["merged"]["commit"],
                                                             f"run-{RUN}": result["merged"]["commit"]}
    meta = ModelCard(merged_repo["files"]["README.md"].decode()).data.to_dict()
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "merge"
    assert meta["model-index"][0]["name"] == "medtune-org/smollm2-medqa-merged"
    assert "merged into its weights" in merged_repo["files"]["README.md"].decode()
    assert "\n# medtune-org/smollm2-medqa-merged\n" in merged_repo["files"]["README.md"].decode()
    assert "version 7 (tag `v7` here)" in merged_repo["files"]["README.md"].decode()


@pytest.mark.parametrize("change, reason", [
    ({"token": None}, "no token in $HF_TOKEN or $HF_TOKEN_PATH"),
    ({"repo_id": None}, "hub.repo_id is not set"),
    ({"passed": False}, "the gate did not pass"),
])
def test_push_is_skipped_with_a_reason(tiny_config, adapter, monkeypatch, tmp_path, change, reason):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))  # ignore any local login
    if change.get("token", TOKEN):
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = _cfg(tiny_config, "http://127.0.0.1:9")  # nothing listens: any request would fail the test
    if "repo_id" in change:
        cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": None})})
    decision = {**PASSED, "passed": change.get("passed", True)}
    assert hub.push(cfg, adapter, RUN, decision, {"adapter": "card"}) == {"pushed": False, "reason": reason}


def test_token_from_a_mounted_secret_file(tiny_config, adapter, monkeypatch, tmp_path):
    """A Kubernetes Secret mounted as a file, named by $HF_TOKEN_PATH (huggingface_hub reads it)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    with HubStandIn(TOKEN) as standin:
        result = hub.push(_cfg(tiny_config, standin.url), adapter, RUN, PASSED, {"adapter": "card"})
        assert result["pushed"], "the stand-in answers 401 to any other token"
        assert standin.repos["medtune-org/smollm2-medqa"]["commits"]
    assert TOKEN not in json.dumps(result)


def test_wrong_token_fails_loudly_without_echoing_it(tiny_config, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with HubStandIn(TOKEN) as standin:
        with pytest.raises(Exception) as err:
            hub.push(_cfg(tiny_config, standin.url), adapter, RUN, PASSED, {"adapter": "card"})
    assert "hf_wrong" not in str(err.value)
