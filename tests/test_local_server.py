"""The local MLflow server `medtune run` starts or joins: real servers, real processes, no mocks.

One lock and a client list per state directory: concurrent runs share one server, the last to leave
stops it; a stale server.json (dead pid, or some other HTTP server) is replaced; files are private.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from medtune import local_server, tracking
from medtune.local_server import ServerError

CLIENT = """
import sys, time
from pathlib import Path
from medtune.local_server import local_server
with local_server(Path(sys.argv[1])) as uri:
    print(uri, flush=True)
    sys.stdin.readline()  # hold the server until the test says go
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client(state: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", CLIENT, str(state)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _leave(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]


def test_concurrent_clients_share_one_server_and_the_last_one_out_stops_it(tmp_path):
    """Two processes started together (what two `medtune run` do): one server, no second start racing the
    first on the SQLite migration; the starter leaving first does not pull the server from the other."""
    state = tmp_path / "state"
    first, second = _client(state), _client(state)
    try:
        uris = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert len(uris) == 1, uris
        uri = uris.pop()
        server = json.loads((state / "server.json").read_text())
        assert server["uri"] == uri and {c["pid"] for c in server["clients"]} == {first.pid, second.pid}
        assert (state / "server.log").read_text().count("Creating initial MLflow database tables") == 1
        _leave(first)
        assert local_server.answers_mlflow(uri), "the server left with the first client"
        _leave(second)
        assert not psutil.pid_exists(server["pid"]) or psutil.Process(server["pid"]).status() == "zombie"
        assert not (state / "server.json").exists() and not tracking.healthy(uri)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()


def test_sigterm_to_the_run_that_started_the_server_leaves_it_to_the_other(tmp_path):
    """`medtune run`'s SIGTERM handler stops its own tasks, not the server its process started for others."""
    state = tmp_path / "state"
    starter_script = ("import signal, sys\nfrom pathlib import Path\nfrom medtune.local_run import _terminate\n"
                      "from medtune.local_server import local_server\nsignal.signal(signal.SIGTERM, _terminate)\n"
                      "with local_server(Path(sys.argv[1])) as uri:\n    print(uri, flush=True)\n"
                      "    sys.stdin.readline()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    starter = subprocess.Popen([sys.executable, "-c", starter_script, str(state)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    other = None
    try:
        uri = starter.stdout.readline().strip()
        other = _client(state)
        assert other.stdout.readline().strip() == uri
        starter.terminate()
        assert starter.wait(timeout=60) == 143
        assert local_server.answers_mlflow(uri), "the SIGTERM took the server from the other run"
        _leave(other)
        assert not local_server.answers_mlflow(uri)
    finally:
        for proc in (starter, other):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_a_client_killed_without_leaving_is_pruned(tmp_path):
    state = tmp_path / "state"
    victim = _client(state)
    uri = victim.stdout.readline().strip()
    victim.kill()  # SIGKILL: no finally, no leave
    victim.wait()
    with local_server.local_server(state) as joined:
        assert joined == uri
        clients = json.loads((state / "server.json").read_text())["clients"]
        assert [c["pid"] for c in clients] == [os.getpid()], "the dead client was pruned"
    assert not local_server.answers_mlflow(uri)


def test_joiner_outliving_the_starter_keeps_the_server_in_one_process(tmp_path):
    state = tmp_path / "state"
    starter, joiner = ExitStack(), ExitStack()
    uri = starter.enter_context(local_server.local_server(state))
    assert joiner.enter_context(local_server.local_server(state)) == uri
    starter.close()
    assert local_server.answers_mlflow(uri)
    joiner.close()
    assert not local_server.answers_mlflow(uri)


def test_state_is_private_to_the_user(tmp_path):
    import mlflow

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "server.log").write_text("from an older medtune\n")
    (state / "server.log").chmod(0o644)
    with local_server.local_server(state) as uri:
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("private"))
        client.log_text(run.info.run_id, "PHI-free but private", "note.txt")
        assert _mode(state) == 0o700
        for name in ("mlflow.db", "server.log", "server.json", "server.lock"):
            assert _mode(state / name) == 0o600, name
        artifacts = [p for p in (state / "artifacts").rglob("*")]
        assert artifacts and all(_mode(p) == (0o700 if p.is_dir() else 0o600) for p in artifacts), \
            {str(p): oct(_mode(p)) for p in artifacts}


def test_stale_state_naming_another_http_server_is_replaced(tmp_path):
    """A server.json pointing at something that answers /health (and is alive) but is not this directory's
    MLflow server: rejected, a real server started, the impostor left alone."""
    state = tmp_path / "state"
    state.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("OK")
    impostor = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"], cwd=site,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(impostor.stdout.readline().split(" port ")[1].split()[0])
        fake = f"http://127.0.0.1:{port}"
        assert tracking.healthy(fake), "the impostor answers /health like MLflow does"
        assert not local_server.answers_mlflow(fake)
        (state / "server.json").write_text(json.dumps({
            "uri": fake, "pid": impostor.pid, "started": psutil.Process(impostor.pid).create_time(), "port": port,
            "clients": []}))
        with local_server.local_server(state) as uri:
            assert uri != fake and local_server.answers_mlflow(uri)
        assert impostor.poll() is None, "not ours to stop"
    finally:
        impostor.kill()
        impostor.wait()


def test_a_start_failure_is_an_error_naming_the_log(tmp_path):
    state = tmp_path / "state"
    (state / "mlflow.db").mkdir(parents=True)  # SQLite cannot open a directory: the server never serves
    with pytest.raises(ServerError, match=r"did not answer within 40 s; see .*/state/server\.log") as caught:
        with local_server.local_server(state, timeout_s=40):
            pass
    assert "unable to open database file" in str(caught.value), "the log's tail says why"
    assert not (state / "server.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(state / "mlflow.db") in " ".join(
        p.info["cmdline"] or [])], "the failed server was stopped"


def _listening(server: dict) -> set[int]:
    proc = psutil.Process(server["pid"])
    return {c.laddr.port for p in [proc, *proc.children(recursive=True)]
            for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def _port_argument(server: dict) -> str:
    cmdline = psutil.Process(server["pid"]).cmdline()
    return cmdline[cmdline.index("--port") + 1]


def test_the_server_binds_the_stores_usual_port_itself(tmp_path):
    """Runs and `medtune ui` on one store get the same port, so printed links keep working."""
    state = tmp_path / "state"
    with local_server.local_server(state) as uri:
        server = json.loads((state / "server.json").read_text())
        assert server["port"] == local_server.usual_port(state) and _listening(server) == {server["port"]}
        assert uri == f"http://127.0.0.1:{server['port']}" and _port_argument(server) == str(server["port"])


def test_a_taken_usual_port_gives_a_free_one_read_from_the_servers_socket(tmp_path):
    """No port is picked, released and bound later: the server binds port 0 and the port is read back."""
    import socket

    state = tmp_path / "state"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", local_server.usual_port(state)))
        squatter.listen()
        with local_server.local_server(state) as uri:
            server = json.loads((state / "server.json").read_text())
            assert server["port"] != local_server.usual_port(state) and _listening(server) == {server["port"]}
            assert uri == f"http://127.0.0.1:{server['port']}" and _port_argument(server) == "0"


@pytest.mark.slow
def test_two_concurrent_medtune_runs_share_the_server_and_both_finish(tmp_path, tiny_model_dir):
    """The issue's reproduction: two `medtune run` started together in one directory (tiny model)."""
    import yaml

    from conftest import tiny_config_tree

    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(tiny_config_tree(tiny_model_dir)))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    medtune = Path(sys.executable).parent / "medtune"
    runs = [subprocess.Popen([str(medtune), "run", "--config", str(profile), "--json", "--output-dir",
                              str(tmp_path / "runs" / name)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    try:
        outputs = [proc.communicate(timeout=1500) for proc in runs]
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(runs, outputs):
        assert proc.returncode == 0, err[-4000:]
        assert "Traceback" not in err, err[-4000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert summaries[0]["tracking_uri"] == summaries[1]["tracking_uri"], "one server for both"
    assert summaries[0]["run_id"] != summaries[1]["run_id"]
    state = tmp_path / ".medtune" / "mlflow"
    assert (state / "server.log").read_text().count("Creating initial MLflow database tables") == 1
    assert not (state / "server.json").exists(), "the last run out stopped it"
    assert not local_server.answers_mlflow(summaries[0]["tracking_uri"])
