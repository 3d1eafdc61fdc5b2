"""The run view routes kfp.local's stream into per-step logs and shows one line per step event."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from conftest import ROOT
from medtune import runview

TASKS = ["open-run", "train", "gate", "register", "audit-2"]


def _view(tmp_path: Path) -> tuple[runview.RunView, io.StringIO]:
    screen = io.StringIO()
    return runview.RunView(tmp_path / "logs", TASKS, Console(file=screen, width=200), live=False), screen


def _kfp(view: runview.RunView, task: str, body: list[str], status: str = "SUCCESS") -> None:
    view.write(f"21:25:01.650 - INFO - Executing task \x1b[96m'{task}'\x1b[0m\n")
    for line in body:
        view.write(f"    {line}\n")
    view.write(f"21:25:05.373 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m\n")


def test_lines_go_to_the_log_of_the_step_that_printed_them(tmp_path):
    view, screen = _view(tmp_path)
    with view:
        _kfp(view, "open-run", ['"executorInput": {...}'])
        _kfp(view, "train", ["Tokenizing train dataset: 100%", runview.EVENT_PREFIX + json.dumps(
            {"step": 8, "max_steps": 32, "loss": 2.5, "tokens_per_s": 301.2})])
        view.write("a line between tasks\n")
    assert "executorInput" in (tmp_path / "logs" / "open-run.log").read_text()
    train_log = (tmp_path / "logs" / "train.log").read_text()
    assert "Tokenizing train dataset" in train_log and "executorInput" not in train_log
    assert "a line between tasks" in (tmp_path / "logs" / "medtune.log").read_text()
    shown = screen.getvalue()
    assert "executorInput" not in shown and "Tokenizing" not in shown
    done = [line for line in shown.splitlines() if " train " in line and "done" in line]
    assert len(done) == 1 and "step 8/32" in done[0] and "loss 2.500" in done[0] and "301 tok/s" in done[0]


def test_a_task_run_again_shows_only_its_own_figures(tmp_path):
    # kfp.local runs a sweep's trials one after another under one task name
    view, screen = _view(tmp_path)
    with view:
        _kfp(view, "train", [runview.EVENT_PREFIX + json.dumps({"step": 10, "max_steps": 20, "eval_loss": 2.218})])
        _kfp(view, "train", [runview.EVENT_PREFIX + json.dumps({"step": 4, "max_steps": 20, "loss": 2.353})])
    done = [line for line in screen.getvalue().splitlines() if " train " in line and "done" in line]
    assert len(done) == 2 and "val loss 2.218" in done[0]
    assert "step 4/20" in done[1] and "loss 2.353" in done[1] and "val loss" not in done[1]


def test_steps_that_never_ran_are_shown_skipped_by_the_gate(tmp_path):
    view, screen = _view(tmp_path)
    with view:
        for task in ("open-run", "train", "gate", "register"):
            _kfp(view, task, [])
    assert view.steps["audit-2"].status == "skipped"
    assert [line for line in screen.getvalue().splitlines() if "audit-2" in line][0].split()[2] == "skipped"


def test_a_failed_step_names_its_one_line_cause_from_its_log(tmp_path):
    view, screen = _view(tmp_path)
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                 "medtune.ingest.DataError: /data/qa.jsonl: line 3: field 'answer' is missing"]
    with view:
        _kfp(view, "open-run", [])
        _kfp(view, "train", traceback, status="FAILURE")
    step = view.failed()
    assert step.name == "train"
    assert step.detail == "DataError: /data/qa.jsonl: line 3: field 'answer' is missing"
    assert "Traceback" not in screen.getvalue() and "DataError: /data/qa.jsonl" in screen.getvalue()


def test_progress_bars_become_the_step_figures_and_a_pipe_gets_few_lines(tmp_path):
    view, screen = _view(tmp_path)
    with view:
        view.write("21:25:01.650 - INFO - Executing task 'gate'\n")
        for n in range(1, 51):  # 50 refreshes of a bar within the throttle interval
            view.write(f"    candidate: {2 * n}%|##   | {n}/50 [00:0{n % 10}<00:04, 1.2batch/s]\n")
        assert view.steps["gate"].figures["n"] == 50
    assert len([line for line in screen.getvalue().splitlines() if line.split()[1] == "gate"]) <= 2


def test_dag_tasks_follow_the_compiled_pipeline_in_running_order():
    tasks = runview.dag_tasks(ROOT / "pipelines" / "medtune.yaml")
    assert tasks[0] == "open-run"
    assert tasks.index("validate-data") < tasks.index("preprocess") < tasks.index("train") < tasks.index("gate")
    assert tasks.index("register") < tasks.index("push") < tasks.index("audit")
    assert not any(name.startswith("condition") for name in tasks)
