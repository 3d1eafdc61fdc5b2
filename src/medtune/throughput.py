"""Honest training-speed accounting: a step clock that leaves out the warm-up, the model's matmul FLOPs, and the
device peak MFU is measured against (a table for known GPUs, a matmul probe at the model's own shapes on CPU,
unknown otherwise). Used by the train step's metrics and by benchmarks/train_throughput.py alike.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from transformers import TrainerCallback

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, TFLOP/s. Longer names first so that
# "A100" does not match an "A10" entry. A GPU not listed has no known peak: its MFU is reported as unknown.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0,
                   "A10": 125.0, "L4": 121.0, "V100": 125.0, "T4": 65.0}


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name(), or None when not in the table."""
    key = next((k for k in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True) if k in name), None)
    return GPU_PEAK_TFLOPS[key] * 1e12 if key else None


def causal_lm(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_shapes(model) -> tuple[Counter, tuple[int, int]]:
    """(body, head): a count of each (in, out) shape of the frozen/base Linears, and the LM head's (in, out)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    body = Counter((m.in_features, m.out_features) for name, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name)
    return body, (head.weight.shape[1], head.weight.shape[0])


def matmul_params(model) -> tuple[int, int]:
    """(body, head) weights that take part in matmuls, counted from shapes (4-bit layers store half the numel)."""
    body, (d, vocab) = linear_shapes(model)
    return sum(i * o * n for (i, o), n in body.items()), d * vocab


def measure_matmul_peak(shapes: Counter, tokens: int, dtype: torch.dtype, device: str = "cpu",
                        repeats: int = 3) -> float:
    """FLOP/s of the forward (x @ W.T) and input-gradient (dy @ W) matmuls of these Linear shapes at `tokens`
    rows, weighted by how often each shape occurs: the rate a LoRA step's matmuls could reach on this device.
    Each shape counts its best of `repeats` timings (a shared machine only ever makes it slower)."""
    # Its own generator: probing mid-training must not move the global RNG that dropout and the data order
    # draw from, or a run resumed from a checkpoint would no longer match an uninterrupted one.
    rng = torch.Generator(device=device).manual_seed(0)
    flops = seconds = 0.0
    for (n_in, n_out), count in shapes.items():
        w, x, dy = (torch.randn(*shape, dtype=dtype, device=device, generator=rng)
                    for shape in ((n_out, n_in), (tokens, n_in), (tokens, n_out)))
        flops += count * 4 * tokens * n_in * n_out
        seconds += count * _best_time(lambda: (x @ w.T, dy @ w), device, repeats)
    return flops / seconds


def _best_time(fn, device: str, repeats: int, at_least: float = 0.01) -> float:
    """Seconds per call of fn: the best of `repeats` loops, each long enough (`at_least` s) to swamp timer and
    launch overhead for small shapes."""
    def loop(n: int) -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    n = 1
    while loop(n) < at_least:  # also the warm-up
        n *= 2
    return min(loop(n) for _ in range(repeats)) / n


def device_peak(model, dtype: torch.dtype, tokens: int, configured_tflops: float | None = None) -> float | None:
    """FLOP/s to compute MFU against: configured, else the GPU table (None if the GPU is not in it), else
    measured on CPU at the model's own Linear shapes in the training dtype."""
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        return gpu_peak_flops(torch.cuda.get_device_name())
    body, (d, vocab) = linear_shapes(model)
    return measure_matmul_peak(body + Counter({(d, vocab): 1}), tokens, dtype)


class StepClock(TrainerCallback):
    """Times optimizer steps from on_step_begin to on_step_end (so logging, evaluation and checkpoint saves are
    left out) after the first `warmup` steps, and counts the tokens of those steps (`add` from the loss)."""

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.tokens = self.labelled = 0
        self.seconds = self.warmup_seconds = 0.0
        self._start: float | None = None
        self._timed = False

    def add(self, tokens: int, labelled: int = 0) -> None:
        if self._timed:
            self.tokens += tokens
            self.labelled += labelled

    def on_step_begin(self, args, state, control, **kwargs):
        self._timed = state.global_step >= self.warmup
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._start
        if self._timed:
            self.seconds += elapsed
        else:
            self.warmup_seconds += elapsed

    @property
    def tokens_per_s(self) -> float | None:
        """Total timed tokens over total timed seconds; None until a timed step has finished."""
        return self.tokens / self.seconds if self.seconds > 0 else None

    def flops_per_s(self, per_token: float, per_labelled: float) -> float | None:
        return (self.tokens * per_token + self.labelled * per_labelled) / self.seconds if self.seconds else None


def spread(values: list[float]) -> dict:
    """Median, min, max and (max - min) / median of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else None, "n": len(values)}
