"""Where a step says it ran: the audit record and MLflow tags name an image only where one ran."""

from __future__ import annotations

import pytest

from conftest import ROOT
from medtune import images

REF = "registry.example/medtune-cpu:0.1.0"


@pytest.mark.parametrize("env,runner", [({images.ENV: REF}, "kfp.local"),  # SubprocessRunner: the task env only
                                        ({images.ENV: REF, images.VARIANT_ENV: "cpu"}, "container"),
                                        ({images.ENV: REF, "KFP_POD_NAME": "p"}, "kubernetes")])
def test_runner_and_image_follow_where_the_step_runs(monkeypatch, env, runner):
    for name in (images.ENV, images.VARIANT_ENV, "KFP_POD_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert images.runner() == runner
    assert images.current() == (None if runner == "kfp.local" else REF)


def test_the_images_say_they_are_one():
    assert f"{images.VARIANT_ENV}=${{VARIANT}}" in (ROOT / "images" / "Dockerfile").read_text()
