"""The OpenAI protocol as this server speaks it: request and response models, errors, SSE framing.

Requests are strict at the edge: a field the server does not implement is refused with 400 naming
it, never ignored. Fields clients send with a neutral value (`presence_penalty: 0`, `logprobs: null`,
`tools: []`, `n: 1`) pass; asking for the feature itself is refused. Every error answer has OpenAI's
body, `{"error": {"message", "type", "param", "code"}}`, with `param` the exact field
(`prompt`, `stop`, `messages[2].content`).
What this does not do: routes, keys, the engine (api.py), or sampling itself (sampling.py).
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .structured import Structured

MAX_STOP = 4            # stop strings per request, as OpenAI allows
MAX_LOGPROBS = 20       # top log-probabilities per position (vLLM's max_logprobs default)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
               503: "service_unavailable", 504: "timeout"}


class APIError(Exception):
    """An answer other than 2xx; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)      # the documented JSON types, no coercion


# field -> (neutral values, what to say): a neutral value passes, anything else is refused
NOT_IMPLEMENTED = {
    "best_of": ((None, 1), "best_of is not implemented (send several requests)"),
    "suffix": ((None, ""), "suffix (insertion) is not implemented"),
    "tools": ((None, []), "tools (function calling) are not implemented"),
    "tool_choice": ((None, "none", "auto"), "tools (function calling) are not implemented"),
    "parallel_tool_calls": ((None,), "tools (function calling) are not implemented"),
    "functions": ((None, []), "functions (function calling) are not implemented"),
    "function_call": ((None, "none", "auto"), "functions (function calling) are not implemented"),
}


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text (free), json_object (any JSON object) or json_schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise UnsupportedField("response_format.json_schema", "response_format: json_schema (with its schema) "
                                   "goes with type \"json_schema\" and only with it")
        return self


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one constraint."""
    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def _neutral(value, neutral: tuple) -> bool:
    """`value` is one of `neutral`, type for type (logprobs: 0 asks for logprobs; False does not)."""
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    user: str | None = None                        # an end-user id for the caller's own records: no effect
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None     # token id (as a string) -> added to its logit
    repetition_penalty: float = 1.0                 # vLLM's extensions from here on
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None     # OpenAI's structured output
    structured_outputs: StructuredOutputs | None = None   # vLLM's, and its older guided_* fields:
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def structured(self) -> Structured | None:
        """The request's output constraint, from whichever field names it (at most one may)."""
        found = []
        if self.response_format is not None and self.response_format.type == "json_object":
            found.append(Structured("json_object", param="response_format"))
        elif self.response_format is not None and self.response_format.type == "json_schema":
            found.append(Structured("json", _json(self.response_format.json_schema.schema_), "response_format"))
        so = self.structured_outputs
        if so is not None:
            given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar), ("json_object", so.json_object or None))]
            given = [(k, v) for k, v in given if v is not None]
            if len(given) != 1:
                raise UnsupportedField("structured_outputs", "structured_outputs: give exactly one of json, regex, "
                                       f"choice, grammar and json_object (got {', '.join(k for k, _ in given) or 'none'})")
            kind, value = given[0]
            found.append(Structured(kind, "" if kind == "json_object" else _json(value) if kind in ("json", "choice")
                                    else value, f"structured_outputs.{kind}"))
        for kind, value in (("json", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                found.append(Structured(kind, _json(value) if kind != "regex" and kind != "grammar" else value,
                                        f"guided_{kind}"))
        if len(found) > 1:
            raise UnsupportedField(found[1].param, f"{found[1].param}: only one output constraint per request "
                                   f"(this one also has {found[0].param})")
        return found[0] if found else None

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias with its keys as token ids; UnsupportedField names a key that is not one."""
        out = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise UnsupportedField("logit_bias", f"logit_bias: keys are token ids, got {key!r}")
            out.append((int(key), value))
        return tuple(out)

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for name, (neutral, why) in NOT_IMPLEMENTED.items():
            if name in type(self).model_fields and not _neutral(getattr(self, name), neutral):
                raise UnsupportedField(name, f"{name}: {why}")
        if self.n < 1:
            raise UnsupportedField("n", f"n must be at least 1, got {self.n}")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise UnsupportedField("stop", f"stop: at most {MAX_STOP} strings")
        if any(s == "" for s in ([self.stop] if isinstance(self.stop, str) else self.stop or [])):
            raise UnsupportedField("stop", "stop: the strings must not be empty")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class UnsupportedField(ValueError):
    """Raised by a model validator: pydantic reports it at the model's location; `param` says where."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _top_k(value, name: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise UnsupportedField(name, f"{name}: expected an integer in [0, {MAX_LOGPROBS}], got {value}")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None           # the top k per generated token (0: only the chosen token's)
    echo: bool = False                    # return the prompt before the completion (its logprobs too)
    prompt_logprobs: int | None = None    # vLLM's: the top k per prompt token (echo with logprobs implies it)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        _top_k(self.logprobs, "logprobs")
        _top_k(self.prompt_logprobs, "prompt_logprobs")
        if self.prompt_logprobs is not None and not (self.echo and self.logprobs is not None):
            raise UnsupportedField("prompt_logprobs", "prompt_logprobs: only with echo: true and logprobs (they then "
                                   "arrive in logprobs, beside the prompt's tokens)")
        return self

    @property
    def prompt_top_k(self) -> int | None:
        """vLLM's rule: prompt_logprobs, or with echo the logprobs count."""
        return self.prompt_logprobs if self.prompt_logprobs is not None else self.logprobs if self.echo else None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Union[str, dict[str, Any], None] = None

    @model_validator(mode="after")
    def _check_logprobs(self):
        _top_k(self.top_logprobs, "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt (special tokens added by default) or chat messages (rendered with
    the chat template and the generation prompt by default; the template writes its own specials)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise UnsupportedField("prompt", "send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LoadAdapter(_Strict):
    lora_name: str
    lora_path: str


class UnloadAdapter(_Strict):
    lora_name: str


# -- responses (what the OpenAPI schema documents; the routes build plain dicts of these shapes) -----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]                 # the first prompt token's is null (with echo)
    top_logprobs: list[dict[str, float] | None]        # the chosen token first, then the top k
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class CompletionResponse(_Completion):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class SkippedAdapter(BaseModel):
    id: str
    reason: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
    skipped: list[SkippedAdapter] | None = None


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    reason: str | None = None
    skipped_adapters: Union[list[str], int] = 0


def responses(*codes: int, ok: dict | None = None) -> dict:
    """OpenAPI `responses=` for a route: its 200 (`ok`) and the error codes it can answer."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    out = {code: {"model": ErrorResponse, "description": ERROR_TYPES.get(code, "error"), "content": error}
           for code in codes}
    if ok is not None:
        out[200] = ok
    return out


def streamed(model: type[BaseModel]) -> dict:
    """A 200 that is `model` as JSON, or server-sent events when the request sets `stream`."""
    return {"description": "the completion (JSON), or server-sent events with \"stream\": true",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                        # before OpenAPI 3.2 an event stream's `schema` describes one event: its `data`
                        # line holds a chunk as JSON, or "[DONE]"
                        "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                         "properties": {"data": {"type": "string"},
                                                                        "event": {"type": "string"}}}}}}


# -- validation errors -> `param` -----------------------------------------------------------------
def param_path(model: type[BaseModel], loc: tuple, extra: bool = False) -> str | None:
    """pydantic's error location -> the field as a client names it: ('body', 'messages', 2, 'content',
    'list[TextPart]', 0, 'type') -> 'messages[2].content[0].type'. Union tags ('str', 'list[int]') are
    not fields and are dropped; with `extra` (an unknown field) the last part is the field's own name."""
    path, current = "", model
    for i, part in enumerate(loc):
        if part == "body" and i == 0:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        fields = getattr(current, "model_fields", {}) if isinstance(current, type) else {}
        if part in fields:
            path += ("." if path else "") + part
            current = _inner_model(fields[part].annotation)
        elif extra and i == len(loc) - 1:
            path += ("." if path else "") + str(part)
    return path or None


def _inner_model(annotation):
    """The BaseModel inside list[Model] / Model | None / Union[str, list[Model]], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validation_error(model: type[BaseModel] | None, errors: list[dict]) -> APIError:
    """The most specific of pydantic's errors (the deepest field) as a 400."""
    def where(e):
        return param_path(model, tuple(e.get("loc", ())), e.get("type") == "extra_forbidden") if model else None
    if not errors:
        return APIError(400, "the request body is invalid")
    # the deepest location wins, a wrong value before an unknown field beside it; max keeps the first of equals
    first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") != "extra_forbidden"))
    ctx = (first.get("ctx") or {}).get("error")
    if isinstance(ctx, UnsupportedField):
        return APIError(400, str(ctx), ctx.param)
    param, kind = where(first), first.get("type")
    tags = [str(e["loc"][-1]) for e in errors if where(e) == param and e.get("loc") and isinstance(e["loc"][-1], str)
            and not e.get("loc")[-1] in getattr(model, "model_fields", {})]
    if kind == "extra_forbidden":
        message = f"{param}: this server does not support this field"
    elif kind == "missing":
        message = f"{param}: a required field is missing"
    elif len(tags) > 1:                                               # every member of a union refused it
        message = f"{param}: expected one of {', '.join(tags)}"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param)


# -- the body before validation --------------------------------------------------------------------
def parse_json_body(body: bytes):
    """Strict JSON: UTF-8, no NaN/Infinity, nesting the parser can follow. Raises APIError(400)."""
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply") from None
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(value).__name__}")
    return value


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
