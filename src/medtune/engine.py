"""Generation engines behind `medtune serve`: dynamic batching over transformers, or vLLM where it exists.

`BatchingEngine` runs on one worker thread: the first queued request waits up to a short window for others,
and the group is generated as one left-padded batch with the KV cache (as `medtune.evaluate.generate` does),
each row with its own max_tokens, temperature, top_p and stop strings. Tokens reach each request as they
are generated (a stopping criterion sees every step), so streaming and batching go together.

`VllmEngine` is the same interface over vLLM's AsyncLLMEngine (continuous batching, paged KV cache, the
adapter as a LoRA request). It is imported only when vLLM is installed and CUDA is present.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """A piece of one answer: new text, and on the last event why it ended (stop | length | error)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    prompt: str
    params: Params
    emit: Callable[[Event], None]  # called from the engine's thread; must not block
    cancelled: bool = False  # set when the client went away: the row stops at the next step


class QueueFull(RuntimeError):
    pass


@dataclass
class _Row:
    job: Job
    sent: str = ""
    finished: bool = False


class _Tracker:
    """Stopping criterion that also streams: after each step, decode each row's new tokens, cut at a stop
    string, emit the text no stop string could still claim, and say which rows are done."""

    def __init__(self, tokenizer, jobs: list[Job], prompt_width: int):
        self.tokenizer = tokenizer
        self.rows = [_Row(job) for job in jobs]
        self.width = prompt_width
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.width:].tolist()
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(self.rows):
            if not row.finished:
                self._advance(row, generated[i])
            done[i] = row.finished
        return done

    def _advance(self, row: _Row, tokens: list[int]) -> None:
        params = row.job.params
        if row.job.cancelled:
            row.finished = True
            return
        hit_eos = tokens[-1] in self.eos
        if hit_eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if hit_eos else "length" if len(tokens) >= params.max_tokens else None
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None:
            text = text[:len(text) - _held_back(text, params.stop)]
        if text.startswith(row.sent) and (len(text) > len(row.sent) or reason):
            row.job.emit(Event(text=text[len(row.sent):], finish_reason=reason, completion_tokens=len(tokens)))
            row.sent = text
        elif reason:
            row.job.emit(Event(finish_reason=reason, completion_tokens=len(tokens)))
        row.finished = reason is not None

    def finish(self, reason: str = "length") -> None:
        for row in self.rows:
            if not row.finished:
                row.finished = True
                row.job.emit(Event(finish_reason=reason))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to keep back: a partial multi-byte character, or the start of a stop
    string that the next tokens may complete."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class RowSampling:
    """Logits processor for a batch whose rows sample differently: per-row temperature and nucleus (top_p);
    a temperature of 0 leaves only the arg-max, so greedy rows stay greedy inside a sampled batch."""

    def __init__(self, temperatures: list[float], top_ps: list[float], device):
        self.temperature = torch.tensor(temperatures, device=device)
        self.top_p = torch.tensor(top_ps, device=device)

    def __call__(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        greedy = self.temperature == 0
        scores = scores / torch.where(greedy, 1.0, self.temperature)[:, None]
        ascending, order = torch.sort(scores, descending=False)
        mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = mass <= (1 - self.top_p)[:, None]
        drop[:, -1] = False  # the most likely token always survives
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        only_best = torch.full_like(scores, float("-inf")).scatter(1, scores.argmax(dim=-1, keepdim=True), 0.0)
        return torch.where(greedy[:, None], scores + only_best, scores)


_STOP = object()


@dataclass
class BatchingEngine:
    model: object
    tokenizer: object
    max_batch_size: int = 8
    window_s: float = 0.01
    max_queue: int = 256
    threads: int | None = None
    decoding: object = None  # the recipe's DecodingConfig, for every row (None: nothing added)
    on_batch: Callable[[int], None] | None = None
    _queue: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.tokenizer.padding_side = "left"
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="medtune-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests already queued")
        self._queue.put(job)

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()

    def _loop(self) -> None:
        if self.threads:  # set on this thread: it is the one whose matmuls use them
            torch.set_num_threads(self.threads)
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline = [first], time.monotonic() + self.window_s
            while len(batch) < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                batch.append(job)
            batch = [job for job in batch if not job.cancelled]
            if batch:
                self._run_safely(batch)

    def _run_safely(self, batch: list[Job]) -> None:
        tracker = None
        try:
            encoded = self.tokenizer([job.prompt for job in batch], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.model.device)
            tracker = _Tracker(self.tokenizer, batch, encoded["input_ids"].shape[1])
            if self.on_batch:
                self.on_batch(len(batch))
            self._generate(batch, encoded, tracker)
            tracker.finish("length")
        except Exception as exc:  # one failed batch must not end the worker (and the server with it)
            log.exception("generation failed for a batch of %d", len(batch))
            for row in (tracker.rows if tracker else [_Row(job) for job in batch]):
                if not row.finished:
                    row.finished = True
                    row.job.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    @torch.inference_mode()
    def _generate(self, batch: list[Job], encoded, tracker: _Tracker) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from medtune import decoding

        added = decoding.processors(self.decoding, encoded["input_ids"].shape[1]) if self.decoding else []
        kwargs = dict(max_new_tokens=max(job.params.max_tokens for job in batch), use_cache=True,
                      stopping_criteria=StoppingCriteriaList([tracker]), pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if any(job.params.temperature > 0 for job in batch):
            # The built-in warpers are off (they take one value per batch); RowSampling applies each row's own.
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, logits_processor=LogitsProcessorList(
                [*added, RowSampling([j.params.temperature for j in batch], [j.params.top_p for j in batch],
                                     self.model.device)]))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList(added))
        self.model.generate(**encoded, **kwargs)


class VllmEngine:  # pragma: no cover - needs vLLM and a CUDA device, neither of which exists in CI
    """vLLM's async engine with the same submit/start/stop interface; the adapter is a LoRA request."""

    def __init__(self, base_model: str, adapter_dir: str | None, served_name: str, max_batch_size: int,
                 max_model_len: int):
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.lora.request import LoRARequest

        args = AsyncEngineArgs(model=base_model, enable_lora=adapter_dir is not None, max_loras=1,
                               max_num_seqs=max_batch_size, max_model_len=max_model_len)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.lora = LoRARequest(served_name, 1, adapter_dir) if adapter_dir else None
        self.tasks: set = set()

    def start(self) -> None:
        pass

    def submit(self, job: Job) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(self._run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job: Job) -> None:
        from vllm import SamplingParams

        p = job.params
        params = SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, stop=list(p.stop))
        sent = ""
        try:
            async for out in self.engine.generate(job.prompt, params, request_id=uuid.uuid4().hex,
                                                  lora_request=self.lora):
                choice = out.outputs[0]
                job.emit(Event(text=choice.text[len(sent):], completion_tokens=len(choice.token_ids),
                               finish_reason=choice.finish_reason if out.finished else None))
                sent = choice.text
        except Exception as exc:
            job.emit(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def stop(self) -> None:
        self.engine.shutdown_background_loop()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
