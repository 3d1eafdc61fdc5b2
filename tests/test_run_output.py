"""What a person sees from `medtune run`: through a terminal, through a pipe, when a step fails, and after.

Each test runs the real CLI on the tiny model through the committed compiled DAG (kfp.local).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_tree

pytestmark = pytest.mark.slow

MEDTUNE = Path(sys.executable).parent / "medtune"
NOISE = ("KFP Executor", "executorInput", "Loading weights", "FutureWarning", "gemm_4bit_forward")
URL = re.compile(r"https?://127\.0\.0\.1:\d+[^\s'\"]*")


def _profile(tmp_path: Path, tiny_model_dir: Path, **data) -> Path:
    tree = tiny_config_tree(tiny_model_dir)
    tree["train"].update(max_steps=2, eval_steps=1)
    tree["eval"].update(max_rows=4)
    tree["data"].update(data)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.fixture(scope="module")
def piped(tmp_path_factory, tiny_model_dir) -> dict:
    """One passing run through a pipe, as CI sees it."""
    workdir = tmp_path_factory.mktemp("piped")
    proc = subprocess.run([str(MEDTUNE), "run", "-c", str(_profile(workdir, tiny_model_dir)),
                           "--output-dir", "runs/piped"], cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=900)
    return {"proc": proc, "workdir": workdir, "output": proc.stdout + proc.stderr}


def test_a_piped_run_prints_one_line_per_step_event_and_stays_short(piped):
    assert piped["proc"].returncode == 0, piped["output"][-3000:]
    lines = piped["output"].splitlines()
    assert len(lines) < 60, "\n".join(lines)
    for noise in NOISE:
        assert noise not in piped["output"]
    def step_line(step: str, status: str) -> str | None:
        return next((line for line in lines if re.match(rf"\d\d:\d\d:\d\d {step}\s+{status}\b", line)), None)

    for step in ("open-run", "validate-data", "preprocess", "train", "evaluate", "gate"):
        assert step_line(step, "done"), step
    assert "step 2/2" in step_line("train", "done") and "val loss" in step_line("train", "done")
    gate = step_line("gate", "done")
    # whichever branch the gate took ran its audit; the other branch is shown skipped
    ran, skipped = (("register", "push", "audit"), ("audit-2",)) if "PASSED" in gate else \
        (("audit-2",), ("register", "push", "audit"))
    assert "PASSED" in gate or "FAILED" in gate
    for step in ran:
        assert step_line(step, "done"), step
    for step in skipped:
        assert "skipped by the gate" in step_line(step, "skipped"), step


def test_each_step_output_is_in_its_log_file(piped):
    logs = piped["workdir"] / "runs" / "piped" / "logs"
    assert (logs / "train.log").read_text().count("KFP Executor") > 0
    assert "Executing task 'evaluate'" in (logs / "evaluate.log").read_text()
    summary = json.loads((piped["workdir"] / "runs" / "piped" / "run.json").read_text())
    assert summary["logs"] == str(logs)
    # the audit record points at them: every step that ran before the audit, and the audit itself
    audit = "audit" if (logs / "audit.log").exists() else "audit-2"
    record = json.loads(next((piped["workdir"] / "runs" / "piped" / "artifacts").glob(f"*/{audit}/lineage"))
                        .read_text())
    assert record["logs"]["dir"] == str(logs)
    listed = record["logs"]["steps"]
    assert {"validate-data", "preprocess", "train", "evaluate", "gate", audit} <= set(listed)
    assert all(Path(path) == logs / f"{step}.log" and Path(path).exists() for step, path in listed.items())


def test_every_printed_url_resolves_on_the_server_medtune_ui_starts(piped):
    printed = set(URL.findall(piped["output"]))
    assert any("/#/experiments/" in url and "/runs/" in url for url in printed), printed
    ui = subprocess.Popen([str(MEDTUNE), "ui"], cwd=piped["workdir"], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        first = ui.stdout.readline()
        served = URL.search(first).group(0)
        base = served.split("/#")[0]
        for url in printed:
            assert url.startswith(base), f"{url} is not on the server `medtune ui` started ({base})"
            route = url.split("/#", 1)[1] if "/#" in url else ""
            if match := re.search(r"/experiments/(\d+)/runs/(\w+)", route):
                api = f"{base}/ajax-api/2.0/mlflow/runs/get?run_id={match.group(2)}"
                with urllib.request.urlopen(api, timeout=10) as resp:
                    assert resp.status == 200
                    assert json.load(resp)["run"]["info"]["experiment_id"] == match.group(1)
            elif match := re.search(r"/experiments/(\d+)", route):
                api = f"{base}/ajax-api/2.0/mlflow/experiments/get?experiment_id={match.group(1)}"
                with urllib.request.urlopen(api, timeout=10) as resp:
                    assert resp.status == 200
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_runs_and_show_list_the_run_from_its_files(piped):
    listed = subprocess.run([str(MEDTUNE), "runs"], cwd=piped["workdir"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "piped" in line)
    assert "tiny" in row and ("passed" in row or "failed" in row)
    shown = subprocess.run([str(MEDTUNE), "show", "piped"], cwd=piped["workdir"], capture_output=True, text=True)
    assert shown.returncode == 0
    assert "lineage" in shown.stderr and "report" in shown.stderr


def test_a_terminal_gets_the_live_view(tmp_path, tiny_model_dir):
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([str(MEDTUNE), "run", "-c", str(_profile(tmp_path, tiny_model_dir)), "--output-dir",
                             "runs/tty"], cwd=tmp_path, env={**_env(), "COLUMNS": "160", "TERM": "xterm"},
                            stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + 900
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "✓ done" in screen and "– skipped" in screen
    for noise in NOISE:
        assert noise not in screen
    assert (tmp_path / "runs" / "tty" / "logs" / "train.log").exists()


def test_a_failing_step_ends_with_its_name_cause_and_log(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"question": "?", "answer": ""}) + "\n" for _ in range(5)))
    proc = subprocess.run([str(MEDTUNE), "run", "-c", str(_profile(tmp_path, tiny_model_dir, path=str(bad))),
                           "--output-dir", "runs/bad"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert re.search(r"error: step validate-data failed: \w+: .*no rows passed validation", output), output[-2000:]
    log = tmp_path / "runs" / "bad" / "logs" / "validate-data.log"
    assert f"log: {log}" in output.replace("\n", "") or str(log) in output
    assert "Traceback" in log.read_text()  # the full story is in the log


def test_the_report_renders_in_a_browser_with_its_charts(piped, tmp_path):
    """Headless Chromium takes a screenshot of report.html, as a person would open it."""
    import base64
    import io
    import shutil

    import matplotlib.image as mpimg

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: scripts/test installs it (apt-get install chromium)")
    report = Path(json.loads((piped["workdir"] / "runs" / "piped" / "run.json").read_text())["report"])
    html = report.read_text()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 2, "the loss curve and the metric chart"
    for encoded in images:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05, "a blank chart"
    page = tmp_path / "report.html"
    shutil.copyfile(report, page)
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    screenshot = mpimg.imread(shot)
    drawn = (screenshot[..., :3].mean(axis=2) < 0.9).mean()
    assert drawn > 0.03, f"only {drawn:.1%} of the page is drawn"
    # the charts are colour: blue/orange bars and lines are on the page, not only black text
    # the charts' lines, markers and legends are in colour, not only black text (the tiny model's bars are 0)
    colourful = int((screenshot[..., :3].max(axis=2) - screenshot[..., :3].min(axis=2) > 0.3).sum())
    assert colourful > 1000, f"no chart colours on the rendered page ({colourful} pixels)"
