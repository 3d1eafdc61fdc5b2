"""Speed accounting: the step clock leaves out the warm-up and divides totals, peaks are known or measured."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from medtune import throughput


def test_clock_is_total_tokens_over_total_time_without_warmup(monkeypatch):
    now = iter([0.0, 10.0,   # step 0: the warm-up, 10 s, its tokens not counted
                10.0, 11.0,  # step 1: 1 s, 100 tokens
                11.5, 14.5])  # step 2: 3 s, 900 tokens (the 0.5 s between steps is logging, not a step)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(now))
    clock = throughput.StepClock(warmup=1)
    for step, tokens in enumerate([5000, 100, 900]):
        clock.on_step_begin(None, SimpleNamespace(global_step=step), None)
        clock.add(tokens, labelled=tokens // 2)
        clock.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert clock.tokens == 1000 and clock.labelled == 500
    assert clock.seconds == 4.0 and clock.warmup_seconds == 10.0
    assert clock.tokens_per_s == 250.0  # not the mean of the step rates (100 and 300 -> 200)
    assert clock.flops_per_s(per_token=2.0, per_labelled=4.0) == (1000 * 2 + 500 * 4) / 4.0


def test_clock_has_no_speed_before_a_timed_step():
    assert throughput.StepClock(warmup=1).tokens_per_s is None


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.0),
                                          ("Tesla T4", 65.0), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_from_the_table_or_unknown(name, tflops):
    peak = throughput.gpu_peak_flops(name)
    assert peak == (tflops * 1e12 if tflops else None)


def test_matmul_peak_is_measured_at_the_given_shapes():
    shapes = Counter({(64, 128): 3, (128, 64): 1})
    rate = throughput.measure_matmul_peak(shapes, tokens=32, dtype=torch.float32, repeats=2)
    assert 1e6 < rate < 1e13  # a real FLOP/s figure for a CPU, neither zero nor absurd


def test_spread_reports_median_and_relative_range():
    s = throughput.spread([100.0, 90.0, 120.0])
    assert s == {"median": 100.0, "min": 90.0, "max": 120.0, "spread": 0.3, "n": 3}
