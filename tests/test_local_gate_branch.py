"""kfp.local must take the `dsl.If(gate passed)` branch exactly when the gate passes.

The gate component returns a plain bool next to its artifacts because kfp.local resolves a condition only
on `<task>-Output` channels (a NamedTuple output named `passed` is silently never true). This toy DAG has
the same shape as the real one and runs in seconds.
"""

import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, Output


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def verdict(passed: bool, decision: Output[Artifact]) -> bool:
    with open(decision.path, "w") as fh:
        fh.write(str(passed))
    return passed


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def mark(marker: str):
    with open(marker, "w") as fh:
        fh.write("registered")


@dsl.pipeline
def gated(passed: bool, marker: str):
    gate = verdict(passed=passed)
    with dsl.If(gate.outputs["Output"] == True):  # noqa: E712 - KFP builds the condition from ==
        mark(marker=marker)


@pytest.mark.parametrize("passed", [True, False])
def test_branch_runs_only_when_gate_passes(tmp_path, passed):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    marker = tmp_path / "registered"
    gated(passed=passed, marker=str(marker))
    assert marker.exists() == passed
