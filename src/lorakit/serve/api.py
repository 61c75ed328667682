"""The OpenAI-compatible HTTP API (FastAPI on uvicorn): completions, chat, streaming, models, adapters.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream with
server-sent events when `stream` is true), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(as vLLM names them), GET /health, GET /metrics (Prometheus text). A request's `model` is the base
model's name (or "base") or an adapter's name, as in vLLM and LoRAX.
Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field
(named in `param`), 401 for a missing or wrong API key, 403 for another tenant's model, 404 for an
unknown model, 429 (with Retry-After) when the queue is full, 504 past the request timeout.
A client that disconnects aborts its request, which frees its batch row and KV cache.
What this does not do: batching or scheduling (the engine), or loading adapters (the adapter cache).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from .adapter_cache import AdapterError
from .engine import Event
from .sampling import BadParam, SamplingParams
from .scheduler import QueueFull
from .server import ServeConfig, ServedModel
from .text import TextStream

MAX_STOP = 4            # stop strings per request, as OpenAI allows
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


# -- request bodies (unknown fields are ignored, as OpenAI's own server does for most) ---------------
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False
    stream_options: dict | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[dict], None] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


# -- keys ---------------------------------------------------------------------------------------
def read_api_keys(path: str | Path) -> dict[str, set[str]]:
    """A JSON object: key -> the models it may use (adapter names, "base"), or "*" for all (and admin)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--api-keys {path}: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--api-keys {path}: expected a non-empty JSON object of key -> list of models or \"*\"")
    keys = {}
    for key, allowed in raw.items():
        allowed = [allowed] if isinstance(allowed, str) else allowed
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ValueError(f"--api-keys {path}: key {key[:4]}...: expected a list of model names or \"*\"")
        keys[key] = set(allowed)
    return keys


# -- the app ------------------------------------------------------------------------------------
def create_app(served: ServedModel, api_keys: dict[str, set[str]] | None = None, start_engine: bool = True) -> FastAPI:
    """The app for `served`. With `start_engine`, its lifespan runs the engine on a background thread
    and closes everything at shutdown; without, the caller runs `served.engine.run()` and cleans up."""
    engine, cache, limits = served.engine, served.adapters, served.config
    registry = CollectorRegistry()
    http_requests = Counter("lorakit_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    registry.register(_Collector(served))

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        yield
        if start_engine:
            served.close()

    app = FastAPI(title="lorakit", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.status, str(e), e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, "the request body is not valid JSON", None), 400)
        return JSONResponse(error_body(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param), 400)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        http_requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    def allowed(request: Request) -> set[str] | None:
        """The models this request's key may use (None: no keys configured, everything)."""
        if api_keys is None:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        if key not in api_keys:
            raise APIError(401, "invalid API key")
        return api_keys[key]

    def authorize(request: Request, model: str) -> str | None:
        """The adapter a request names (None: base), checked against its key and the registry."""
        permitted = allowed(request)
        adapter = served.resolve(model)
        public = "base" if adapter is None else adapter
        if permitted is not None and "*" not in permitted and not ({public, model} & permitted):
            raise APIError(403, f"this API key may not use model {model!r}", "model")
        if adapter is not None and adapter not in cache:
            raise APIError(404, f"the model {model!r} does not exist (GET /v1/models lists them)", "model")
        return adapter

    def admin(request: Request) -> None:
        permitted = allowed(request)
        if permitted is not None and "*" not in permitted:
            raise APIError(403, "loading and unloading adapters needs a key with \"*\"")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        permitted = allowed(request)
        now = int(time.time())
        names = [(served.name, None)] + [(a, served.name) for a in cache.names()]
        data = [{"id": n, "object": "model", "created": now, "owned_by": "lorakit", "root": n, "parent": parent}
                for n, parent in names
                if permitted is None or "*" in permitted or ("base" if parent is None else n) in permitted
                or n in permitted]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter, request: Request):
        admin(request)
        try:
            await asyncio.to_thread(cache.register, body.lora_name, body.lora_path)
        except AdapterError as e:
            raise APIError(e.status, str(e), "lora_path" if "path" in type(e).__name__.lower() else "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter, request: Request):
        admin(request)
        try:
            cache.unregister(body.lora_name)
        except AdapterError as e:
            raise APIError(e.status, str(e), "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = authorize(request, body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (batching happens in the server)", "prompt")
            prompt = prompt[0]
        ids = served.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await run(request, body, ids, adapter, "text_completion", body.max_tokens or 16)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        adapter = authorize(request, body.model)
        messages = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(body.messages)]
        try:
            text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        ids = served.tokenizer.encode(text, add_special_tokens=False)
        return await run(request, body, ids, adapter, "chat.completion",
                         body.max_completion_tokens or body.max_tokens, field="messages")

    async def run(request: Request, body: _Sampling, ids: list[int], adapter: str | None, kind: str,
                  max_tokens: int | None, field: str = "prompt"):
        if max_tokens is None:              # chat without a limit: as much as the model's length allows
            max_tokens = max(1, min(limits.max_tokens, engine.max_model_len - len(ids)))
        params, stops = _params(body, max_tokens, limits, ids, field)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Event):
            loop.call_soon_threadsafe(queue.put_nowait, event)
        try:
            request_id = engine.submit(ids, adapter, params, deliver)
        except BadParam as e:
            raise APIError(400, str(e), e.param if e.param != "prompt" else field)
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"})
        except AdapterError as e:
            raise APIError(e.status, str(e), "model")
        stream = TextStream(served.tokenizer, stops)
        deadline = time.monotonic() + limits.request_timeout
        meta = dict(id=f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
                    created=int(time.time()), model=body.model)
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}

        async def deltas():
            """(text delta, finish reason or None) until the request finishes; aborts it when left early."""
            finished = False
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise APIError(504, f"the request took longer than {limits.request_timeout:g} s")
                    try:
                        event = await asyncio.wait_for(queue.get(), min(left, 1.0))
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if event.error is not None:
                        status = getattr(event.error, "status", 500)
                        raise APIError(status, f"the request failed: {event.error}")
                    text, stopped = stream.add(event.token) if event.token is not None else ("", False)
                    usage["completion_tokens"] += event.token is not None
                    if stopped:
                        yield text, "stop"
                        return
                    if event.finished:
                        finished = True
                        yield text + stream.flush(), "stop" if event.finish_reason == "stop" else "length"
                        return
                    if text:
                        yield text, None
            finally:
                if not finished:
                    engine.abort(request_id)

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if kind == "text_completion":
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            body_ = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            return {"index": 0, ("delta" if delta else "message"): body_, "logprobs": None, "finish_reason": reason}

        def total() -> dict:
            return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

        if not body.stream:
            parts, reason = [], None
            async for text, reason in deltas():
                parts.append(text)
            return {**meta, "object": kind, "choices": [choice("".join(parts), reason, False)], "usage": total()}

        chunk_kind = kind + (".chunk" if kind.startswith("chat") else "")

        async def sse():
            def event(data) -> str:
                return f"data: {json.dumps(data)}\n\n"
            if kind.startswith("chat"):
                yield event({**meta, "object": chunk_kind,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
            try:
                async for text, reason in deltas():
                    yield event({**meta, "object": chunk_kind, "choices": [choice(text, reason, True)]})
            except APIError as e:               # headers are sent: the error travels as an event
                yield event(error_body(e.status, str(e), e.param))
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            if include_usage:
                yield event({**meta, "object": chunk_kind, "choices": [], "usage": total()})
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _content(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported, got type "
                                f"{part.get('type')!r}", f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def _params(body: _Sampling, max_tokens: int, limits: ServeConfig, ids: list[int], field: str) -> tuple[SamplingParams, list[str]]:
    if body.n != 1:
        raise APIError(400, "n must be 1 (send several requests; the server batches them)", "n")
    if max_tokens < 1 or max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}", "max_tokens")
    if not ids:
        raise APIError(400, f"the {field} is empty", field)
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"the {field} has {len(ids)} tokens, more than this server's limit of "
                            f"{limits.max_prompt_tokens}", field)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP or not all(stops):
        raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos)
    except BadParam as e:
        raise APIError(400, str(e), e.param) from None
    return params, stops


class _Collector:
    """Reads the engine's and the adapter cache's counters at scrape time (nothing to keep in sync)."""

    def __init__(self, served: ServedModel):
        self.served = served

    def collect(self):
        e, c = self.served.engine.metrics(), self.served.adapters.metrics()
        counters = {"requests": "requests accepted", "prompt_tokens": "prompt tokens accepted",
                    "generation_tokens": "tokens generated", "rejected_queue_full": "requests refused, queue full"}
        for key, doc in counters.items():
            yield CounterMetricFamily(f"lorakit_{key}", doc, value=e.get(key, 0))
        finished = CounterMetricFamily("lorakit_requests_finished", "finished requests by reason", labels=["reason"])
        for reason in ("stop", "length", "abort", "error"):
            finished.add_metric([reason], e.get(f"finished_{reason}", 0))
        yield finished
        yield SummaryMetricFamily("lorakit_batch_sequences", "sequences per forward step",
                                  count_value=e.get("steps", 0), sum_value=e.get("batched_seqs", 0))
        yield SummaryMetricFamily("lorakit_batch_tokens", "tokens per forward step",
                                  count_value=e.get("steps", 0), sum_value=e.get("batched_tokens", 0))
        for key, doc in (("queue_seconds", "arrival to admission (adapter loaded, slot pinned)"),
                         ("first_token_seconds", "arrival to first token"),
                         ("request_seconds", "arrival to last token")):
            yield SummaryMetricFamily(f"lorakit_{key}", f"completed requests: {doc}",
                                      count_value=e.get("timed_requests", 0), sum_value=e.get(key, 0.0))
        gauges = {"queue_depth": "requests waiting", "running": "requests in the running batch",
                  "batch_seqs": "sequences in the latest step", "kv_cache_bytes": "bytes of KV cache held"}
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"lorakit_{key}", doc, value=e[key])
        for key in ("cpu_hits", "cpu_misses", "cpu_evictions", "device_hits", "device_misses", "device_evictions",
                    "loads", "load_errors"):
            yield CounterMetricFamily(f"lorakit_adapter_{key}", f"adapter cache: {key.replace('_', ' ')}",
                                      value=c[key])
        for key in ("registered", "cpu_adapters", "cpu_bytes", "active_adapters", "device_bytes", "device_slot_bytes",
                    "pinned", "loading"):
            yield GaugeMetricFamily(f"lorakit_adapter_{key}", f"adapter cache: {key.replace('_', ' ')}",
                                    value=c[key])



@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` on uvicorn in a background thread; yields its base URL (demo, tests, benchmarks).
    Port 0 picks a free port."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lorakit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
