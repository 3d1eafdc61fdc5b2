"""`medtune submit` and `medtune schedule` against a stand-in for the KFP API server.

No Kubeflow cluster exists where these tests run, so a local HTTP server answers the KFP v2beta1 REST
calls with canned bodies and records every request. The tests check what a real server would receive
from `kfp.Client`: the uploaded pipeline, the run's parameters, the schedule, and that nothing secret
travels. What the server does with them (scheduling pods) is not tested here.
"""

from __future__ import annotations

import getpass
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from medtune import cli, kubeflow
from medtune import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
API = "/apis/v2beta1"


class FakeKfp:
    """Canned KFP answers; `existing` says which pipeline / recurring runs the server already has."""

    def __init__(self, pipeline_exists: bool = True, recurring: list[dict] | None = None):
        self.requests: list[dict] = []
        self.pipeline_exists = pipeline_exists
        self.recurring = recurring or []

    def answer(self, method: str, path: str, query: dict) -> tuple[int, dict]:
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and path == f"{API}/pipelines":
            return 200, {"pipelines": [{"pipeline_id": "p-1", "display_name": "medtune"}]} if self.pipeline_exists \
                else {}
        if method == "POST" and path == f"{API}/pipelines/upload":
            return 200, {"pipeline_id": "p-new", "display_name": query["name"][0]}
        if method == "GET" and path == f"{API}/pipelines/p-new/versions":
            return 200, {"pipeline_versions": [{"pipeline_id": "p-new", "pipeline_version_id": "v-first"}]}
        if method == "POST" and path == f"{API}/pipelines/upload_version":
            return 200, {"pipeline_id": query["pipelineid"][0], "pipeline_version_id": "v-7",
                         "display_name": query["name"][0]}
        if method == "GET" and path == f"{API}/experiments":
            return 200, {"experiments": [{"experiment_id": "e-1", "display_name": "medtune"}]}
        if method == "POST" and path == f"{API}/runs":
            return 200, {"run_id": "run-42", "display_name": "x"}
        if method == "GET" and path == f"{API}/recurringruns":
            return 200, {"recurringRuns": self.recurring} if self.recurring else {}
        if method == "POST" and path == f"{API}/recurringruns":
            return 200, {"recurring_run_id": "rr-9"}
        if method == "DELETE" and path.startswith(f"{API}/recurringruns/"):
            return 200, {}
        return 404, {"error": f"no fake for {method} {path}"}


@pytest.fixture
def kfp_server():
    servers = []

    def start(fake: FakeKfp) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                query = parse_qs(url.query)
                fake.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()}})
                status, payload = fake.answer(self.command, url.path, query)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def _calls(fake: FakeKfp) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in fake.requests if not r["path"].endswith("/healthz")]


def _json_body(fake: FakeKfp, method: str, path: str) -> dict:
    [request] = [r for r in fake.requests if r["method"] == method and r["path"] == path]
    return json.loads(request["body"])


def _uploaded_yaml(fake: FakeKfp, path: str) -> str:
    [request] = [r for r in fake.requests if r["path"] == path]
    text = request["body"].decode()
    start = text.index("# PIPELINE DEFINITION")
    return text[start:text.index("\r\n--", start)]


def test_submit_uploads_a_new_version_and_starts_a_run(kfp_server, monkeypatch):
    monkeypatch.setenv("MEDTUNE_GIT_SHA", "0123456789abcdef0123")
    fake = FakeKfp(pipeline_exists=True)
    host = kfp_server(fake)
    result = CliRunner().invoke(cli.app, ["submit", "--host", host, "--config", str(PROFILE),
                                          "--run-name", "nightly-1"])
    assert result.exit_code == 0, result.output
    # stdout carries the run's URL alone (kfp.Client's own links go to stderr).
    assert result.stdout.strip().splitlines()[-1] == f"{host}/#/runs/details/run-42"
    assert _calls(fake) == [
        "GET /apis/v2beta1/pipelines",              # find the pipeline by name
        "POST /apis/v2beta1/pipelines/upload_version",  # a new version of the same pipeline
        "GET /apis/v2beta1/experiments",            # the experiment exists: no create
        "POST /apis/v2beta1/runs",
    ]
    find = fake.requests[1]
    assert json.loads(find["query"]["filter"][0])["predicates"][0]["stringValue"] == "medtune"
    upload = next(r for r in fake.requests if r["path"].endswith("/upload_version"))
    assert upload["query"]["pipelineid"] == ["p-1"]
    assert re.fullmatch(r"0\.1\.0-0123456789ab-\d{8}-\d{6}", upload["query"]["name"][0])
    uploaded = yaml.safe_load_all(_uploaded_yaml(fake, f"{API}/pipelines/upload_version"))
    spec = next(uploaded)
    assert spec["pipelineInfo"]["name"] == "medtune"
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"] == \
        config_mod.load(PROFILE).cluster.cuda_image

    run = _json_body(fake, "POST", f"{API}/runs")
    assert run["display_name"] == "nightly-1"
    assert run["experiment_id"] == "e-1"
    assert run["service_account"] == "medtune-pipeline-runner"
    assert run["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-7"}
    sent = config_mod.from_json(run["runtime_config"]["parameters"]["config"])
    assert sent == config_mod.load(PROFILE).runtime()
    assert run["runtime_config"]["parameters"]["requested_by"] == getpass.getuser()  # for the audit record


def test_submit_creates_the_pipeline_on_first_upload(kfp_server, monkeypatch):
    fake = FakeKfp(pipeline_exists=False)
    client = kubeflow.connect(kfp_server(fake))
    result = kubeflow.submit(client, config_mod.load(PROFILE), run_name="first")
    assert (result["pipeline_id"], result["version_id"]) == ("p-new", "v-first")
    upload = next(r for r in fake.requests if r["path"] == f"{API}/pipelines/upload")
    assert upload["query"]["name"] == ["medtune"]
    assert _json_body(fake, "POST", f"{API}/runs")["pipeline_version_reference"]["pipeline_version_id"] == "v-first"


def test_submit_overrides_reach_the_run_and_the_compiled_placement(kfp_server):
    fake = FakeKfp()
    host = kfp_server(fake)
    result = CliRunner().invoke(cli.app, ["submit", "--host", host, "--config", str(PROFILE),
                                          "--set", "cluster.gpu_limit=2", "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    spec = next(yaml.safe_load_all(_uploaded_yaml(fake, f"{API}/pipelines/upload_version")))
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "2"
    sent = json.loads(_json_body(fake, "POST", f"{API}/runs")["runtime_config"]["parameters"]["config"])
    assert sent["train"]["epochs"] == 3.0
    assert "cluster" not in sent, "the placement is compiled in; a run's config cannot change it"


def test_token_goes_in_the_header_and_nowhere_else(kfp_server, monkeypatch):
    token = "kfp-test-token-not-a-real-secret-81724"
    monkeypatch.setenv(kubeflow.TOKEN_ENV, token)
    fake = FakeKfp()
    result = CliRunner().invoke(cli.app, ["submit", "--host", kfp_server(fake), "--config", str(PROFILE)])
    assert result.exit_code == 0, result.output
    assert all(r["headers"].get("authorization") == f"Bearer {token}" for r in fake.requests)
    assert token not in result.output
    assert all(token.encode() not in r["body"] for r in fake.requests)


def test_schedule_replaces_the_recurring_run_of_the_same_name(kfp_server, tmp_path):
    fake = FakeKfp(recurring=[{"recurring_run_id": "rr-old", "display_name": "medtune-weekly"}])
    host = kfp_server(fake)
    result = CliRunner().invoke(cli.app, ["schedule", "--host", host, "--cron", "30 2 * * *"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"{host}/#/recurringrun/details/rr-9"
    calls = _calls(fake)
    # The old recurring run is deleted only after its replacement exists.
    assert calls.index("POST /apis/v2beta1/recurringruns") < calls.index("DELETE /apis/v2beta1/recurringruns/rr-old")
    body = _json_body(fake, "POST", f"{API}/recurringruns")
    definition = yaml.safe_load((ROOT / "manifests" / "recurring-run.yaml").read_text())
    assert body["display_name"] == definition["name"] == "medtune-weekly"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"  # 5 fields get KFP's seconds field
    assert int(body["max_concurrency"]) == definition["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "medtune-pipeline-runner"
    assert body["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-7"}
    assert config_mod.from_json(body["runtime_config"]["parameters"]["config"]).name == "qwen2.5-0.5b-qlora"
    assert body["runtime_config"]["parameters"]["requested_by"] == f"schedule medtune-weekly ({getpass.getuser()})"


def test_schedule_uses_the_definition_cron_when_none_is_given(kfp_server):
    fake = FakeKfp()
    result = CliRunner().invoke(cli.app, ["schedule", "--host", kfp_server(fake)])
    assert result.exit_code == 0, result.output
    assert not any(r["method"] == "DELETE" for r in fake.requests)
    assert _json_body(fake, "POST", f"{API}/recurringruns")["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"


@pytest.mark.parametrize("cron", ["* * *", "0 0 0 3 * * 1"])
def test_schedule_refuses_a_malformed_cron_before_calling_the_api(kfp_server, cron):
    fake = FakeKfp()
    result = CliRunner().invoke(cli.app, ["schedule", "--host", kfp_server(fake), "--cron", cron])
    assert result.exit_code == 2
    assert "expected 6 fields" in result.output
    assert fake.requests == []


def test_api_errors_are_reported_with_the_failing_call(kfp_server):
    fake = FakeKfp()
    fake.answer = lambda method, path, query: (500, {"error": "boom"}) if path.endswith("/runs") \
        else FakeKfp.answer(fake, method, path, query)
    result = CliRunner().invoke(cli.app, ["submit", "--host", kfp_server(fake), "--config", str(PROFILE)])
    assert result.exit_code == 1
    assert "starting the run failed: HTTP 500" in result.output


def test_unreachable_host_is_an_error_not_a_traceback():
    result = CliRunner().invoke(cli.app, ["submit", "--host", "http://127.0.0.1:9", "--config", str(PROFILE)])
    assert result.exit_code == 1
    assert "failed" in result.output and "Traceback" not in result.output
