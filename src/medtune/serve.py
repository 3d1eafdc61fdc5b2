"""`medtune serve`: an OpenAI-compatible HTTP API over a registered model version (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (streaming as server-sent events or not), POST /v1/completions,
GET /v1/models, GET /health, GET /metrics (Prometheus text). The served model is named
`<registered model>:<version>`; that name is the `model` field of every answer and, with the version, a
header of every response, so an answer can be traced to the audit record of the run that produced it.

Every prompt goes through the model's chat template with the profile's system prompt, which carries the
medical disclaimer (on /v1/completions too: the prompt is the user's question, not raw text to continue).
Requests are checked against the `serve:` bounds and refused with OpenAI-style JSON errors; generation
errors fail that request only. uvicorn stops accepting on SIGTERM and lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from medtune import engine as engines
from medtune.config import Config, DecodingConfig, ServeConfig

log = logging.getLogger(__name__)
MODEL_HEADER = "x-medtune-model"
VERSION_HEADER = "x-medtune-model-version"


@dataclass
class Served:
    name: str  # `<registered model>:<version>`, what clients put in `model`
    version: str
    source: str  # where the weights came from: registry alias/version or a local path
    tokenizer: object
    engine: object
    system_prompt: str


# ---- loading ---------------------------------------------------------------------------------------------

def system_prompt(cfg: Config) -> str:
    return f"{cfg.serve.system_prompt or cfg.preprocess.system_prompt} {cfg.serve.disclaimer}"


def load(cfg: Config, model_ref: str = "champion", adapter: Path | None = None) -> Served:
    """Load what `model_ref` names in the registry (alias `champion`/`challenger` or a version number; `base`
    is the base model alone), or the adapter / full model directory `adapter`, behind an engine."""
    from medtune import champion, lineage

    registered = cfg.tracking.registered_model
    if adapter is not None:  # named by content, so two different local adapters never share a name
        version = f"local-{lineage.tree_digest(lineage.hash_files(adapter))[:12]}"
        return _served(cfg, cfg, adapter, f"{registered}:{version}", version, f"path {adapter}")
    if model_ref == "base":
        return _served(cfg, cfg, None, f"{registered}:base", "base", f"base model {cfg.model.id}")
    import mlflow

    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise LookupError("--model names a registry version but no tracking server is configured "
                          "(tracking.tracking_uri or $MLFLOW_TRACKING_URI); use --adapter PATH or --model base")
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory(prefix="medtune-serve-") as tmp:
        # the base model comes from the profile, never from the registry (see medtune.champion)
        found, info = champion.fetch(registered, Path(tmp), cfg.model, model_ref)
        if found is None:
            raise LookupError(info["reason"])
        return _served(cfg, cfg, found.adapter_dir, f"{registered}:{found.version}", found.version,
                       f"models:/{registered}@{model_ref}" if not model_ref.isdigit() else
                       f"models:/{registered}/{model_ref}", decoding=found.decoding)


def _served(cfg: Config, model_cfg: Config, weights: Path | None, name: str, version: str, source: str,
            decoding: DecodingConfig | None = None) -> Served:
    """`decoding`: what the version was gated with (stored with it); a local adapter or the base model is served
    with the profile's."""
    from medtune import models

    decoding = decoding or cfg.decoding
    tokenizer = models.load_tokenizer(model_cfg.model, padding_side="left")
    # vLLM cannot limit repetition to the answer's own tokens (medtune.decoding): `auto` serves such a version
    # with transformers, as it was measured; an explicit `vllm` is refused rather than served differently.
    want_vllm = cfg.serve.engine == "vllm" or (cfg.serve.engine == "auto" and engines.vllm_available()
                                               and decoding.plain)
    if want_vllm and not decoding.plain:
        raise ValueError(f"{name} was gated with decoding {decoding.model_dump()}, which vLLM cannot apply: "
                         "serve it with serve.engine=transformers (or auto)")
    if want_vllm:  # pragma: no cover - vLLM needs CUDA
        engine = engines.VllmEngine(models.resolve(model_cfg.model), str(weights) if weights else None, name,
                                    cfg.serve.max_batch_size,
                                    max_model_len=cfg.serve.max_prompt_tokens + cfg.serve.max_tokens_limit)
    else:
        model = models.load_trained(model_cfg.model, model_cfg.train, weights) if weights else \
            models.load_model(model_cfg.model, model_cfg.train).to(models.device())
        model.config.use_cache = True  # training loads it off; generation wants the KV cache
        engine = engines.BatchingEngine(model, tokenizer, max_batch_size=cfg.serve.max_batch_size,
                                        window_s=cfg.serve.batch_window_ms / 1000, max_queue=cfg.serve.max_queue,
                                        threads=cfg.serve.threads, decoding=decoding)
    log.info("serving %s from %s with %s, decoding %s", name, source, type(engine).__name__,
             decoding.model_dump())
    return Served(name=name, version=version, source=source, tokenizer=tokenizer, engine=engine,
                  system_prompt=system_prompt(cfg))


# ---- request bodies (OpenAI's shapes; unknown fields are ignored, as OpenAI's own clients send extras) --------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(strict=True)] | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Body):
    model: Annotated[str, Field(strict=True)]
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True)]] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one answer per request")


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True)]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- metrics -----------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("medtune_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("medtune_request_seconds", "Time to the last byte of the response", ["route"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.generated = Counter("medtune_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt = Counter("medtune_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.in_flight = Gauge("medtune_requests_in_flight", "Generation requests not finished",
                               registry=self.registry)
        self.batch = Histogram("medtune_batch_size", "Requests generated together", buckets=(1, 2, 4, 8, 16, 32),
                               registry=self.registry)


class Edge:
    """ASGI middleware at the edge: body size limit, model headers on every response, request metrics."""

    def __init__(self, app, served: Served, metrics: Metrics, max_body: int):
        self.app, self.served, self.metrics, self.max_body = app, served, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (MODEL_HEADER.encode(), self.served.name.encode()),
                                      (VERSION_HEADER.encode(), self.served.version.encode())]
            await send(message)

        try:
            body = await self._body(scope, receive)
            if body is None:
                error = ApiError(413, f"request body is larger than {self.max_body} bytes", code="body_too_large")
                return await _send_json(send_with_headers, error.status, error.body())
            replayed = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def replay():  # the body once, then whatever comes next (a disconnect)
                return next(replayed, None) or await receive()

            await self.app(scope, replay, send_with_headers)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _body(self, scope, receive) -> bytes | None:
        """The whole request body, or None once it passes the limit (declared or counted: chunked bodies
        declare nothing). Bodies are small JSON, so reading them here costs nothing."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


# ---- the app -----------------------------------------------------------------------------------------------

def create_app(served: Served, bounds: ServeConfig):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    if isinstance(served.engine, engines.BatchingEngine):
        served.engine.on_batch = metrics.batch.observe

    @asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        yield
        log.info("in-flight requests finished; stopping the engine")
        served.engine.stop()

    app = FastAPI(title="medtune", lifespan=lifespan)
    app.add_middleware(Edge, served=served, metrics=metrics, max_body=bounds.max_body_bytes)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return await api_error(request, ApiError(400, "request body is not valid JSON", code="json_invalid"))
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param or 'body'}: {first['msg']}"
        return await api_error(request, ApiError(400, message, param=param, code=first["type"]))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        log.exception("request failed")
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    def params(body: _Sampling, max_tokens: int | None) -> engines.Params:
        if body.model not in (served.name, served.name.split(":")[0]):
            raise ApiError(404, f"The model `{body.model}` does not exist; this server serves `{served.name}`",
                           param="model", code="model_not_found")
        max_tokens = max_tokens or bounds.default_max_tokens
        if max_tokens > bounds.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of "
                                f"{bounds.max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
        temperature = bounds.default_temperature if body.temperature is None else body.temperature
        if temperature > bounds.max_temperature:
            raise ApiError(400, f"temperature={temperature} is above {bounds.max_temperature}", param="temperature")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > bounds.max_stop or any(not s for s in stop):
            raise ApiError(400, f"stop takes at most {bounds.max_stop} non-empty strings", param="stop")
        return engines.Params(max_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=stop)

    def render(messages: list[dict]) -> tuple[str, int]:
        # The disclaimer-carrying system prompt comes first; a client's own system text is added to it.
        own = " ".join(m["content"] for m in messages if m["role"] == "system")
        system = {"role": "system", "content": f"{served.system_prompt} {own}".strip()}
        prompt = served.tokenizer.apply_chat_template(
            [system, *(m for m in messages if m["role"] != "system")], add_generation_prompt=True, tokenize=False)
        n = len(served.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > bounds.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {n} tokens; this server takes at most {bounds.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        return prompt, n

    def start(prompt: str, p: engines.Params) -> tuple[asyncio.Queue, engines.Job]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = engines.Job(prompt, p, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            served.engine.submit(job)
        except engines.QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}", code="rate_limit_exceeded", kind="rate_limit_error") from None
        metrics.in_flight.inc()
        return events, job

    async def events_of(events: asyncio.Queue, job: engines.Job, prompt_tokens: int):
        """Yield the answer's events; counts tokens and in-flight requests; stops the row if the client left."""
        metrics.prompt.inc(prompt_tokens)
        try:
            while True:
                event = await events.get()
                if event.finish_reason:
                    metrics.generated.inc(event.completion_tokens)
                yield event
                if event.finish_reason:
                    return
        finally:
            job.cancelled = True
            metrics.in_flight.dec()

    async def answer(prompt: str, prompt_tokens: int, p: engines.Params, chat: bool,
                     stream: bool):
        events, job = start(prompt, p)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _chat_shape if chat else _completion_shape
        base = {"id": rid, "created": int(time.time()), "model": served.name}
        if stream:
            async def sse():
                async for event in events_of(events, job, prompt_tokens):
                    if event.error:
                        yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                        return
                    yield f"data: {json.dumps({**base, **shape(event.text, event.finish_reason, True)})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
        text, last = "", None
        async for last in events_of(events, job, prompt_tokens):
            text += last.text
        if last.error:
            raise ApiError(500, f"generation failed: {last.error}", kind="server_error")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": last.completion_tokens,
                 "total_tokens": prompt_tokens + last.completion_tokens}
        return {**base, **shape(text, last.finish_reason, False), "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        p = params(body, body.max_completion_tokens or body.max_tokens)
        prompt, n = render([{"role": m.role, "content": m.text()} for m in body.messages])
        return await answer(prompt, n, p, chat=True, stream=body.stream)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt takes one string per request", param="prompt")
        p = params(body, body.max_tokens)
        prompt, n = render([{"role": "user", "content": prompts[0]}])
        return await answer(prompt, n, p, chat=False, stream=body.stream)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "medtune", "source": served.source}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "version": served.version}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def _chat_shape(text: str, finish_reason: str | None, chunk: bool) -> dict:
    if chunk:
        return {"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason}]}
    return {"object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}]}


def _completion_shape(text: str, finish_reason: str | None, chunk: bool) -> dict:
    return {"object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def run(app, host: str, port: int, drain_timeout_s: float) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting and let in-flight requests finish (up to the timeout)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout_s,
                                  log_level="info", access_log=False)).run()


def wait_ready(url: str, timeout_s: float = 120.0, process=None) -> dict:
    """Poll `url`/health until the server answers (model loaded); fail early if `process` exited."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"medtune serve exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
