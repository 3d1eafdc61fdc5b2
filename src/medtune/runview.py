"""What `medtune run` shows while the DAG runs: one line per step, full output in `logs/<step>.log`.

kfp.local prints every task's executor input, library progress bars and warnings to stdout (~1,600 lines for
the default profile). The view takes that stream instead: each line goes to the log file of the task that
printed it, and only step events reach the screen: started, key figures as they come (from `emit` lines the
steps print and from progress bars), done, failed, or skipped by the gate. A terminal gets a live table; a
pipe (CI) gets one line per event, progress throttled, so a passing run stays short.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EVENT_PREFIX = "@@medtune "
# kfp.local's orchestrator lines (ANSI colours stripped first).
TASK_START = re.compile(r"Executing task '([\w-]+)'")
TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A tqdm bar: "answering: 40%|####   | 2/5 [00:03<00:04, ...]" (kfp reads it as one line per refresh).
TQDM = re.compile(r"(?P<desc>[^:|]{1,60}):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) "
                  r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+)")
# The last line of a Python traceback: "medtune.ingest.DataError: data.jsonl: line 3: ..."
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?P<kind>[A-Za-z_]\w*(?:Error|Exception|Stopped|Failed|Fault|Preempted"
                       r"|Interrupt))(?::\s*(?P<message>.*))?$")
PROGRESS_EVERY_S = 15.0  # a pipe gets at most one progress line per step in this interval


def emit(**fields) -> None:
    """Print one step event for the view (a step runs in its own process; stdout is the only channel)."""
    print(EVENT_PREFIX + json.dumps(fields, default=str), flush=True)


@dataclass
class Step:
    name: str
    status: str = "waiting"  # waiting, running, done, failed, skipped
    started: float | None = None
    ended: float | None = None
    detail: str = ""
    figures: dict = field(default_factory=dict)
    last_printed: float = 0.0
    attempt: int = 1

    def elapsed(self, now: float) -> str:
        if self.started is None:
            return ""
        return _duration((self.ended or now) - self.started)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe(figures: dict) -> str:
    """A step's key figures as one short phrase."""
    parts = []
    f = figures
    if "rows_read" in f:
        parts.append(f"{f['rows_kept']}/{f['rows_read']} rows kept, {f['rows_quarantined']} quarantined")
    if "splits" in f:
        parts.append(" / ".join(f"{n} {r}" for n, r in f["splits"].items()))
    if "step" in f:
        parts.append(f"step {f['step']}/{f.get('max_steps', '?')}")
    for key, label in (("loss", "loss"), ("eval_loss", "val loss")):
        if f.get(key) is not None:
            parts.append(f"{label} {f[key]:.3f}")
    if f.get("tokens_per_s"):
        parts.append(f"{f['tokens_per_s']:.0f} tok/s")
    if f.get("eta_s") is not None:
        parts.append(f"ETA {_duration(f['eta_s'])}")
    if "bar" in f:
        parts.append(f"{f['bar']} {f['n']}/{f['total']}" + (f" ETA {f['eta']}" if f.get("eta") not in (None, "?")
                                                              else ""))
    if "headline" in f:
        parts.append(f["headline"])
    if "passed" in f:
        parts.append(("PASSED" if f["passed"] else "FAILED") + (f": {f['reason']}" if f.get("reason") else ""))
    if "note" in f:
        parts.append(f["note"])
    return ", ".join(parts)


class RunView(io.TextIOBase):
    """A text stream (stands in for stdout/stderr during the run) that routes lines and shows step events."""

    def __init__(self, log_dir: Path, tasks: list[str], console, live: bool, verbose: bool = False,
                 passthrough=None):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.steps = {name: Step(name) for name in tasks}
        from rich.console import Console

        # Bound to the stream it writes to now: during the run sys.stdout/stderr are this view.
        self.console = Console(file=console.file, stderr=console.stderr, width=console.width if live else 200)
        self.verbose = verbose
        self.passthrough = passthrough or sys.__stdout__
        self.current: str | None = None
        self._buffer = ""
        self._files: dict[str, io.TextIOBase] = {}
        self._live = None
        if live and not verbose:
            from rich.live import Live

            self._live = Live(self._table(), console=console, refresh_per_second=4, transient=False)

    # -- the stream side -------------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        for handle in self._files.values():
            handle.flush()

    def isatty(self) -> bool:  # tqdm and rich inside this process must not draw on the view
        return False

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> RunView:
        if self._live:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._buffer:
            self._line(self._buffer)
            self._buffer = ""
        now = time.monotonic()
        for step in self.steps.values():
            if step.status == "waiting" and exc[0] is None:
                step.status, step.detail = "skipped", "skipped by the gate"
            elif step.status == "running" and exc[0] is not None:
                step.status, step.ended = "failed", now
                step.detail = self.cause(step.name) or step.detail
        if self._live:
            self._live.update(self._table())
            self._live.stop()
        else:
            for step in self.steps.values():
                if step.status == "skipped":
                    self._print(step)
        for handle in self._files.values():
            handle.close()

    def log_path(self, task: str) -> Path:
        return self.log_dir / f"{task}.log"

    def failed(self) -> Step | None:
        return next((s for s in self.steps.values() if s.status == "failed"), None)

    def cause(self, task: str) -> str:
        """The one-line cause of a failed step: the last exception line in its log."""
        path = self.log_path(task)
        if not path.exists():
            return ""
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if found := EXCEPTION.match(line.strip()):
                return f"{found['kind']}: {found['message'] or ''}".strip().rstrip(":")
        return ""

    # -- routing --------------------------------------------------------------------------------------
    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw)
        if self.verbose:
            self.passthrough.write(raw + "\n")
            self.passthrough.flush()
        if started := TASK_START.search(line):
            self._start(started.group(1))
        self._log(line)
        if ended := TASK_END.search(line):
            self._end(ended.group(1), ended.group(2))
            return
        text = line.strip()
        if self.current is None:
            return
        if text.startswith(EVENT_PREFIX):
            try:
                figures = json.loads(text[len(EVENT_PREFIX):])
            except json.JSONDecodeError:
                return
            self._update(self.current, figures)
        elif bar := TQDM.match(text):
            self._update(self.current, {"bar": bar["desc"].strip(), "n": int(bar["n"]),
                                        "total": int(bar["total"]), "eta": bar["eta"]}, progress=True)

    def _log(self, line: str) -> None:
        name = self.current or "medtune"
        handle = self._files.get(name)
        if handle is None:
            # line-buffered: `tail -f logs/<step>.log` follows a long step as it runs
            handle = self._files[name] = self.log_path(name).open("a", encoding="utf-8", buffering=1)
        handle.write(line + "\n")

    def _start(self, task: str) -> None:
        step = self.steps.setdefault(task, Step(task))
        # kfp retries a failed task under the same name (the step's retry policy)
        step.attempt += step.status == "failed"
        step.status, step.started, step.ended = "running", time.monotonic(), None
        step.figures = {}  # a sweep's trials are one task name run again: none shows the last trial's figures
        step.detail = f"retry {step.attempt - 1} after: {step.detail}" if step.attempt > 1 else ""
        self.current = task
        self._show(step)

    def _end(self, task: str, status: str) -> None:
        step = self.steps.setdefault(task, Step(task))
        step.ended = time.monotonic()
        if task in self._files:
            self._files[task].flush()
        if status == "SUCCESS":
            step.status = "done"
            step.figures.pop("bar", None)
            step.figures.pop("eta_s", None)
            step.detail = describe(step.figures)
        else:
            step.status = "failed"
            step.detail = self.cause(task)
        self.current = None
        self._show(step)

    def _update(self, task: str, figures: dict, progress: bool = False) -> None:
        step = self.steps[task]
        if "step" in figures and figures.get("max_steps") and step.started is not None:
            done = figures["step"] / figures["max_steps"]
            if done > 0:
                figures = {**figures, "eta_s": (time.monotonic() - step.started) * (1 - done) / done}
        step.figures.update(figures)
        step.detail = describe(step.figures)
        self._show(step, progress=progress or "step" in figures)

    # -- output ---------------------------------------------------------------------------------------
    def _show(self, step: Step, progress: bool = False) -> None:
        if self._live:
            self._live.update(self._table())
            return
        if self.verbose:
            return
        now = time.monotonic()
        if progress and now - step.last_printed < PROGRESS_EVERY_S:
            return
        step.last_printed = now
        self._print(step)

    def _print(self, step: Step) -> None:
        colour = {"done": "green", "failed": "red", "running": "cyan", "skipped": "dim"}.get(step.status, "")
        status = f"[{colour}]{step.status:<8}[/]" if colour else f"{step.status:<8}"
        self.console.print(f"{time.strftime('%H:%M:%S')} {step.name:<16} {status} {step.elapsed(time.monotonic()):>6}"
                           f"  {step.detail}".rstrip(), highlight=False, soft_wrap=True)

    def _table(self):
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        for column in ("step", "status", "time", ""):
            table.add_column(column, no_wrap=column != "")
        now = time.monotonic()
        colours = {"done": "green", "failed": "red", "running": "cyan", "skipped": "dim", "waiting": "dim"}
        for step in self.steps.values():
            mark = {"done": "✓", "failed": "✗", "running": "…", "skipped": "–", "waiting": " "}[step.status]
            table.add_row(step.name, f"[{colours[step.status]}]{mark} {step.status}[/]", step.elapsed(now),
                          step.detail)
        return table


def dag_tasks(compiled: Path) -> list[str]:
    """The task names of a compiled pipeline in running order (by dependency depth), condition groups unfolded."""
    import yaml

    spec = next(yaml.safe_load_all(compiled.read_text()))  # the second document is the platform spec
    components = spec.get("components", {})
    depth: dict[str, int] = {}

    def walk(tasks: dict, outer: int) -> None:
        pending = dict(tasks)
        while pending:  # a task's depth is known once its siblings upstream have theirs
            for name, task in list(pending.items()):
                upstream = task.get("dependentTasks", [])
                if any(u in pending for u in upstream):
                    continue
                level = max([outer, *(depth[u] + 1 for u in upstream)])
                depth[name] = level
                del pending[name]
                ref = components.get(task.get("componentRef", {}).get("name", ""), {})
                if "dag" in ref:
                    walk(ref["dag"].get("tasks", {}), level)
                    depth[name] = max(depth.values())  # a group ends when its last task does
                    groups.add(name)

    groups: set[str] = set()
    walk(spec["root"]["dag"]["tasks"], 0)
    return sorted((n for n in depth if n not in groups), key=lambda n: (depth[n], n))
