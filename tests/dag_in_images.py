"""Run the committed compiled pipeline twice on the tiny model and the sample data: with kfp.local's
SubprocessRunner (this virtualenv) and with its DockerRunner (every task in the built image, through
$DOCKER_HOST), and check that both reach the same gate decision and the same audit record.

Run by scripts/test-images after it built the image; not a pytest module (it needs a container engine).
    python tests/dag_in_images.py WORKDIR

Each run has its own working directory, so its own local MLflow server and score store: a champion registered
by the first run must not change what the second one compares against, nor answers it kept be reused. The
containers share the host's network (the MLflow server listens on loopback) and see the tiny model and the data
read-only at the same paths.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SAMPLE, build_tiny_model, tiny_config_tree  # noqa: E402

from medtune import config as config_mod  # noqa: E402
from medtune import local_run  # noqa: E402

# The audit record's fields that say what went in and what came out; both runners must agree on them.
# Not compared: run ids, times, tracking URI, runner and images (they differ by design), and the package
# lock (the image names images/constraints.txt, a checkout requirements.lock; the image check compares
# the installed versions with it).
SAME = ("base_model", "data", "splits", "metrics", "gate")
# Artifact files that differ between any two runs, container or not: Great Expectations' result ids,
# timings, the report's run ids, and peft's target_modules (a set, saved in hash-seed order).
VOLATILE = {"validate_data/validation", "validate_data/data_docs", "select/history", "select/trials", "gate/report",
            "select/adapter/adapter_config.json", "finish/history", "finish/trials", "finish/adapter/adapter_config.json",
            "preference/history", "preference/adapter/adapter_config.json"}


def compiled_images() -> set[str]:
    spec = next(yaml.safe_load_all(local_run.compiled_pipeline_path().read_text()))
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


def run(kind: str, workdir: Path, cfg: config_mod.Config, runner=None) -> dict:
    workdir.mkdir(parents=True)
    out = workdir / "out"
    # The image's user (uid 1000) writes the artifacts into these bind mounts, in folders kfp.local made here.
    for folder in (out, out / "artifacts", out / "workspace"):
        folder.mkdir()
        folder.chmod(0o777)
    os.chdir(workdir)
    # A fresh score store: answers kept by an earlier run on this machine (medtune.reuse) would be marked as
    # reused in comparison.json, and the containers start with an empty one.
    os.environ["MEDTUNE_SCORE_CACHE"] = str(workdir / "scores")
    started = time.time()
    summary = local_run.run(cfg, out, f"images-{kind}", Console(stderr=True), runner=runner)
    summary["seconds"] = time.time() - started
    summary["record"] = json.loads(Path(summary["lineage"]).read_text())
    return summary


def comparable(record: dict) -> dict:
    picked = {key: record[key] for key in SAME}
    picked["config"] = {k: v for k, v in record["config"]["resolved"].items() if k != "tracking"}
    # Where each output landed differs (two output directories); what is in it must not.
    picked["artifacts"] = {key: {name: digest for name, digest in a["files"].items()
                                 if f"{key}/{name}" not in VOLATILE}
                           for key, a in record["artifacts"].items()
                           if key not in VOLATILE and not key.startswith(("open_run", "register", "push"))}
    picked["data"] = {k: v for k, v in record["data"].items() if k != "path"}
    return picked


def diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def started_containers(since: float) -> list[str]:
    import docker

    client = docker.from_env()
    events = client.events(since=int(since), until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "event": "start"})
    return [e.get("Actor", {}).get("Attributes", {}).get("image", e.get("from", "?")) for e in events]


def main(workdir: Path) -> None:
    from docker.types import Mount
    from kfp import local

    model = build_tiny_model(workdir / "tiny-model")
    for path in (workdir, model, *model.iterdir()):
        path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o644)
    cfg = config_mod.from_dict(tiny_config_tree(model))
    mounts = [Mount(str(p), str(p), type="bind", read_only=True) for p in (model, SAMPLE.parent)]
    docker_runner = local.DockerRunner(network_mode="host", mounts=mounts)

    plain = run("subprocess", workdir / "subprocess", cfg)
    since = time.time()
    os.umask(0)  # so that uid 1000 in the containers can write in what kfp.local creates for them here
    boxed = run("docker", workdir / "docker", cfg, runner=docker_runner)
    ran = started_containers(since)

    images = compiled_images()
    tasks = sorted(p.name for p in Path(boxed["decision"]).parents[1].iterdir() if p.is_dir())
    problems = diff(comparable(plain["record"]), comparable(boxed["record"]))
    if boxed["record"]["run"]["runner"] != "container":
        problems.append(f"audit ran as {boxed['record']['run']['runner']!r}, not in a container")
    if len(ran) != len(tasks) or not set(ran) <= images:
        problems.append(f"containers started: {ran}; tasks: {tasks}; images in the DAG: {sorted(images)}")
    if problems:
        print("DockerRunner and SubprocessRunner disagree:\n  " + "\n  ".join(problems))
        raise SystemExit(1)
    print(f"SubprocessRunner: {len(tasks)} tasks in {plain['seconds']:.0f} s; gate passed={plain['gate']['passed']}")
    print(f"DockerRunner: {len(ran)} tasks ({', '.join(tasks)}) ran in {', '.join(sorted(set(ran)))} in "
          f"{boxed['seconds']:.0f} s; gate passed={boxed['gate']['passed']} "
          f"({boxed['gate']['summary']}); decision, metrics, splits, data and artifact hashes match "
          "SubprocessRunner")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
