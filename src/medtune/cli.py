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
from medtune.ingest import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Check a dataset without running the pipeline.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

DEFAULT_PROFILE = Path("configs/local.yaml")
ConfigOpt = typer.Option(DEFAULT_PROFILE, "--config", "-c", help="YAML profile.")
SetOpt = typer.Option([], "--set", help="Override a field: --set train.lora.r=32 (repeatable).")


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str]) -> config_mod.Config:
    try:
        cfg = config_mod.load(path, overrides)
    except config_mod.ConfigError as exc:
        _fail(str(exc))
    # Steps run in other processes (and other working directories): hand them absolute paths.
    data_path = Path(cfg.data.path).expanduser()
    if not data_path.is_absolute():
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(data_path.resolve())})})
    return cfg


@app.command()
def run(config: Path = ConfigOpt, set_: list[str] = SetOpt, output_dir: Path = typer.Option(
        None, help="Where the run's artifacts go (default: runs/<run id>)."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON summary as the last line.")):
    """Run the whole DAG locally with kfp.local (SubprocessRunner) and print where its results are."""
    from medtune import local_run

    cfg = _load(config, set_)
    run_name = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    output_dir = (output_dir or Path("runs") / run_name).resolve()
    try:
        summary = local_run.run(cfg, output_dir, run_name, console)
    except local_run.PipelineFailed as exc:
        _fail(str(exc), code=1)
    console.rule("medtune run finished")
    for key in ("output_dir", "report", "adapter", "decision", "mlflow_run", "model_version", "hub"):
        if summary.get(key) is not None:
            console.print(f"[bold]{key:>14}[/]: {summary[key]}", highlight=False)
    console.print(f"[bold]{'gate':>14}[/]: {'PASSED' if summary['gate']['passed'] else 'FAILED'} - "
                  f"{summary['gate']['summary']}", highlight=False)
    if json_out:
        print(json.dumps(summary, default=str))


@app.command("compile")
def compile_(profile: Path = typer.Option(None, help="Profile compiled in as the default config.")):
    """Write the pipeline's IR YAML under pipelines/ (committed; a test checks it matches the source)."""
    from pipelines.pipeline import CLUSTER_PROFILE, compile_pipeline

    path = compile_pipeline(profile or CLUSTER_PROFILE)
    console.print(f"wrote {path}")


@app.command()
def ask(question: str, adapter: Path = typer.Option(None, help="LoRA adapter directory."),
        config: Path = ConfigOpt, set_: list[str] = SetOpt):
    """Answer a question with the base model, or base + adapter."""
    from medtune import models
    from medtune.evaluate import generate
    from medtune.preprocess import render_prompt

    cfg = _load(config, set_)
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    model = models.load_model(cfg.model, cfg.train).to(models.device())
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    prompt = render_prompt(tokenizer, cfg.preprocess.system_prompt, question)
    print(generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=cfg.eval.max_new_tokens,
                   desc="answering")[0])


@data_app.command("validate")
def data_validate(path: Path, config: Path = ConfigOpt, set_: list[str] = SetOpt,
                  out: Path = typer.Option(None, help="Folder for the quarantine and validation report.")):
    """Ingest and validate PATH; print counts; exit 1 with the reason on a blocking failure."""
    from medtune import validate

    cfg = _load(config, [*set_, f"data.path={path.resolve()}"])
    out = out or (path.parent if path.is_file() else path) / "medtune-validation"
    try:
        result = validate.validate(cfg.data)
    except DataError as exc:
        _fail(str(exc), code=1)
    validate.write_outputs(result, out / "kept", out / "quarantine.jsonl", out / "validation.json")
    s = result.summary
    console.print(f"rows read {s['rows_read']}, kept {s['rows_kept']}, quarantined {s['rows_quarantined']}")
    for rule, count in s["quarantined_by_rule"].items():
        console.print(f"  {rule}: {count}")
    console.print(f"quarantine and report in {out}")


def main() -> None:  # pragma: no cover - entry point for `python -m medtune.cli`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
