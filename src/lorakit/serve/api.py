"""The OpenAI-compatible HTTP API (FastAPI on uvicorn): thin routes over the engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream with
server-sent events when `stream` is true), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(as vLLM names them), GET /health, GET /metrics (Prometheus text). A request's `model` is the base
model's name (or "base") or an adapter's name, as in vLLM and LoRAX.
No request can stop the server or touch another's: a body is capped (413) and parsed strictly
before any route runs; prompts are measured against the length limit before they are tokenized,
and tokenized off the event loop; a client that disconnects (streaming or not) aborts its request
within one engine step; a request that fails on the server ends with an error (a 5xx body, or an
error event and `finish_reason: "error"` in a stream), never with a 200 that looks complete.
Tenant-facing messages name adapters, never server paths (those go to the server log).
What this does not do: batching or scheduling (the engine), loading adapters (the adapter cache),
or the wire format's models and errors (protocol.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapter_cache import AdapterError, AdapterLoadError, AdapterPathError
from .engine import EngineUnavailable, Event, RequestFailed
from .protocol import (SSE_DONE, APIError, ChatCompletionResponse, ChatRequest, CompletionRequest,
                       CompletionResponse, Health, LoadAdapter, ModelList, UnloadAdapter, error_body,
                       parse_json_body, responses, sse, streamed, validation_error)
from .sampling import BadParam, NonFiniteLogits, SamplingParams
from .scheduler import QueueFull
from .server import ServedModel
from .text import TextStream

log = logging.getLogger(__name__)
DISCONNECTED = object()          # put on a request's event queue when its client goes away


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


# -- the body, before any route -------------------------------------------------------------------
class BodyGuard:
    """ASGI middleware: a POST body over `max_bytes` gets 413 (by its Content-Length, or as soon as the
    bytes read pass the cap); a body that is not strict JSON gets 400. Either way the route never runs.
    A good body is handed on as it came; later `receive` calls reach the client (disconnects)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            parse_json_body(body)
        except APIError as e:
            response = JSONResponse(error_body(e.status, str(e), e.param), e.status)
            return await response(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope["headers"] = headers + [(b"content-type", b"application/json")]      # curl -d sends a form type
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes:
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                                "(--max-request-bytes)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


# -- the service behind the routes ----------------------------------------------------------------
class Service:
    """Keys, prompt preparation and one request's run through the engine; the routes call these."""

    def __init__(self, served: ServedModel, api_keys: dict[str, set[str]] | None):
        self.served, self.api_keys = served, api_keys
        self.engine, self.cache, self.limits = served.engine, served.adapters, served.config
        self.counts = {"client_disconnects": 0, "request_errors": 0}
        # one thread: tokenizers are not safe to share across threads, and prompts are bounded anyway
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-tokenize")
        vocab = getattr(served.tokenizer, "get_vocab", lambda: {})()
        self.max_token_chars = max((len(t) for t in vocab), default=0) or None   # chars one token covers at most

    # keys
    def allowed(self, request: Request) -> set[str] | None:
        """The models this request's key may use (None: no keys configured, everything)."""
        if self.api_keys is None:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        if key not in self.api_keys:
            raise APIError(401, "invalid API key")
        return self.api_keys[key]

    def authorize(self, request: Request, model: str) -> str | None:
        """The adapter a request names (None: base), checked against its key and the registry."""
        permitted = self.allowed(request)
        adapter = self.served.resolve(model)
        public = "base" if adapter is None else adapter
        if permitted is not None and "*" not in permitted and not ({public, model} & permitted):
            raise APIError(403, f"this API key may not use model {model!r}", "model")
        if adapter is not None and adapter not in self.cache:
            raise APIError(404, f"the model {model!r} does not exist (GET /v1/models lists them)", "model")
        return adapter

    def admin(self, request: Request) -> bool:
        permitted = self.allowed(request)
        if permitted is not None and "*" not in permitted:
            raise APIError(403, "loading and unloading adapters needs a key with \"*\"")
        return True

    def is_admin(self, request: Request) -> bool:
        permitted = self.allowed(request)
        return permitted is None or "*" in permitted

    # prompts
    @property
    def max_prompt_tokens(self) -> int:
        return self.limits.max_prompt_tokens or self.engine.max_model_len - 1

    def check_length(self, chars: int, field: str) -> None:
        """Refuse, before tokenizing, text that cannot fit: no token covers more than max_token_chars."""
        if self.max_token_chars and chars > self.max_prompt_tokens * self.max_token_chars:
            raise APIError(400, f"the {field} has {chars:,} characters: more than {self.max_prompt_tokens} tokens "
                                "whatever the tokenizer does (this server's prompt limit)", field)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    async def prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (batching happens in the server)", "prompt")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return list(prompt)
        self.check_length(len(prompt), "prompt")
        return await self.off_loop(self.served.tokenizer.encode, prompt)

    async def chat_ids(self, body: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self.check_length(sum(len(m["content"]) for m in messages), "messages")

        def render():
            text = self.served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.served.tokenizer.encode(text, add_special_tokens=False)
        try:
            return await self.off_loop(render)
        except Exception as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None

    def params(self, body, ids: list[int], max_tokens: int, field: str) -> SamplingParams:
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens must be at most {self.limits.max_tokens} on this server, got "
                                f"{max_tokens}", "max_tokens")
        if not ids:
            raise APIError(400, f"the {field} is empty", field)
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the {field} has {len(ids)} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens}", field)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos)
        except BadParam as e:
            raise APIError(400, str(e), e.param) from None

    # one request
    def submit(self, ids, adapter, params, field, deliver) -> str:
        try:
            return self.engine.submit(ids, adapter, params, deliver)
        except BadParam as e:
            raise APIError(400, str(e), e.param if e.param != "prompt" else field) from None
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except EngineUnavailable as e:
            raise APIError(503, str(e)) from None
        except AdapterError as e:
            raise APIError(e.status, str(e), "model") from None

    def failure(self, event: Event, model: str) -> APIError:
        """The answer for a request the engine finished with an error (or aborted on its own)."""
        self.counts["request_errors"] += 1
        e = event.error
        if e is None or isinstance(e, (EngineUnavailable, RequestFailed)):     # the engine's state, not the request's
            return APIError(503, f"the request was not finished: {e or 'the server aborted it'}")
        if isinstance(e, AdapterLoadError):
            return APIError(500, f"the adapter {model!r} could not be loaded on the server (its files are at "
                                 f"fault, not this request; the server log has the details, {event.request_id})")
        if isinstance(e, (BadParam, AdapterError)) and getattr(e, "status", 500) < 500:
            return APIError(e.status, str(e), getattr(e, "param", None))
        what = str(e) if isinstance(e, NonFiniteLogits) else type(e).__name__
        return APIError(500, f"the request failed on the server ({what}); the server log has the details, "
                             f"{event.request_id}")

    async def run(self, request: Request, body, ids: list[int], adapter: str | None, kind: str,
                  max_tokens: int, field: str):
        params = self.params(body, ids, max_tokens, field)
        run = Run(self, request, body, kind, len(ids))
        run.request_id = self.submit(ids, adapter, params, field, run.deliver)
        run.watch()
        if not body.stream:
            return await run.complete()
        return StreamingResponse(run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Run:
    """One request between submit and its last byte: the engine's events -> text -> JSON or SSE."""

    def __init__(self, service: Service, request: Request, body, kind: str, prompt_tokens: int):
        self.service, self.request, self.body, self.kind = service, request, body, kind
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.stream = TextStream(service.served.tokenizer, body.stops())
        self.deadline = time.monotonic() + service.limits.request_timeout
        self.chat = kind.startswith("chat")
        self.meta = dict(id=f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                         model=body.model)
        self.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
        self.request_id, self.finished, self.watcher = None, False, None

    def deliver(self, event: Event) -> None:            # on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def watch(self) -> None:
        """Abort the request the moment its client goes away (a receive after the body is the disconnect)."""
        async def wait():
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            if not self.finished:
                self.service.counts["client_disconnects"] += 1
                self.service.engine.abort(self.request_id)
                self.queue.put_nowait(DISCONNECTED)
        self.watcher = asyncio.ensure_future(wait())

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.service.engine.abort(self.request_id)
        if self.watcher is not None:
            self.watcher.cancel()

    async def deltas(self):
        """(text delta, finish reason or None) until the request finishes; raises APIError on failure."""
        limit = self.service.limits.request_timeout
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, f"the request took longer than {limit:g} s")
            try:
                event = await asyncio.wait_for(self.queue.get(), left)
            except asyncio.TimeoutError:
                continue
            if event is DISCONNECTED:
                return
            if event.error is not None or event.finish_reason in ("error", "abort"):
                self.finished = True
                raise self.service.failure(event, self.body.model)
            text, stopped = self.stream.add(event.token) if event.token is not None else ("", False)
            self.usage["completion_tokens"] += event.token is not None
            if stopped:
                yield text, "stop"
                return
            if event.finished:
                self.finished = True
                yield text + self.stream.flush(), event.finish_reason
                return
            if text:
                yield text, None

    def choice(self, text: str, reason: str | None, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None, "finish_reason": reason}

    def total(self) -> dict:
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    async def complete(self) -> dict:
        parts, reason = [], None
        try:
            async for text, reason in self.deltas():
                parts.append(text)
        finally:
            self.close()
        if reason is None:                                   # the client left: nobody reads this
            raise APIError(499, "the client disconnected")
        return {**self.meta, "object": self.kind, "choices": [self.choice("".join(parts), reason, False)],
                "usage": self.total()}

    async def events(self):
        kind = self.kind + (".chunk" if self.chat else "")
        try:
            if self.chat:
                yield sse({**self.meta, "object": kind, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            try:
                async for text, reason in self.deltas():
                    yield sse({**self.meta, "object": kind, "choices": [self.choice(text, reason, True)]})
            except APIError as e:             # headers are sent: the failure travels as a finish and an event
                yield sse({**self.meta, "object": kind, "choices": [self.choice("", "error", True)]})
                yield sse(error_body(e.status, str(e), e.param))
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield sse({**self.meta, "object": kind, "choices": [], "usage": self.total()})
            yield SSE_DONE
        finally:
            self.close()


# -- the app ------------------------------------------------------------------------------------
def create_app(served: ServedModel, api_keys: dict[str, set[str]] | None = None, start_engine: bool = True) -> FastAPI:
    """The app for `served`. With `start_engine`, its lifespan runs the engine on a background thread
    and closes everything at shutdown; without, the caller runs `served.engine.run()` and cleans up."""
    service = Service(served, api_keys)

    @asynccontextmanager
    async def lifespan(app):
        if start_engine:
            served.engine.start()
        yield
        service.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if start_engine:
            served.close()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.service = service
    _errors(app)
    counter = _metrics(app, service)
    _routes(app, service)
    app.add_middleware(BodyGuard, max_bytes=served.config.max_request_bytes)
    app.add_middleware(CountRequests, counter=counter)          # added last: outside BodyGuard
    _document_codes(app)
    return app


def _errors(app: FastAPI) -> None:
    """Every non-2xx answer in OpenAI's error shape."""
    models = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
              "/v1/load_lora_adapter": LoadAdapter, "/v1/unload_lora_adapter": UnloadAdapter}

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.status, str(e), e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        error = validation_error(models.get(request.url.path), list(e.errors()))
        return JSONResponse(error_body(400, str(error), error.param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path} (see /docs)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, message), e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(500, f"internal server error (the server log has it as {ref})"), 500)


class CountRequests:
    """ASGI middleware, outermost: every answer counted by route and status (413s and 500s included)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            self.counter.labels(getattr(scope.get("route"), "path", "other"), str(status)).inc()


def _metrics(app: FastAPI, service: Service) -> Counter:
    registry = CollectorRegistry()
    http_requests = Counter("lorakit_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    registry.register(_Collector(service))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return http_requests


def _routes(app: FastAPI, service: Service) -> None:
    served, cache, engine = service.served, service.cache, service.engine
    auth = (401, 403, 404, 413, 429, 500, 503, 504)

    @app.get("/health", response_model=Health, response_model_exclude_unset=True, responses=responses(503))
    async def health(request: Request):
        skipped = sorted(served.skipped)
        shown = skipped if service.api_keys is None else len(skipped)        # names only when nobody is keyed
        if engine.failure is not None:
            return JSONResponse({"status": "unhealthy", "reason": f"the engine failed: {engine.failure!r}",
                                 "skipped_adapters": shown}, 503)
        return {"status": "ok", "skipped_adapters": shown}

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_unset=True, responses=responses(401))
    async def models(request: Request):
        permitted = service.allowed(request)
        now = int(time.time())
        names = [(served.name, None)] + [(a, served.name) for a in cache.names()]
        data = [{"id": n, "object": "model", "created": now, "owned_by": "lorakit", "root": n, "parent": parent}
                for n, parent in names
                if permitted is None or "*" in permitted or ("base" if parent is None else n) in permitted
                or n in permitted]
        out = {"object": "list", "data": data}
        if service.is_admin(request) and served.skipped:
            out["skipped"] = [{"id": k, "reason": v} for k, v in sorted(served.skipped.items())]
        return out

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=responses(400, 401, 403, 413))
    async def load_adapter(body: LoadAdapter, request: Request):
        service.admin(request)
        try:
            await asyncio.to_thread(cache.register, body.lora_name, body.lora_path)
        except AdapterError as e:      # the admin named the folder: a broken one is this request's fault
            param = "lora_path" if isinstance(e, (AdapterPathError, AdapterLoadError)) else "lora_name"
            raise APIError(400 if isinstance(e, AdapterLoadError) else e.status, str(e), param) from None
        served.skipped.pop(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=responses(400, 401, 403, 404, 413))
    async def unload_adapter(body: UnloadAdapter, request: Request):
        service.admin(request)
        try:
            cache.unregister(body.lora_name)
        except AdapterError as e:
            raise APIError(e.status, str(e), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions", responses=responses(400, *auth, ok=streamed(CompletionResponse)))
    async def completions(body: CompletionRequest, request: Request):
        adapter = service.authorize(request, body.model)
        ids = await service.prompt_ids(body)
        max_tokens = 16 if body.max_tokens is None else _positive(body.max_tokens, "max_tokens")
        return await service.run(request, body, ids, adapter, "text_completion", max_tokens, "prompt")

    @app.post("/v1/chat/completions", responses=responses(400, *auth, ok=streamed(ChatCompletionResponse)))
    async def chat(body: ChatRequest, request: Request):
        adapter = service.authorize(request, body.model)
        ids = await service.chat_ids(body)
        if body.max_completion_tokens is not None:           # OpenAI's name; max_tokens is its older alias
            max_tokens = _positive(body.max_completion_tokens, "max_completion_tokens")
        elif body.max_tokens is not None:
            max_tokens = _positive(body.max_tokens, "max_tokens")
        else:                                                # as much as the model's length allows
            max_tokens = max(1, min(service.limits.max_tokens, engine.max_model_len - len(ids)))
        return await service.run(request, body, ids, adapter, "chat.completion", max_tokens, "messages")



def _positive(value: int, field: str) -> int:
    if value < 1:          # vLLM answers 0 with 400 too ("max_tokens must be at least 1")
        raise APIError(400, f"{field} must be at least 1, got {value}", field)
    return value


def _document_codes(app: FastAPI) -> None:
    """The OpenAPI schema lists the codes the routes return: FastAPI's automatic 422 is never sent (a
    validation error is a 400 here), and the streamed responses' models are in the components."""
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, defs = models_json_schema([(m, "serialization") for m in (CompletionResponse, ChatCompletionResponse)],
                                     ref_template="#/components/schemas/{model}")
        components.update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema
    app.openapi = openapi


class _Collector:
    """Reads the engine's, the adapter cache's and the API's counters at scrape time."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        served = self.service.served
        e, c = served.engine.metrics(), served.adapters.metrics()
        counters = {"requests": "requests accepted", "prompt_tokens": "prompt tokens accepted",
                    "generation_tokens": "tokens generated", "rejected_queue_full": "requests refused, queue full"}
        for key, doc in counters.items():
            yield CounterMetricFamily(f"lorakit_{key}", doc, value=e.get(key, 0))
        yield CounterMetricFamily("lorakit_client_disconnects", "requests aborted because their client went away",
                                  value=self.service.counts["client_disconnects"])
        yield CounterMetricFamily("lorakit_request_errors", "accepted requests that ended in an error answer",
                                  value=self.service.counts["request_errors"])
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
        yield GaugeMetricFamily("lorakit_healthy", "1 while the engine runs, 0 after it failed", value=e["healthy"])
        yield GaugeMetricFamily("lorakit_adapters_skipped", "adapter folders skipped at start-up",
                                value=len(served.skipped))
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
