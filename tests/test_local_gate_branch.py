"""kfp.local must take the `dsl.If(gate passed)` branch exactly when the gate passes, else the `dsl.Else`.

Pins the kfp.local behaviour the real DAG relies on, in a toy DAG of the same shape that runs in seconds:
- the gate returns a plain bool, because kfp.local resolves a condition only on `<task>-Output` channels
  (a NamedTuple output named `passed` is silently never true);
- the audit step runs in both branches, with an optional artifact input that only the passing branch
  passes (kfp.local cannot resolve a `dsl.OneOf` of artifacts, so there is no single task after the branch).
"""

import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, Input, Output


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def verdict(passed: bool, decision: Output[Artifact]) -> bool:
    with open(decision.path, "w") as fh:
        fh.write(str(passed))
    return passed


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def register(registration: Output[Artifact]):
    with open(registration.path, "w") as fh:
        fh.write("version 1")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def audit(out: str, decision: Input[Artifact], registration: Input[Artifact] = None):
    with open(decision.path) as fh:
        record = f"passed={fh.read()}"
    if registration is not None:
        with open(registration.path) as fh:
            record += f", {fh.read()}"
    with open(out, "w") as fh:
        fh.write(record)


@dsl.pipeline
def gated(passed: bool, out: str):
    gate = verdict(passed=passed)
    with dsl.If(gate.outputs["Output"] == True):  # noqa: E712 - KFP builds the condition from ==
        registered = register()
        audit(out=out, decision=gate.outputs["decision"], registration=registered.outputs["registration"])
    with dsl.Else():
        audit(out=out, decision=gate.outputs["decision"])


@pytest.mark.parametrize("passed, record", [(True, "passed=True, version 1"), (False, "passed=False")])
def test_one_branch_runs_and_both_end_in_the_audit(tmp_path, passed, record):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    out = tmp_path / "audit.txt"
    gated(passed=passed, out=str(out))
    assert out.read_text() == record
    assert bool(list((tmp_path / "root").glob("*/register/registration"))) == passed
