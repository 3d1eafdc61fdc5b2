"""benchmarks/train_throughput.py's logic: which rows exist where, alternating order, the CUDA model's shape,
summaries, RESULTS.md rendering, and one real row of each runner on the tiny model (CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medtune import config as config_mod
from medtune import throughput
from medtune import train as trainer_mod
from conftest import ROOT, tiny_config_tree


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("train_throughput")
render = _load("render_results")


def test_rows_follow_the_device_and_the_profile():
    train = config_mod.load(bench.PROFILE).train
    cpu = bench.variants("cpu", native_bf16=False, profile_train=train)
    assert cpu["trl-fair"]["args"] == {"bf16": False} and "args" not in cpu["trl-defaults"]
    assert "medtune+trl_head" in cpu and not any("liger" in n or "qlora" in n for n in cpu)
    # the layout and dropout rows switch whatever the profile chose
    chosen = trainer_mod.padding_free(train)
    layout = "medtune+padding-free" if not chosen else "medtune+padded+grouped"
    assert cpu[layout]["train"] == {"padding_free": not chosen}
    dropout = next(n for n in cpu if n.startswith("medtune+dropout"))
    assert (cpu[dropout]["train"]["lora"]["dropout"] == 0) != (train.lora.dropout == 0)
    cuda = bench.variants("cuda", native_bf16=True, profile_train=train)
    assert cuda["trl-fair"]["args"] == {"bf16": True}
    assert cuda["medtune+qlora"]["train"] == {"method": "qlora"}
    assert cuda["medtune+liger"]["args"] == cuda["trl-fair+liger"]["args"] == {"use_liger_kernel": True}
    assert "medtune+trl_head" not in cuda


def test_repetitions_alternate_rows():
    assert bench.run_order(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]


def test_cuda_model_has_qwen25_05b_shape():
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**bench.QWEN25_05B))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published 0.49B
    body, head = throughput.linear_shapes(model)
    assert head == (896, 151936)
    assert body == {(896, 896): 48, (896, 128): 48, (896, 4864): 48, (4864, 896): 24}


def test_cuda_profile_points_at_the_random_model_in_bf16(tmp_path):
    cfg = bench.profile_config("cuda", str(tmp_path))
    assert cfg.model.source == "path" and cfg.model.id == str(tmp_path)
    assert cfg.train.dtype == "bfloat16" and cfg.train.quantization.compute_dtype == "bfloat16"
    assert bench.profile_config("cpu").model == config_mod.load(bench.PROFILE).model


def _run(name, rep, rate, flops):
    return {"name": name, "rep": rep, "tokens": 100, "labelled": 40, "seconds": 100 / rate, "warmup_seconds": 2.0,
            "tokens_per_s": rate, "useful_flops_per_s": flops, "peak_memory_mb": 1000.0 + rep, "timed_steps": 10,
            "settings": {"bf16_autocast": False, "dtype": "torch.float32", "activation_checkpointing": name != "medtune",
                         "padding_free": name == "medtune", "sampling": "random", "lora_dropout": 0.0,
                         "method": "lora", "torch_compile": False, "use_liger_kernel": False}}


def test_summary_medians_and_mfu_against_the_right_peak():
    runs = [_run("medtune", i, r, r * 1e9) for i, r in enumerate([100.0, 120.0, 90.0])]
    runs += [_run("trl-fair", i, r, r * 1e9) for i, r in enumerate([50.0, 60.0, 40.0])]
    rows = bench.summarize(runs, peaks=[200e9, 220e9, 180e9], gpu_peak=None)
    assert rows["medtune"]["tokens_per_s"]["median"] == 100.0 and rows["trl-fair"]["tokens_per_s"]["max"] == 60.0
    assert rows["medtune"]["mfu"] == pytest.approx(100e9 / 200e9) and rows["medtune"]["peak_memory_mb"] == 1002.0
    on_gpu = bench.summarize(runs, peaks=[200e9], gpu_peak=1000e9)
    assert on_gpu["medtune"]["mfu"] == pytest.approx(0.1) and on_gpu["medtune"]["mfu_measured_peak"] == 0.5


def test_results_md_is_generated_between_markers():
    runs = [_run("medtune", i, r, r * 1e9) for i, r in enumerate([100.0, 120.0, 90.0])]
    runs += [_run("trl-fair", i, r, r * 1e9) for i, r in enumerate([50.0, 60.0, 40.0])]
    runs += [_run("medtune+compile", i, r, r * 1e9) for i, r in enumerate([80.0, 130.0, 80.0])]
    runs[-3]["warmup_seconds"] = 700.0  # the cold compile; later runs hit inductor's cache
    context = {"device": "cpu", "started_utc": "2026-01-01 00:00:00", "cpu": "Test CPU", "cpus": 2,
               "native_bf16": False, "cpu_bf16_flags": [], "torch": "t", "transformers": "x", "trl": "y",
               "peft": "p", "git": "abc", "model": "m", "args": {}, "load_avg_start": [3.0, 0, 0],
               "load_avg_during": throughput.spread([3.0, 5.0]), "load_avg_end": [4.0, 0, 0],
               "tokens_per_step_probe": 690, "runs_done": 9, "runs_planned": 9, "matmul_peak_gflops": throughput.spread([200.0, 220.0, 180.0])}
    report = {"context": context, "rows": bench.summarize(runs, [200e9, 220e9, 180e9], None), "runs": runs,
              "ratio": 2.0}
    text = render.render([report], f"# Results\n\n{render.BEGIN}\nold figures\n{render.END}\n\n## Other\nkept\n")
    assert "old figures" not in text and text.endswith("## Other\nkept\n")
    assert "| medtune | **100.0** | 90.0-120.0 (n=3) | 50.0% |" in text
    assert "| trl-fair | **50.0** |" in text and "`ratio=2.00`" in text
    assert "Goals: ratio >= 1.5 met; MFU >= 60% not met." in text  # medtune's MFU: 100e9 / 200e9
    assert "| 2.0 (max 700) |" in text and "| 2.0 | 1002 |" in text  # the compile row's cold start shows
    assert "load average): 3.0 at the start, 3.0-5.0 during" in text
    # per round 0.80, 1.08, 0.89: the compile row is neither always faster nor always slower
    assert "`medtune+compile` / medtune per round: median 0.89x (range 0.80-1.08): within the noise." in text


def test_each_runner_trains_and_counts_tokens(tiny_model_dir, tmp_path):
    tree = tiny_config_tree(tiny_model_dir)
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump(tree))
    base = {"rep": 0, "device": "cpu", "native_bf16": False, "profile": str(profile), "warmup": 1, "steps": 2}
    medtune = bench.run_variant({**base, "name": "medtune"})
    trl = bench.run_variant({**base, "name": "trl-fair"})
    for r in (medtune, trl):
        assert r["tokens"] > r["labelled"] > 0 and r["seconds"] > 0 and r["warmup_seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"]) and r["useful_flops_per_s"] > 0
    # the profile's layout (auto: padded, length-grouped on CPU), without TRL's activation checkpointing
    assert medtune["settings"]["padding_free"] is trainer_mod.padding_free(config_mod.from_dict(tree).train)
    assert medtune["settings"]["sampling"] == "group_by_length" or medtune["settings"]["padding_free"]
    assert not medtune["settings"]["activation_checkpointing"]
    assert trl["settings"]["activation_checkpointing"] and not trl["settings"]["bf16_autocast"]
    assert trl["settings"]["dtype"] == medtune["settings"]["dtype"] == "torch.float32"
