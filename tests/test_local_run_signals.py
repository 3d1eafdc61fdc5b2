"""SIGTERM to `medtune run` stops the task kfp.local is running and the MLflow server the run started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import yaml

from conftest import tiny_config_tree

MEDTUNE = Path(sys.executable).parent / "medtune"


def _train_task(proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> psutil.Process:
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"medtune run ended before training: {log.read_text()[-3000:]}"
        for child in parent.children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "kfp.dsl.executor_main" in cmdline and "train" in cmdline:
                return child
        time.sleep(0.5)
    raise AssertionError("the train task never started")


@pytest.mark.slow
def test_sigterm_stops_the_running_task_and_the_mlflow_server(tmp_path, tiny_model_dir):
    """A real `medtune run` (the tiny model, training long enough to be caught at it), stopped while its train
    task runs."""
    tree = tiny_config_tree(tiny_model_dir)
    tree["train"].update(max_steps=100_000, checkpoint_steps=0)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [str(MEDTUNE), "run", "--config", str(profile)]
    # stderr to a file, not a pipe nobody drains: a full pipe would block the run and look like a hang.
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        task = _train_task(proc, log)
        time.sleep(20)  # into its training loop (model loaded, data tokenized)
        server = json.loads((tmp_path / ".medtune" / "mlflow" / "server.json").read_text())
        proc.send_signal(signal.SIGTERM)
        # the train task finishes its step and saves a checkpoint first (SigtermCheckpoint): slow on a loaded CPU
        assert proc.wait(timeout=240) == 143, log.read_text()[-3000:]
        assert not psutil.pid_exists(task.pid) or task.status() == "zombie", "the train task outlived the run"
        # no retry of the stopped task was left behind either (kfp.local retries a failed task)
        tasks = [p for p in psutil.process_iter(["cmdline"]) if "kfp.dsl.executor_main" in (p.info["cmdline"] or [])
                 and str(tmp_path) in " ".join(p.info["cmdline"])]
        assert not tasks, "a task of the stopped run is still running"
        assert not psutil.pid_exists(server["pid"]) or psutil.Process(server["pid"]).status() == "zombie"
        assert not (tmp_path / ".medtune" / "mlflow" / "server.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_handler_stops_a_quiet_task(tmp_path):
    """A task that prints nothing is not stopped by a broken pipe when `medtune run` exits: the handler
    must stop it. Here `sleep` stands in for such a task, under the handler `medtune run` installs."""
    script = ("import signal, subprocess, sys\n"
              "from medtune.local_run import _terminate\n"
              "signal.signal(signal.SIGTERM, _terminate)\n"
              "task = subprocess.Popen(['sleep', '120'])\n"
              "print(task.pid, flush=True)\n"
              "task.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    task = psutil.Process(int(proc.stdout.readline()))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    gone, alive = psutil.wait_procs([task], timeout=10)
    for orphan in alive:
        orphan.kill()
    assert task in gone, "the task outlived medtune run"
