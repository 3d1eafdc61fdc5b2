"""The local MLflow tracking server of `medtune run`: one per state directory, shared by concurrent runs.

Every run that uses a state directory (`.medtune/mlflow` under its working directory) goes through one
lock (`server.lock`, flock): the first starts the server, later ones join it, and the last one to leave
stops it, whoever started it. `server.json` names the server (pid, its start time, port) and its clients
(pid and start time each), so a client killed without leaving (SIGKILL) is pruned by the next one.
Without this, two runs starting at once raced in the SQLite schema migration, and a run that stopped
"its" server when it ended pulled it away from a run still using it.

The server binds port 0 itself (uvicorn asks the kernel for a free port) and medtune reads the port from
the listening socket of the server's own processes: no port is picked, released and bound again later,
which another process could take in between.

A `server.json` is trusted only when its pid is alive with the recorded start time (not a recycled pid),
runs `mlflow server` on this directory's database, listens on the recorded port, and answers an MLflow
API call there. Anything else (a crashed server, some other HTTP server on the port) is stale and
replaced. Everything is private to the user: the directory 0700, database, artifacts, log and state
0600/0700 (the server runs with umask 077).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
STATE, LOCK, LOG = "server.json", "server.lock", "server.log"


class ServerError(RuntimeError):
    """The local server could not be started or joined; the message names its log."""


def answers_mlflow(uri: str) -> bool:
    """Whether `uri` serves the MLflow tracking API (an experiment lookup), not merely some /health page."""
    try:
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get?experiment_id=0", timeout=5) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and isinstance(body.get("experiment"), dict) \
        and body["experiment"].get("experiment_id") == "0"


@contextmanager
def local_server(state_dir: Path, timeout_s: float = 120, port: int | None = None) -> Iterator[str]:
    """A real MLflow server on loopback backed by SQLite in `state_dir`, started or joined; yields its URI.

    A server this starts listens on `port`, by default the store's usual port, so the links a run printed
    work again on the server `medtune ui` starts later; when that port is taken, on any free one."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = {"id": uuid.uuid4().hex, "pid": os.getpid(), "started": psutil.Process().create_time()}
    with _locked(state_dir):
        _private(state_dir)
        state = _current(state_dir, timeout_s) or _start_preferring(state_dir, timeout_s,
                                                                    port or usual_port(state_dir))
        state["clients"] = [*_living(state.get("clients", [])), me]
        _write_state(state_dir, state)
    try:
        yield state["uri"]
    finally:
        with _locked(state_dir):
            _leave(state_dir, me)


def _private(state_dir: Path) -> None:
    """The directory 0700 and what is in it 0600/0700, also when an older medtune left it world-readable."""
    state_dir.chmod(0o700)
    for path in state_dir.iterdir():
        path.chmod(0o700 if path.is_dir() else 0o600)


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_state(state_dir: Path) -> dict | None:
    try:
        state = json.loads((state_dir / STATE).read_text())
    except (OSError, ValueError):
        return None
    keys = {"uri": str, "pid": int, "started": float, "port": int, "clients": list}
    return state if isinstance(state, dict) and all(isinstance(state.get(k), t) for k, t in keys.items()) else None


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f".{STATE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, state_dir / STATE)


def _process(pid: int, started: float) -> psutil.Process | None:
    """The process `pid` if it is the one that started at `started` and has not ended."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _living(clients: list) -> list[dict]:
    return [c for c in clients if isinstance(c, dict) and _process(c.get("pid", -1), c.get("started", 0.0))]


def _database(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'mlflow.db'}"


def _serves(proc: psutil.Process, state_dir: Path) -> bool:
    """Whether `proc` is an `mlflow server` on this directory's database."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return {"mlflow", "server", _database(state_dir)} <= set(cmdline)


def _listening_port(proc: psutil.Process) -> int | None:
    """The loopback port the server's processes (the CLI and the uvicorn it runs) listen on."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return None
    for member in family:
        try:
            connections = member.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                return conn.laddr.port
    return None


def _current(state_dir: Path, timeout_s: float) -> dict | None:
    """The recorded server if it is still ours and serving; None (after saying why) when it is stale."""
    state = _read_state(state_dir)
    if state is None:
        return None
    proc = _process(state["pid"], state["started"])
    if proc is None or not _serves(proc, state_dir):
        log.warning("%s: pid %s is not this directory's MLflow server any more; starting a new one",
                    state_dir / STATE, state["pid"])
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # a busy machine can keep a healthy server from answering at once
        if _listening_port(proc) == state["port"] and answers_mlflow(state["uri"]):
            return state
        time.sleep(1)
    raise ServerError(f"the MLflow server of {state_dir} (pid {state['pid']}) does not answer the MLflow API at "
                      f"{state['uri']}; see {state_dir / LOG}, or stop it (kill {state['pid']}) to start afresh")


def usual_port(state_dir: Path) -> int:
    """A port derived from the store's path (15000-24999): the same for every run and `medtune ui` on it."""
    import hashlib

    return 15000 + int(hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest(), 16) % 10000


def _start_preferring(state_dir: Path, timeout_s: float, port: int) -> dict:
    """The server binds `port` itself; when another process has it (now, or between the check and the bind),
    port 0: the kernel picks a free one. Either way the port is read back from the server's socket."""
    if _port_free(port):
        try:
            return _start(state_dir, timeout_s, port)
        except ServerError as exc:
            if "address already in use" not in str(exc).lower():
                raise
    log.info("port %d is taken; the MLflow server takes a free one", port)
    return _start(state_dir, timeout_s, 0)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # as uvicorn binds: a port a stopped server left in TIME_WAIT is free for the next one
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start(state_dir: Path, timeout_s: float, port: int = 0) -> dict:
    log_path = state_dir / LOG
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", _database(state_dir), "--artifacts-destination", str(state_dir / "artifacts")],
            stdout=fd, stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
            # The GenAI job runner forks eight more Python processes; tracking and the registry don't need it.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    finally:
        os.close(fd)
    proc = psutil.Process(server.pid)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if server.poll() is not None:
                raise ServerError(f"the MLflow server exited with status {server.returncode} before serving; "
                                  f"see {log_path}:\n{_tail(log_path, start)}")
            port = _listening_port(proc)
            if port and answers_mlflow(f"http://127.0.0.1:{port}"):
                break
            if time.monotonic() > deadline:
                raise ServerError(f"the MLflow server did not answer within {timeout_s:.0f} s; see {log_path}:\n"
                                  f"{_tail(log_path, start)}")
            time.sleep(0.5)
    except BaseException:
        _stop(server.pid, proc.create_time())
        raise
    return {"uri": f"http://127.0.0.1:{port}", "pid": server.pid, "started": proc.create_time(), "port": port,
            "clients": []}


def _tail(path: Path, start: int, lines: int = 15) -> str:
    with path.open("rb") as fh:
        fh.seek(start)
        return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])


def _leave(state_dir: Path, me: dict) -> None:
    """Drop this client; the last one out stops the server."""
    state = _read_state(state_dir)
    if state is None:
        return
    state["clients"] = [c for c in _living(state["clients"]) if c.get("id") != me["id"]]
    if state["clients"]:
        _write_state(state_dir, state)
        return
    _stop(state["pid"], state["started"])
    (state_dir / STATE).unlink(missing_ok=True)


def _stop(pid: int, started: float) -> None:
    """Stop the server and its workers (its own process group), unless the pid is no longer the server."""
    proc = _process(pid, started)
    if proc is None:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
