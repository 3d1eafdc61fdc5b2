"""`medtune serve` as users run it: a real process on a free loopback port, called with the official `openai`
client (and raw HTTP for the malformed requests that client refuses to send).

The served champion is resolved from a real MLflow server on loopback (registered and promoted here);
the model is the tiny random Llama with a random LoRA adapter, so answers are words but not meaningful.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the `openai` package uses
import openai
import pytest
import yaml

from medtune import config as config_mod
from medtune import registry, serve, tracking

from conftest import ROOT, tiny_config_tree
from test_evaluate import _adapter

LIMIT = 48


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], profile: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.cli", "serve", *args, "--config", str(profile),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    serve.wait_ready(url, 180, proc)
    return proc, url


def _profile(tree: dict, path: Path) -> Path:
    tree["serve"] = {"max_tokens_limit": LIMIT, "default_max_tokens": 16, "max_body_bytes": 4096, "threads": 1,
                     "batch_window_ms": 100, "max_batch_size": 8}
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def champion_server(tiny_model_dir, tmp_path_factory):
    """The registered, promoted adapter served from its `champion` alias. It was gated with decoding settings
    the serving profile does not have: what is served is what was gated."""
    tmp = tmp_path_factory.mktemp("serve")
    adapter = _adapter(tiny_model_dir, tmp / "adapter", seed=3)
    with tracking.local_server(tmp / "mlflow") as uri:
        tree = tiny_config_tree(tiny_model_dir)
        tree["tracking"]["tracking_uri"] = uri
        cfg = config_mod.from_dict({**tree, "decoding": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}})
        run_id = tracking.open_run(cfg, pipeline_run="serve-test")
        with tracking.step(cfg, run_id, "register"):
            reg = registry.register(cfg, run_id, adapter, {"passed": True, "promote": True, "summary": "ok"}, tmp)
        proc, url = _start(["--model", "champion"], _profile(tree, tmp / "profile.yaml"), tmp / "serve.log")
        try:
            yield {"url": url, "tracking_uri": uri, "name": f"{cfg.tracking.registered_model}:{reg['version']}",
                   "version": reg["version"], "cfg": cfg, "adapter": adapter, "log": tmp / "serve.log",
                   "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)}
        finally:
            proc.terminate()
            proc.wait(60)


def _ask(client, name, question="How is influenza spread?", **kw):
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", LIMIT), temperature=0, **kw)


def test_models_names_the_registered_version(champion_server):
    models = champion_server["client"].models.list()
    assert [m.id for m in models.data] == [champion_server["name"]]
    assert champion_server["version"] == "1"


def test_chat_answers_as_medtune_generates_with_the_disclaimer_prompt(champion_server):
    """The served greedy answer is what medtune's own batched generation gives the same model and prompt, with
    the decoding the version was gated with (stored with it), not the serving profile's."""
    from peft import PeftModel

    from medtune import models
    from medtune.evaluate import generate

    s = champion_server
    raw = s["client"].chat.completions.with_raw_response.create(
        model=s["name"], messages=[{"role": "user", "content": "How is influenza spread?"}], max_tokens=LIMIT,
        temperature=0)
    assert raw.headers["x-medtune-model-version"] == s["version"]
    assert raw.headers["x-medtune-model"] == s["name"]
    answer = raw.parse()
    assert answer.model == s["name"]
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= LIMIT

    cfg = s["cfg"]
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    model = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.train), str(s["adapter"]))
    model.config.use_cache = True
    system = serve.system_prompt(cfg)
    assert cfg.serve.disclaimer in system and cfg.preprocess.system_prompt in system
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                            {"role": "user", "content": "How is influenza spread?"}],
                                           add_generation_prompt=True, tokenize=False)
    expected = generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=LIMIT, desc="reference",
                        decoding=cfg.decoding)[0]
    assert answer.choices[0].message.content.strip() == expected
    plain = generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=LIMIT, desc="plain greedy")[0]
    assert plain != expected, "the gated decoding must change this answer, or the check above proves nothing"
    assert "decoding {'repetition_penalty': 1.3, 'no_repeat_ngram_size': 2}" in s["log"].read_text()
    assert answer.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_streaming_sends_the_same_answer_in_pieces(champion_server):
    s = champion_server
    whole = _ask(s["client"], s["name"]).choices[0].message.content
    chunks = list(_ask(s["client"], s["name"], stream=True))
    assert len(chunks) > 2
    assert all(c.model == s["name"] for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completions_honour_stop_and_max_tokens(champion_server):
    s, client = champion_server, champion_server["client"]
    full = client.completions.create(model=s["name"], prompt="What causes asthma?", max_tokens=LIMIT, temperature=0)
    text = full.choices[0].text
    words = text.split()
    assert len(words) > 4 and full.model == s["name"]
    stop = words[3]
    cut = client.completions.create(model=s["name"], prompt="What causes asthma?", max_tokens=LIMIT,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model=s["name"], prompt="What causes asthma?", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=s["name"], prompt="What causes asthma?", max_tokens=LIMIT,
                                         temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_concurrent_requests_are_batched_and_answer_as_alone(champion_server):
    s = champion_server
    questions = [f"What is {w}?" for w in ("asthma", "influenza", "diabetes", "anemia", "a migraine", "gout")]
    alone = [_ask(s["client"], s["name"], q).choices[0].message.content for q in questions]
    batches_before = _metric(s["url"], "medtune_batch_size_count")
    together: dict[int, str] = {}

    def ask(i):
        together[i] = _ask(s["client"], s["name"], questions[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(questions))] == alone  # left padding changes no greedy answer
    batches = _metric(s["url"], "medtune_batch_size_count") - batches_before
    assert batches < len(questions), f"{len(questions)} concurrent requests ran as {batches} batches"


def test_sampling_rows_and_greedy_rows_share_a_batch(champion_server):
    s = champion_server
    greedy = _ask(s["client"], s["name"]).choices[0].message.content
    out: dict[str, list[str]] = {"greedy": [], "sampled": []}

    def ask(kind):
        temperature = 0 if kind == "greedy" else 1.5
        out[kind].append(s["client"].chat.completions.create(
            model=s["name"], messages=[{"role": "user", "content": "How is influenza spread?"}], max_tokens=LIMIT,
            temperature=temperature, top_p=0.95).choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(k,)) for k in ["greedy"] * 2 + ["sampled"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["greedy"] == [greedy, greedy]
    assert len(set(out["sampled"])) > 1, "temperature 1.5 gave four identical answers"


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_bad_requests_get_openai_errors_and_the_server_stays_up(champion_server):
    s, client = champion_server, champion_server["client"]
    with pytest.raises(openai.BadRequestError) as too_many:
        _ask(client, s["name"], max_tokens=LIMIT + 1)
    assert too_many.value.code == "max_tokens_too_large" and too_many.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as unknown:
        _ask(client, "gpt-4o")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        _ask(client, s["name"], stop=["a", "b", "c", "d", "e"])

    url = f"{s['url']}/v1/chat/completions"
    cases = {
        "missing messages": ({"model": s["name"]}, 400, "messages"),
        "content not a string": ({"model": s["name"], "messages": [{"role": "user", "content": 5}]}, 400,
                                 "messages.0.content"),
        "max_tokens a string": ({"model": s["name"], "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": "ten"}, 400, "max_tokens"),
        "unknown role": ({"model": s["name"], "messages": [{"role": "doctor", "content": "hi"}]}, 400,
                         "messages.0.role"),
        "empty messages": ({"model": s["name"], "messages": []}, 400, "messages"),
        "temperature too high": ({"model": s["name"], "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 9}, 400, "temperature"),
    }
    for what, (body, status, param) in cases.items():
        response = httpx.post(url, json=body)
        assert response.status_code == status, what
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param), (what, error)
        assert response.headers["x-medtune-model-version"] == s["version"]
    not_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "json_invalid"
    big = {"model": s["name"], "messages": [{"role": "user", "content": "flu " * 2000}]}
    assert httpx.post(url, json=big).status_code == 413

    def chunked():
        yield json.dumps(big).encode()

    assert httpx.post(url, content=chunked(), headers={"content-type": "application/json"}).status_code == 413
    assert _metric(s["url"], "medtune_requests_total", route="/v1/chat/completions", code="413") == 2
    assert httpx.get(f"{s['url']}/health").json() == {"status": "ok", "model": s["name"], "version": s["version"]}
    assert _ask(client, s["name"]).choices[0].message.content is not None


def test_metrics_count_requests_latency_and_tokens(champion_server):
    s = champion_server
    before = _metric(s["url"], "medtune_generated_tokens_total")
    answer = _ask(s["client"], s["name"], max_tokens=5)
    assert _metric(s["url"], "medtune_generated_tokens_total") - before == answer.usage.completion_tokens
    assert _metric(s["url"], "medtune_request_seconds_count", route="/v1/chat/completions") >= 1
    assert _metric(s["url"], "medtune_requests_total", route="/v1/chat/completions", code="200") >= 1
    assert _metric(s["url"], "medtune_requests_in_flight") == 0


def test_deploy_step_stages_the_registered_adapter_on_the_pvc(champion_server, tmp_path, monkeypatch):
    """The deploy step's first half against the real registry: the version's adapter lands where the
    InferenceService's --lora-modules points; the cluster half is skipped here, and says why."""
    import mlflow

    from medtune import kserve

    s = champion_server
    mlflow.set_tracking_uri(s["tracking_uri"])
    staged = Path(kserve.stage_adapter(s["cfg"], s["version"], tmp_path))
    assert staged == tmp_path / kserve.adapter_path(s["cfg"], s["version"])
    assert (staged / "adapter_model.safetensors").read_bytes() == \
        (s["adapter"] / "adapter_model.safetensors").read_bytes()
    assert kserve.stage_adapter(s["cfg"], s["version"], tmp_path) == str(staged)  # already there: kept
    with pytest.raises(kserve.DeployFailed, match="has no version 99"):
        kserve.stage_adapter(s["cfg"], "99", tmp_path)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kserve.deploy_step(s["cfg"], {"version": s["version"], "promoted": True}, tmp_path) == {
        "deployed": False, "skipped": "deploy.enabled is false in the profile"}


def test_sigterm_lets_the_request_in_flight_finish(tiny_model_dir, tmp_path):
    """SIGTERM mid-answer: the stream still ends properly, new connections are refused, the server exits."""
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    tree = tiny_config_tree(tiny_model_dir)
    profile = _profile(tree, tmp_path / "profile.yaml")
    tree["serve"]["max_tokens_limit"] = 400
    profile.write_text(yaml.safe_dump(tree))
    proc, url = _start(["--adapter", str(adapter)], profile, tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        assert name.startswith(f"{tree['tracking']['registered_model']}:local-")
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is gout?"}],
                                                max_tokens=400, temperature=0, stream=True)
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        chunks += list(stream)
        finished = time.monotonic()
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert sum(c.choices[0].delta.content is not None for c in chunks) > 1
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
        # uvicorn re-raises the signal once drained, so the exit status says SIGTERM ended it
        assert proc.wait(60) == -signal.SIGTERM
        log = (tmp_path / "serve.log").read_text()
        assert "Waiting for connections to close" in log  # uvicorn saw our request still open
        assert log.index("in-flight requests finished") > log.index("Waiting for connections to close")
        assert finished > signalled
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kserve_deploy_refuses_a_version_gated_with_answer_only_decoding(champion_server):
    """`medtune deploy` reads the version's gated decoding from the real registry: vLLM cannot apply it to the
    answer alone, so the version is refused before anything is applied to the (stand-in) cluster."""
    from typer.testing import CliRunner

    from kube_standin import KubeStandIn
    from medtune import cli
    from test_kserve import ENABLE, PROFILE

    s = champion_server
    sets = [*ENABLE, f"tracking.tracking_uri={s['tracking_uri']}",
            f"tracking.registered_model={s['cfg'].tracking.registered_model}"]
    with KubeStandIn() as kube:
        result = CliRunner().invoke(cli.app, ["deploy", "--host", kube.url, "--version", s["version"],
                                              "--poll-s", "0.01", "-c", str(PROFILE),
                                              *[a for x in sets for a in ("--set", x)]])
        assert kube.isvc("medtune", "medtune") is None, "nothing may be applied"
    assert result.exit_code == 1, result.output
    assert "passed the gate decoded with {'repetition_penalty': 1.3, 'no_repeat_ngram_size': 2}" in \
        " ".join(result.output.split())
