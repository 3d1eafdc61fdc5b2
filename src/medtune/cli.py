"""The `medtune` command: run the pipeline locally, compile it for Kubeflow, ask the model, check data."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console

from medtune import config as config_mod
from medtune import sweep
from medtune.ingest import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Check a dataset without running the pipeline.")
app.add_typer(data_app, name="data")
config_app = typer.Typer(no_args_is_help=True, help="Inspect profiles.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

DEFAULT_PROFILE = Path("configs/local.yaml")
ConfigOpt = typer.Option(DEFAULT_PROFILE, "--config", "-c", help="YAML profile: a path, or the name of a "
                         "bundled one (local, qwen2.5-0.5b-qlora).")
SetOpt = typer.Option([], "--set", help="Override a field: --set train.lora.r=32 (repeatable).")


@app.callback()
def _environment() -> None:
    # Before any command: a password in $MLFLOW_TRACKING_URI must not reach a message, param or record.
    from medtune import uris

    uris.tracking_credentials_to_env()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay whole
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str]) -> config_mod.Config:
    try:
        cfg = config_mod.load(path, overrides)
    except config_mod.ConfigError as exc:
        _fail(str(exc))
    # Steps run in other processes (and other working directories): hand them absolute paths. A relative
    # path is looked up where the command runs, then in the checkout (the bundled profiles' sample data).
    from medtune.suites import ROOT

    data_path = Path(cfg.data.path).expanduser()
    if not cfg.data.path.startswith("hf://") and not data_path.is_absolute():
        if not data_path.exists() and (ROOT / data_path).exists():
            data_path = ROOT / data_path
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(data_path.resolve())})})
    return cfg


@app.command()
def run(config: Path = ConfigOpt, set_: list[str] = SetOpt, output_dir: Path = typer.Option(
        None, help="Where the run's artifacts go (default: runs/<run id>)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON summary as the last line."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Stream every step's full output.")):
    """Run the whole DAG locally with kfp.local (SubprocessRunner) and print where its results are."""
    from medtune import local_run

    cfg = _load(config, set_)
    run_name = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    output_dir = (output_dir or Path("runs") / run_name).resolve()
    try:
        summary = local_run.run(cfg, output_dir, run_name, console, verbose)
    except local_run.PipelineFailed as exc:
        _fail(str(exc), code=1)
    console.rule("medtune run finished")
    for key in ("output_dir", "report", "adapter", "decision", "logs", "mlflow_run", "model_version", "hub",
                "deployment"):
        if summary.get(key) is not None:
            console.print(f"[bold]{key:>14}[/]: {summary[key]}", highlight=False, soft_wrap=True)
    console.print(f"[bold]{'gate':>14}[/]: {'PASSED' if summary['gate']['passed'] else 'FAILED'} - "
                  f"{summary['gate']['summary']}", highlight=False)
    for line in sweep.closing_note(summary["trials"]) if len(summary["trials"]["trials"]) > 1 else []:
        console.print(f"[bold]{'sweep':>14}[/]: {line}", highlight=False, soft_wrap=True)
    for line in summary["preference"]["closing_note"]:
        console.print(f"[bold]{'preference':>14}[/]: {line}", highlight=False, soft_wrap=True)
    if not cfg.tracking.tracking_uri:
        console.print("the MLflow server of this run has stopped; `medtune ui` serves these links again",
                      style="dim", highlight=False)
    if json_out:
        print(json.dumps(summary, default=str))


@app.command()
def ui(port: int = typer.Option(None, help="Port of a server this starts (default: the store's usual one).")):
    """Start (or reuse) the local MLflow server on the store `medtune run` uses; print the experiment's URL."""
    import signal

    from medtune import local_run, runs, tracking

    # SIGTERM unwinds like Ctrl-C, so the server this started is stopped rather than orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tracking.local_server(local_run.MLFLOW_DIR, port=port) as uri:
        experiments = tracking.experiments(uri)
        for experiment_id, name in experiments:
            print(f"{name}: {runs.experiment_url(uri, experiment_id)}")
        if not experiments:
            print(uri)
        console.print("MLflow UI running; Ctrl-C stops it", highlight=False)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command("runs")
def runs_(root: Path = typer.Option(Path("runs"), "--dir", help="Where `medtune run` wrote its runs.")):
    """List local runs: date, profile, gate verdict, headline metrics, model version and alias."""
    from rich.table import Table

    from medtune import runs

    found = runs.load(root)
    if not found:
        _fail(f"no runs under {root.resolve()}", code=1)
    table = Table(box=None, header_style="bold")
    rows = [runs.row(summary) for summary in found]
    for column in rows[0]:
        table.add_column(column, no_wrap=column != "metrics")
    for row in rows:
        table.add_row(*row.values())
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def show(run: str = typer.Argument(..., help="Run folder, its name under runs/, or its MLflow run id."),
         root: Path = typer.Option(Path("runs"), "--dir", help="Where `medtune run` wrote its runs.")):
    """Print one local run's summary (opens nothing)."""
    from medtune import runs

    try:
        path = runs.find(run, root)
        summary = {**json.loads(path.read_text()), "name": path.parent.name}
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        _fail(str(exc))
    lines = runs.describe(summary)
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        console.print(f"[bold]{key:>{width}}[/]: {value}", highlight=False, soft_wrap=True)


@app.command("compile")
def compile_(profile: Path = typer.Option(None, help="Profile compiled in as the default config.")):
    """Write the pipeline's IR YAML under pipelines/ (committed; a test checks it matches the source)."""
    from medtune.pipeline import CLUSTER_PROFILE, compile_pipeline

    path = compile_pipeline(profile or CLUSTER_PROFILE)
    console.print(f"wrote {path}")


CLUSTER_PROFILE = Path("configs/qwen2.5-0.5b-qlora.yaml")
HostOpt = typer.Option(..., "--host", help="KFP endpoint, e.g. http://localhost:8080 (port-forward of "
                       "svc/ml-pipeline-ui). A bearer token, if the endpoint needs one, is read from $KFP_TOKEN.")


def _load_cluster(path: Path, overrides: list[str]) -> config_mod.Config:
    # Unlike _load, paths stay as written: they name places inside the cluster's pods, not on this machine.
    try:
        return config_mod.load(path, overrides)
    except config_mod.ConfigError as exc:
        _fail(str(exc))


@app.command()
def submit(host: str = HostOpt, config: Path = typer.Option(CLUSTER_PROFILE, "--config", "-c",
                                                            help="Cluster profile."),
           set_: list[str] = SetOpt, run_name: str = typer.Option(None, help="Default: <profile name>-<time>.")):
    """Upload the pipeline to Kubeflow (a new version of the same pipeline), start a run, print its URL."""
    from medtune import kubeflow

    cfg = _load_cluster(config, set_)
    try:
        result = kubeflow.submit(kubeflow.connect(host, cfg.cluster.namespace), cfg, run_name)
    except kubeflow.KubeflowError as exc:
        _fail(str(exc), code=1)
    console.print(f"pipeline {result['pipeline_id']} version {result['version_id']}, run {result['run_id']}",
                  highlight=False)
    print(result["url"])


@app.command()
def schedule(host: str = HostOpt, cron: str = typer.Option(
        None, help="Overrides the file's schedule; KFP cron has seconds first ('0 0 3 * * 1'), 5 fields get 0 s."),
        definition: Path = typer.Option(Path("manifests/recurring-run.yaml"), help="Recurring run definition."),
        config: Path = typer.Option(None, "--config", "-c", help="Cluster profile (default: the definition's)."),
        set_: list[str] = SetOpt):
    """Create or replace the pipeline's recurring run on Kubeflow; print its URL."""
    from medtune import kubeflow

    try:
        spec = kubeflow.load_schedule(definition, cron)
    except (kubeflow.KubeflowError, FileNotFoundError) as exc:
        _fail(str(exc))
    cfg = _load_cluster(config or Path(spec.profile), set_)
    try:
        result = kubeflow.schedule(kubeflow.connect(host, cfg.cluster.namespace), cfg, spec)
    except kubeflow.KubeflowError as exc:
        _fail(str(exc), code=1)
    replaced = f", replacing {', '.join(result['replaced'])}" if result["replaced"] else ""
    console.print(f"recurring run '{spec.name}' {result['recurring_run_id']} at cron '{result['cron']}'{replaced}",
                  highlight=False)
    print(result["url"])


@config_app.command("show")
def config_show(config: Path = ConfigOpt, set_: list[str] = SetOpt):
    """Print the fully resolved profile as YAML: every field with its value, defaults included, and each task's
    retries and timeout on the cluster (the step's default unless the profile overrides it)."""
    import yaml

    from medtune import steps

    cfg = _load_cluster(config, set_)
    tree = cfg.model_dump(mode="json")
    specs = steps.specs().values()
    tree["cluster"]["retries"] = {s.name: cfg.cluster.retry_policy(s).model_dump(mode="json") for s in specs
                                  if cfg.cluster.retry_policy(s)}
    tree["cluster"]["timeouts_s"] = {s.name: cfg.cluster.timeout(s) for s in specs}
    print(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), end="")


KubeHostOpt = typer.Option(None, "--host", help="Kubernetes API server URL (bearer token from $K8S_TOKEN); "
                           "default: in-cluster config or ~/.kube/config.")
PollOpt = typer.Option(5.0, "--poll-s", help="Seconds between readiness checks.")


def _check_gated_decoding(cfg: config_mod.Config, version: str) -> None:
    """KServe's vLLM runtime decodes plainly: a version gated with answer-only repetition rules (its
    medtune.decoding tag) would be served unlike what passed the gate, so it is refused. Where the registry cannot
    be read the deploy goes on (a rollback must work while MLflow is down) and says it could not check."""
    import mlflow

    from medtune import champion

    try:
        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        info = champion.lookup(cfg.tracking.registered_model, version)
    except Exception as exc:
        console.print(f"[yellow]could not read version {version}'s gated decoding from the registry ({exc}); "
                      "deploying it as plain greedy[/]", highlight=False)
        return
    if not info["available"]:
        _fail(f"cannot deploy: {info['reason']}", code=1)
    decoding = config_mod.DecodingConfig.model_validate_json(info.get("decoding") or "{}")
    if not decoding.plain:
        _fail(f"cannot deploy {cfg.tracking.registered_model} version {version} on KServe's vLLM runtime: it "
              f"passed the gate decoded with {decoding.model_dump()}, which vLLM cannot apply to the answer "
              "alone; serve it with `medtune serve` (transformers engine)", code=1)


def _deploy(cfg: config_mod.Config, host: str | None, version: str, role: str, poll_s: float) -> dict:
    from medtune import kserve

    _check_gated_decoding(cfg, version)
    try:
        cluster = kserve.Cluster(kserve.connect(host, os.environ.get("K8S_TOKEN")))
        result = kserve.deploy(cfg, cluster, version, role, poll_s=poll_s, with_rbac=True)
    except kserve.DeployFailed as exc:
        _fail(str(exc), code=1)
    console.print(f"{result['namespace']}/{result['name']} serves {result['served_model']} (generation "
                  f"{result['generation']}, image {result['image_digest']})", highlight=False)
    print(json.dumps(result))
    return result


@app.command()
def deploy(version: str = typer.Option(..., help="Registered model version to serve."),
           role: str = typer.Option("champion", help="champion, or challenger (served beside it)."),
           host: str = KubeHostOpt, poll_s: float = PollOpt,
           config: Path = typer.Option(CLUSTER_PROFILE, "--config", "-c", help="Cluster profile."),
           set_: list[str] = SetOpt):
    """Serve a registered version on KServe (applying the deployer's RBAC with your rights); on failure the
    previous version keeps serving. The adapter must be on the model-cache PVC (the pipeline puts it there)."""
    _deploy(_load_cluster(config, set_), host, version, role, poll_s)


@app.command()
def rollback(to: str = typer.Option(..., "--to", help="Registered model version to serve again."),
             host: str = KubeHostOpt, poll_s: float = PollOpt,
             config: Path = typer.Option(CLUSTER_PROFILE, "--config", "-c", help="Cluster profile."),
             set_: list[str] = SetOpt):
    """Serve an earlier version as the champion again, and move the registry's `champion` alias to it."""
    cfg = _load_cluster(config, set_)
    _deploy(cfg, host, to, "champion", poll_s)
    try:
        import mlflow

        client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
        client.set_registered_model_alias(cfg.tracking.registered_model, "champion", to)
        console.print(f"alias champion -> version {to}", highlight=False)
    except Exception as exc:  # the cluster already serves it; the alias can be moved by hand
        console.print(f"[yellow]served, but the registry alias was not moved:[/] {exc}", highlight=False)


@app.command()
def ask(question: str, adapter: Path = typer.Option(None, help="What `train` wrote: a LoRA adapter or a full model."),
        config: Path = ConfigOpt, set_: list[str] = SetOpt):
    """Answer a question with the base model, or with what training produced (base + adapter, or the full model)."""
    from medtune import models
    from medtune.evaluate import generate
    from medtune.preprocess import render_prompt

    cfg = _load(config, set_)
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    model = (models.load_trained(cfg.model, cfg.train, adapter) if adapter
             else models.load_model(cfg.model, cfg.train).to(models.device()))
    prompt = render_prompt(tokenizer, cfg.preprocess.system_prompt, question)
    print(generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=cfg.eval.max_new_tokens,
                   desc="answering", decoding=cfg.decoding)[0])


@app.command()
def serve(model: str = typer.Option("champion", help="Registry alias (champion, challenger), version number, or "
                                    "`base` for the base model alone."),
          adapter: Path = typer.Option(None, help="Serve this adapter (or full model) directory instead."),
          host: str = typer.Option(None, help="Default: serve.host."), port: int = typer.Option(
              None, help="Default: serve.port."), config: Path = ConfigOpt, set_: list[str] = SetOpt):
    """Serve the model over an OpenAI-compatible HTTP API until SIGTERM/Ctrl-C (in-flight requests finish)."""
    import logging

    from medtune import serve as serving

    cfg = _load(config, set_)
    # before loading, so what is served (version, source, decoding) is in the log
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    try:
        served = serving.load(cfg, model, adapter.resolve() if adapter else None)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc), code=1)
    serving.run(serving.create_app(served, cfg.serve), host or cfg.serve.host,
                cfg.serve.port if port is None else port, cfg.serve.drain_timeout_s)


@app.command("evaluate")
def evaluate_cmd(data: Path = typer.Option(..., "--data", help="Dataset the ingest reads (file, folder, ...); "
                                           "its column mapping and kind come from data.* in the profile."),
                 adapter: Path = typer.Option(None, help="What `train` wrote (the candidate): adapter or full model."),
                 config: Path = ConfigOpt, set_: list[str] = SetOpt,
                 out: Path = typer.Option(None, help="Keep the validated rows, comparison.json, predictions.jsonl, "
                                          "decision.json and report.html here."),
                 json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")):
    """Score a dataset with the base model, the candidate and the registered champion; print the metric table.

    The pipeline's validate, evaluate and gate steps run standalone (no MLflow run; nothing is registered).
    The champion is compared when a tracking server is configured (tracking.tracking_uri or
    $MLFLOW_TRACKING_URI); perplexity is on the scored rows' reference answers."""
    import tempfile

    from rich.table import Table

    from medtune import report, rows
    from medtune.steps import evaluate, gate, validate_data

    cfg = _load(config, [*set_, f"data.path={data.resolve()}"])
    with tempfile.TemporaryDirectory(prefix="medtune-evaluate-") as tmp:
        where = Path(out or tmp)
        try:
            validation = validate_data.validate(cfg, str(where / "data"), str(where / "quarantine.jsonl"),
                                                str(where / "validation.json"))
            comparison = evaluate.score(cfg, rows.read(where / "data"), adapter.resolve() if adapter else None,
                                        where / "comparison.json", where)
        except (DataError, ValueError) as exc:
            _fail(str(exc), code=1)
        decision = gate.decide(cfg, where / "comparison.json", None, where, where / "decision.json",
                               where / "report.html", title=f"medtune evaluate: {cfg.data.path}") \
            if comparison["candidate"] is not None else None
    table = Table(title=f"{comparison['kind']}: {comparison['n']} questions from {validation.summary['rows_kept']} rows")
    for column in ("metric", "better", "base", "candidate", "champion", "cand - base [CI]", "cand - champion [CI]"):
        table.add_column(column)
    for row in report.metric_rows(comparison):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # pipes get the full table
    info = comparison["champion_info"]
    for line in [*(decision["headline"] if decision else []),
                 f"champion: {info.get('version') or 'none'} {info.get('reason') or ''}".rstrip()]:
        print(line)
    if decision:
        print(f"gate: {'PASSED' if decision['passed'] else 'FAILED'} - {decision['summary']}")
    if json_out:
        print(json.dumps({"data": cfg.data.path, "kind": comparison["kind"], **{
            k: validation.summary[k] for k in ("rows_read", "rows_kept")}, "questions": comparison["n"],
            "adapter": str(adapter) if adapter else None, "comparison": comparison,
            "gate": decision and {"passed": decision["passed"], "summary": decision["summary"]},
            "out": str(out) if out else None}, default=str))


@app.command("lineage")
def lineage_(run: str = typer.Argument(..., help="Output directory, lineage.json, or run id that `medtune run` "
                                                 "printed.")):
    """Print a run's audit record: data, code, config, model, artifacts, metrics, gate, registry, Hub."""
    from medtune import lineage

    try:
        record = lineage.load(lineage.find(run))
    except (FileNotFoundError, lineage.RecordError) as exc:
        _fail(str(exc))
    base, hub = record["base_model"], record["hub"] or {}
    metrics = record["metrics"]
    rows = [("run", f"MLflow {record['run']['mlflow_run_id']}, pipeline {record['run']['pipeline_run']} "
                    f"({record['run']['runner']}), started by {record['run']['started_by']}"),
            ("code", f"medtune {record['code']['version']} @ {record['code']['git_sha']}, "
                     f"{record['code']['lock']['path']} sha256 {record['code']['lock']['sha256']}"),
            ("config sha256", record["config"]["sha256"]),
            ("images", json.dumps(record["images"]) if record["images"] else "none (kfp.local: this virtualenv)"),
            ("base model", f"{base['id']} @ {base['commit'] or base['revision']}"
                           + (f", content sha256 {base['sha256']}" if base["sha256"] else "")),
            ("data", f"{record['data']['path']} sha256 {record['data']['sha256']}: {record['data']['rows_read']} "
                     f"rows read, {record['data']['rows_kept']} kept, {record['data']['rows_quarantined']} "
                     "quarantined")]
    rows += [(f"split {name}", f"{s['rows']} rows, sha256 {s['fingerprint']}") for name, s in record["splits"].items()]
    rows += [(f"{name} metrics", ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics[name].items())
                                           if isinstance(v, float)))
             for name in ("base", "candidate", "champion") if metrics.get(name)]
    rows += [("artifacts", f"{len(record['artifacts'])} artifacts, "
                           f"{sum(len(a['files']) for a in record['artifacts'].values())} files hashed"),
             ("gate", f"{'PASSED' if record['gate']['passed'] else 'FAILED'}: {record['gate']['summary']}"),
             ("approved by", record["gate"]["approved_by"]),
             ("model version", f"{record['mlflow']['model_version']} {record['mlflow']['aliases']}"),
             ("hub", f"{hub['repo_id']}@{hub['commit']} {hub.get('tags', [])}" if hub.get("commit")
                     else hub.get("reason", "not pushed")),
             ("deployment", _deployment_line(record.get("deployment")))]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(f"[bold]{key:>{width}}[/]: {value}", highlight=False, soft_wrap=True)


def _deployment_line(deployment: dict | None) -> str:
    if not deployment:
        return "not deployed (gate failed)"
    if not deployment.get("deployed"):
        return f"skipped: {deployment.get('skipped')}"
    return (f"{deployment['namespace']}/{deployment['name']} generation {deployment['generation']} serves "
            f"{deployment['served_model']}, runtime {deployment['image_digest']}")


@app.command()
def verify(run: str = typer.Argument(..., help="Output directory, lineage.json, or run id that `medtune run` "
                                               "printed."),
           tracking_uri: str = typer.Option(None, help="MLflow server holding the run (default: $MLFLOW_TRACKING_URI;"
                                            " for a local run the server of .medtune/mlflow, started if needed)")):
    """Recompute every hash in the run's lineage.json and compare the record with its MLflow tags; exit 1
    naming each file that changed."""
    from contextlib import nullcontext

    from medtune import lineage, local_run, tracking

    try:
        path = lineage.find(run)
        record = lineage.load(path)
    except (FileNotFoundError, lineage.RecordError) as exc:
        _fail(str(exc))
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    local = uri is None and record["run"]["runner"] == "kfp.local" and local_run.MLFLOW_DIR.is_dir()
    try:
        with tracking.local_server(local_run.MLFLOW_DIR) if local else nullcontext(
                uri or record["mlflow"]["tracking_uri"]) as server:
            result = lineage.verify(path, server)
    except tracking.ServerError as exc:
        _fail(f"the local MLflow server: {exc}")
    for line in result.problems:
        console.print(f"[red]MISMATCH[/] {line}", highlight=False, soft_wrap=True)
    for uri in result.unreachable:
        console.print(f"[yellow]NOT CHECKED[/] {uri}: artifact store not reachable from here", highlight=False,
                      soft_wrap=True)
    for line in result.skipped:
        console.print(f"[yellow]NOT CHECKED[/] {line}", highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(1)
    console.print(f"verified: {result.checked} files match {path}"
                  + (f"; {len(result.unreachable) + len(result.skipped)} checks not made here (above)"
                     if result.unreachable or result.skipped else ""), highlight=False)


@data_app.command("validate")
def data_validate(path: str = typer.Argument(..., help="File, folder, MedQuAD folder/archive or hf://owner/name."),
                  config: Path = ConfigOpt, set_: list[str] = SetOpt,
                  out: Path = typer.Option(None, help="Folder for quarantine, report and Data Docs "
                                                      "(default: medtune-validation/ next to PATH).")):
    """Ingest and validate PATH (the pipeline's validate step, standalone); print counts; exit 1 with the reason
    on a blocking failure."""
    from medtune import validate
    from medtune.ingest import HF_PREFIX
    from medtune.steps import validate_data

    local = not path.startswith(HF_PREFIX)
    cfg = _load(config, [*set_, f"data.path={Path(path).expanduser().resolve() if local else path}"])
    base = Path(cfg.data.path) if local else Path.cwd()
    if out is None:  # next to PATH, never inside it: a re-run would read its own output
        out = (base.parent if local else base) / "medtune-validation"
    if local and base.is_dir() and out.resolve().is_relative_to(base):
        _fail(f"--out {out} is inside the data folder {base}; a later run would read it as data", code=2)
    try:
        result = validate_data.validate(cfg, str(out / "kept"), str(out / "quarantine.jsonl"),
                                        str(out / "validation.json"), str(out / "data_docs.html"))
    except validate.ValidationStopped as stop:
        _fail(f"{stop}\nquarantine, report and Data Docs in {out}", code=1)
    except (DataError, ValueError) as exc:
        _fail(str(exc), code=1)
    s = result.summary
    print(f"rows read {s['rows_read']}, kept {s['rows_kept']}, quarantined {s['rows_quarantined']}")
    for rule, count in s["quarantined_by_rule"].items():
        print(f"  {rule}: {count}")
    if s["phi_masked"]:
        print(f"  personal data masked: {s['phi_masked']}")
    print(f"quarantine, report and Data Docs in {out}")


def main() -> None:  # pragma: no cover - entry point for `python -m medtune.cli`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
