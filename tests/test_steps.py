"""One step, one module: everything the DAG needs to know about a step follows from its StepSpec.

A throwaway step declared here (spec + component, nothing else) gets its display name, pool, Secrets, PVCs,
retries, timeout, audit input and audit document from `place` and `medtune.steps.audit` alone.
"""

import json
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from kfp.dsl import Artifact, Output
from typer.testing import CliRunner

from medtune import config as config_mod
from medtune import pipeline as pipeline_mod
from medtune import steps
from medtune.cli import app
from medtune.steps import audit

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"

THROWAWAY = steps.StepSpec(name="throwaway", display_name="Throw a note away", gpu=True, hub_token="read",
                           data_pvc=True, retry=config_mod.RetryPolicy(retries=4, backoff_s=5), timeout_s=1234,
                           records={"note": "note"})


@steps.kfp_component(THROWAWAY)
def throwaway(config: str, note: Output[Artifact]):
    """Write a note.

    Args:
        config: The run-time config (JSON).
        note: The note.
    """
    with open(note.path, "w") as fh:
        fh.write('{"written": true}')


def _compile(tmp_path: Path, profile: config_mod.Profile) -> tuple[dict, dict]:
    specs = {**steps.specs(), THROWAWAY.name: THROWAWAY}

    @dsl.pipeline(name="with-a-new-step")
    def with_a_new_step(config: str):
        thrown = throwaway(config=config)
        audited = audit.component([thrown], specs)(config=config, run_id="run", **audit.evidence([thrown]))
        pipeline_mod.place([thrown, audited], profile, specs)

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(with_a_new_step, str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_a_new_step_is_placed_and_audited_from_its_spec_alone(tmp_path):
    profile = config_mod.load(PROFILE)
    spec, k8s = _compile(tmp_path, profile)
    tasks = spec["root"]["dag"]["tasks"]
    task, container = tasks["throwaway"], spec["deploymentSpec"]["executors"]["exec-throwaway"]["container"]
    assert task["taskInfo"]["name"] == "Throw a note away"
    assert task["retryPolicy"] == {"maxRetryCount": 4, "backoffDuration": "5s", "backoffFactor": 2.0,
                                   "backoffMaxDuration": "900s"}
    assert int(k8s["exec-throwaway"]["activeDeadlineSeconds"]) == 1234
    # the GPU pool: CUDA image, GPU request, the pool's selector and toleration
    assert container["image"] == profile.cluster.cuda_image
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    assert k8s["exec-throwaway"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    assert [t["key"] for t in k8s["exec-throwaway"]["tolerations"]] == ["nvidia.com/gpu"]
    assert [s["secretName"] for s in k8s["exec-throwaway"]["secretAsEnv"]] == ["medtune-mlflow"]
    assert [s["secretName"] for s in k8s["exec-throwaway"]["secretAsVolume"]] == ["medtune-hf-read"]  # a file
    assert [(m["constant"], m["mountPath"]) for m in k8s["exec-throwaway"]["pvcMount"]] == [("medtune-data", "/data")]
    # the audit step takes the new step's artifact, wired from its output
    assert tasks["audit"]["inputs"]["artifacts"]["throwaway__note"] == {
        "taskOutputArtifact": {"outputArtifactKey": "note", "producerTask": "throwaway"}}
    assert "throwaway__note" in spec["components"]["comp-audit"]["inputDefinitions"]["artifacts"]
    # ... and reads the document the spec names, under the spec's role
    note = tmp_path / "note"
    note.write_text('{"written": true}')
    assert audit.documents({"throwaway/note": ("uri", str(note))}, {THROWAWAY.name: THROWAWAY}) == \
        {"note": {"written": True}}
    # the README-style table has its row
    assert steps.table({THROWAWAY.name: THROWAWAY}).splitlines()[-1] == \
        "| throwaway | cuda | GPU | 1 GPU, 8 CPU, 48 Gi | data at /data | mlflow, hf-read (file) | 4 | 20 min |"


def test_profile_overrides_a_steps_retries_and_timeout(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="cluster.retries.*unknown task throwaway"):
        config_mod.load(PROFILE, ["cluster.retries={throwaway: {retries: 0}}"])
    profile = config_mod.load(PROFILE, ["cluster.retries={train: {retries: 0}}", "cluster.timeouts_s={train: 60}"])
    train = steps.specs()["train"]
    assert profile.cluster.retry_policy(train).retries == 0 and profile.cluster.timeout(train) == 60
    spec, _ = yaml.safe_load_all(pipeline_mod.compile_pipeline(_write(tmp_path, profile), tmp_path / "p.yaml")
                                 .read_text())
    trial = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train"]  # one per sweep trial
    assert "retryPolicy" not in trial, "retries 0 switches the default off"


def _write(tmp_path: Path, profile: config_mod.Profile) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile.model_dump(mode="json")))
    return path


def test_readme_table_is_generated_from_the_specs():
    assert steps.table() in (ROOT / "README.md").read_text(), \
        "README's 'What runs where' drifted from the step specs: paste medtune.steps.table()"


def test_every_step_module_declares_spec_run_and_a_documented_component():
    for module in steps.modules():
        assert module.SPEC.name == module.__name__.rsplit(".", 1)[1]
        assert callable(module.run)
        if module.SPEC.name != "audit":  # generated per DAG (audit.component)
            assert module.component.component_spec.name == module.SPEC.name.replace("_", "-")
            assert "Args:" in module.component.python_func.__doc__


def test_config_show_prints_the_fully_resolved_profile(tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--config", str(PROFILE), "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["epochs"] == 3 and shown["train"]["lora"]["r"] == 16  # a default the file omits
    assert shown["cluster"]["retries"]["train"]["retries"] == 1 and shown["cluster"]["timeouts_s"]["train"] == 21600
    # the printed profile loads back to the same run: a YAML file plus this command describe a run
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    loaded, original = config_mod.load(resolved), config_mod.load(PROFILE, ["train.epochs=3"])
    assert loaded.runtime() == original.runtime()
    for spec in steps.specs().values():
        assert loaded.cluster.retry_policy(spec) == original.cluster.retry_policy(spec)
        assert loaded.cluster.timeout(spec) == original.cluster.timeout(spec)
