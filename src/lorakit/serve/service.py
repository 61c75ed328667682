"""What stands behind the HTTP routes: API keys, prompt preparation, and one request's life from
submit to its last byte (engine events -> text -> JSON or server-sent events).

Prompts are measured against the length limit before they are tokenized, and tokenized off the
event loop; a client that disconnects (streaming or not) aborts its request within one engine step;
a request that fails on the server ends with an error (a 5xx body, or `finish_reason: "error"` and
an error event in a stream), never with a 200 that looks complete. Tenant-facing messages name
adapters, never server paths.
What this does not do: routes and app wiring (api.py), the wire format (protocol.py), batching (the engine).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import StreamingResponse

from .adapter_cache import AdapterError, AdapterLoadError
from .engine import EngineUnavailable, Event, RequestFailed
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import SSE_DONE, APIError, ChatRequest, CompletionRequest, UnsupportedField, error_body, sse
from .sampling import BadParam, NonFiniteLogits, SamplingParams
from .scheduler import QueueFull
from .server import ServedModel
from .text import TextStream

DISCONNECTED = object()          # put on a request's event queue when its client goes away


class Service:
    """Keys, prompt preparation and one request's run through the engine; the routes call these."""

    def __init__(self, served: ServedModel, api_keys: dict[str, set[str]] | None):
        self.served, self.api_keys = served, api_keys
        self.engine, self.cache, self.limits = served.engine, served.adapters, served.config
        self.counts = {"client_disconnects": 0, "request_errors": 0}
        # one thread: tokenizers are not safe to share across threads, and prompts are bounded anyway
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-tokenize")
        self._decoded: dict[int, str] = {}                  # token id -> its text alone, for logprobs
        vocab = getattr(served.tokenizer, "get_vocab", lambda: {})()
        self.max_token_chars = max((len(t) for t in vocab), default=0) or None   # chars one token covers at most

    def decode_token(self, token: int) -> str:
        text = self._decoded.get(token)
        if text is None:
            text = self._decoded[token] = self.served.tokenizer.decode([token])
        return text

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
        return await self.render_messages(body.messages)

    async def render_messages(self, messages, generation_prompt: bool = True, specials: bool = False) -> list[int]:
        """Token ids of chat messages through the chat template (which writes its own special tokens)."""
        messages = [{"role": m.role, "content": m.text()} for m in messages]
        self.check_length(sum(len(m["content"]) for m in messages), "messages")

        def render():
            text = self.served.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                             tokenize=False)
            return self.served.tokenizer.encode(text, add_special_tokens=specials)
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
            if self.chat_request(body):
                logprobs, prompt_logprobs = ((body.top_logprobs or 0) if body.logprobs else None), None
            else:
                logprobs, prompt_logprobs = body.logprobs, body.prompt_top_k
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, ignore_eos=body.ignore_eos, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logit_bias=body.bias(),
                                  min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()),
                                  structured=body.structured())
        except BadParam as e:
            raise APIError(400, str(e), e.param) from None
        except UnsupportedField as e:
            raise APIError(400, str(e), e.param) from None

    @staticmethod
    def chat_request(body) -> bool:
        return isinstance(body, ChatRequest)

    # one request
    async def matcher(self, params: SamplingParams):
        """A structured request's grammar matcher, compiled off the event loop (None: a free request)."""
        if params.structured is None:
            return None
        if self.engine.grammars is None:
            raise APIError(400, f"{params.structured.param}: structured output is not available on this server "
                                "(its tokenizer is not a fast tokenizer)", params.structured.param)
        try:
            return await self.off_loop(self.engine.grammars.matcher, params.structured)
        except BadParam as e:
            raise APIError(400, str(e), e.param) from None

    def submit(self, ids, adapter, params, field, deliver, matcher=None) -> str:
        try:
            return self.engine.submit(ids, adapter, params, deliver, matcher)
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
                  max_tokens: int, field: str, echo_only: bool = False):
        """Submit the request's n choices and answer; `echo_only` (echo with max_tokens 0): one token
        is generated, as vLLM does, and the answer holds the prompt alone. Choice i of a seeded request
        draws with seed + i (vLLM's rule), so greedy choices are identical and sampled ones differ."""
        if body.n > self.engine.scheduler.max_num_seqs:
            raise APIError(400, f"n must be at most {self.engine.scheduler.max_num_seqs} on this server "
                                f"(max_num_seqs), got {body.n}", "n")
        params = self.params(body, ids, max_tokens, field)
        run = Run(self, request, body, kind, ids, echo_only)
        try:
            for choice in run.choices:
                p = params if params.seed is None else params.replace(seed=params.seed + choice.index)
                matcher = await self.matcher(p)
                choice.request_id = self.submit(ids, adapter, p, field, run.deliver(choice.index), matcher)
        except BaseException:
            run.close()                                       # the choices already queued go too
            raise
        run.watch()
        if not body.stream:
            return await run.complete()
        return StreamingResponse(run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Choice:
    """One of a request's n choices: its engine request, its text and tokens so far, its logprobs."""

    def __init__(self, index: int, stream: TextStream):
        self.index, self.stream = index, stream
        self.request_id: str | None = None
        self.tokens, self.positions, self.prompt_positions = [], [], None     # what logprobs report
        self.parts: list[str] = []
        self.reason: str | None = None                   # the finish reason, once finished
        self.sent, self.offset, self.echoed = 0, 0, False  # streaming: positions sent, text_offset, echo sent


class Run:
    """One request between submit and its last byte: the engine's events -> text -> JSON or SSE."""

    def __init__(self, service: Service, request: Request, body, kind: str, ids: list[int], echo_only: bool = False):
        self.service, self.request, self.body, self.kind = service, request, body, kind
        self.ids, self.echo_only = ids, echo_only
        tokenizer = service.served.tokenizer
        self.choices = [Choice(i, TextStream(tokenizer, body.stops(), body.skip_special_tokens))
                        for i in range(body.n)]
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.deadline = time.monotonic() + service.limits.request_timeout
        self.chat = kind.startswith("chat")
        self.meta = dict(id=f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                         model=body.model)
        self.usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        self.failed, self.watcher = False, None

    @property
    def finished(self) -> bool:
        return self.failed or all(c.reason is not None for c in self.choices)

    def deliver(self, index: int):
        def put(event: Event) -> None:                  # on the engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    def watch(self) -> None:
        """Abort the request the moment its client goes away (a receive after the body is the disconnect)."""
        async def wait():
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            if not self.finished:
                self.service.counts["client_disconnects"] += 1
                self._abort()
                self.queue.put_nowait(DISCONNECTED)
        self.watcher = asyncio.ensure_future(wait())

    def _abort(self) -> None:
        for c in self.choices:
            if c.reason is None and c.request_id is not None:
                self.service.engine.abort(c.request_id)

    def close(self) -> None:
        if not self.finished:
            self._abort()
        self.failed = self.failed or not self.finished
        if self.watcher is not None:
            self.watcher.cancel()

    async def _next(self):
        limit = self.service.limits.request_timeout
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, f"the request took longer than {limit:g} s")
            try:
                return await asyncio.wait_for(self.queue.get(), left)
            except asyncio.TimeoutError:
                continue

    async def deltas(self):
        """(choice, text delta, finish reason or None) until every choice finishes; raises APIError on
        failure (one failed choice fails the request: the others are aborted)."""
        while not self.finished:
            item = await self._next()
            if item is DISCONNECTED:
                return
            index, event = item
            c = self.choices[index]
            if c.reason is not None:                         # stopped by a stop string: the rest is dropped
                continue
            if event.error is not None or event.finish_reason in ("error", "abort"):
                self.failed = True
                raise self.service.failure(event, self.body.model)
            if event.token is not None:
                c.tokens.append(event.token)
                c.positions.append(event.logprob)
            if event.prompt_logprobs is not None:
                c.prompt_positions = event.prompt_logprobs
            text, stopped = c.stream.add(event.token) if event.token is not None else ("", False)
            self.usage["completion_tokens"] += event.token is not None
            if stopped:
                c.reason = "stop"
                self.service.engine.abort(c.request_id)
                yield c, text, "stop"
            elif event.finished:
                c.reason = event.finish_reason
                yield c, text + c.stream.flush(), c.reason
            elif text:
                yield c, text, None

    def choice(self, c: Choice, text: str, reason: str | None, delta: bool, logprobs=None) -> dict:
        if not self.chat:
            return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        message = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        return {"index": c.index, ("delta" if delta else "message"): message, "logprobs": logprobs,
                "finish_reason": reason}

    def wants_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    def logprobs(self, c: Choice, tokens: list[int], positions: list, offset: int = 0) -> dict | None:
        """The logprobs object of these positions of choice c, or None when the request asked for none."""
        if not self.wants_logprobs():
            return None
        if self.chat:
            return chat_logprobs(positions, self.body.top_logprobs or 0, self.service.decode_token)
        return completion_logprobs(positions, tokens, self.service.decode_token, offset)

    def echo(self, c: Choice) -> tuple[str, list[int], list]:
        """What echo puts before a completion: the prompt's text, tokens and positions (first: None)."""
        prompt = self.body.prompt
        prompt = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else prompt
        text = prompt if isinstance(prompt, str) else self.service.served.tokenizer.decode(self.ids)
        return text, self.ids, c.prompt_positions or [None] * len(self.ids)

    def generated(self, c: Choice, upto: int | None = None) -> tuple[list[int], list]:
        """Choice c's generated tokens and positions from c.sent (none when echo_only)."""
        if self.echo_only:
            return [], []
        return c.tokens[c.sent:upto], c.positions[c.sent:upto]

    def total(self) -> dict:
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    async def complete(self) -> dict:
        try:
            async for c, text, _ in self.deltas():
                c.parts.append(text)
        finally:
            self.close()
        if not all(c.reason is not None for c in self.choices):     # the client left: nobody reads this
            raise APIError(499, "the client disconnected")
        out = []
        for c in self.choices:
            text = "" if self.echo_only else "".join(c.parts)
            tokens, positions = self.generated(c)
            if not self.chat and self.body.echo:
                prompt_text, prompt_ids, prompt_positions = self.echo(c)
                text, tokens, positions = prompt_text + text, prompt_ids + tokens, prompt_positions + positions
            out.append(self.choice(c, text, c.reason, False, self.logprobs(c, tokens, positions)))
        return {**self.meta, "object": self.kind, "choices": out, "usage": self.total()}

    def chunk(self, c: Choice, text: str, reason: str | None) -> dict:
        """A stream chunk of choice c: the delta, and the logprobs of the tokens since its last chunk
        (with echo, the prompt's come first, in the choice's first chunk, as vLLM sends them)."""
        tokens, positions = self.generated(c)
        c.sent = len(c.tokens)
        if not self.chat and self.body.echo and not c.echoed:
            prompt_text, prompt_ids, prompt_positions = self.echo(c)
            text, tokens, positions = prompt_text + ("" if self.echo_only else text), prompt_ids + tokens, \
                prompt_positions + positions
            c.echoed = True
        elif self.echo_only:
            text = ""
        logprobs = self.logprobs(c, tokens, positions, c.offset)
        if logprobs is not None and not self.chat:
            c.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1]) if tokens else c.offset
        return {**self.meta, "object": self.kind + (".chunk" if self.chat else ""),
                "choices": [self.choice(c, text, reason, True, logprobs)]}

    async def events(self):
        kind = self.kind + (".chunk" if self.chat else "")
        try:
            if self.chat:
                for c in self.choices:
                    yield sse({**self.meta, "object": kind, "choices": [
                        {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            try:
                async for c, text, reason in self.deltas():
                    if text or reason or not self.echo_only:
                        yield sse(self.chunk(c, text, reason))
            except APIError as e:             # headers are sent: the failure travels as a finish and an event
                for c in self.choices:
                    if c.reason is None:
                        yield sse({**self.meta, "object": kind, "choices": [self.choice(c, "", "error", True)]})
                yield sse(error_body(e.status, str(e), e.param))
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield sse({**self.meta, "object": kind, "choices": [], "usage": self.total()})
            yield SSE_DONE
        finally:
            self.close()
