"""The OpenAI-compatible HTTP API (FastAPI on uvicorn): the app, its routes and its error handlers.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream with
server-sent events when `stream` is true), POST /v1/load_lora_adapter and /v1/unload_lora_adapter
and POST /tokenize and /detokenize (as vLLM names them), GET /health, GET /metrics (Prometheus text). A request's `model` is the base
model's name (or "base") or an adapter's name, as in vLLM and LoRAX.
No request can stop the server or touch another's: a body is capped (413) and parsed strictly
before any route runs (middleware.py); each request's life is in service.py; every non-2xx answer
has OpenAI's error body, and /openapi.json lists the codes actually returned.
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
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapter_cache import AdapterError, AdapterLoadError, AdapterPathError
from .metrics import Collector
from .middleware import BodyGuard, CountRequests
from .protocol import (APIError, ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, Health, LoadAdapter, ModelList, TokenizeRequest,
                       TokenizeResponse, UnloadAdapter, error_body, responses, streamed, validation_error)
from .server import ServedModel
from .service import Service

log = logging.getLogger(__name__)


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
              "/v1/load_lora_adapter": LoadAdapter, "/v1/unload_lora_adapter": UnloadAdapter,
              "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}

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


def _metrics(app: FastAPI, service: Service) -> Counter:
    registry = CollectorRegistry()
    http_requests = Counter("lorakit_http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=registry)
    registry.register(Collector(service))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return http_requests


def _routes(app: FastAPI, service: Service) -> None:
    # registration order is the order /openapi.json (and /docs) lists the routes in
    _status_routes(app, service)
    _adapter_routes(app, service)
    _generation_routes(app, service)
    _token_routes(app, service)


def _token_routes(app: FastAPI, service: Service) -> None:
    """POST /tokenize and /detokenize, as vLLM has them (no /v1 prefix)."""
    tokenizer, engine = service.served.tokenizer, service.engine

    @app.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
              responses=responses(400, 401, 403, 404))
    async def tokenize(body: TokenizeRequest, request: Request):
        if body.model is not None:
            service.authorize(request, body.model)
        else:
            service.allowed(request)
        if body.prompt is not None:
            service.check_length(len(body.prompt), "prompt")
            specials = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await service.off_loop(lambda: tokenizer.encode(body.prompt, add_special_tokens=specials))
        else:
            ids = await service.render_messages(body.messages, body.add_generation_prompt,
                                                bool(body.add_special_tokens))
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=responses(400, 401, 403, 404))
    async def detokenize(body: DetokenizeRequest, request: Request):
        if body.model is not None:
            service.authorize(request, body.model)
        else:
            service.allowed(request)
        vocab = engine.vocab_size or len(tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in [0, {vocab})", "tokens")
        return {"prompt": await service.off_loop(tokenizer.decode, body.tokens)}


def _status_routes(app: FastAPI, service: Service) -> None:
    """GET /health and GET /v1/models."""
    served, cache, engine = service.served, service.cache, service.engine

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


def _adapter_routes(app: FastAPI, service: Service) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin only)."""
    served, cache = service.served, service.cache

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


def _generation_routes(app: FastAPI, service: Service) -> None:
    """POST /v1/completions and /v1/chat/completions."""
    engine = service.engine
    auth = (401, 403, 404, 413, 429, 500, 503, 504)

    @app.post("/v1/completions", responses=responses(400, *auth, ok=streamed(CompletionResponse)))
    async def completions(body: CompletionRequest, request: Request):
        adapter = service.authorize(request, body.model)
        ids = await service.prompt_ids(body)
        echo_only = body.echo and body.max_tokens == 0      # vLLM: the prompt's logprobs, nothing generated
        max_tokens = 16 if body.max_tokens is None else 1 if echo_only else _positive(body.max_tokens, "max_tokens")
        return await service.run(request, body, ids, adapter, "text_completion", max_tokens, "prompt", echo_only)

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
