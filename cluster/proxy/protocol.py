"""OpenAI API schema of the Omni Proxy: requests, responses, errors, SSE framing.

Requests are strict (`extra="forbid"`): a field this server does not know, or an
OpenAI feature it does not implement (n > 1, logprobs, penalties, ...), is a 400
naming the field rather than being silently ignored, because a client that asks
for logprobs and gets none would be wrong without knowing it. A JSON `null` for
a field with a default means "the default", as it does for OpenAI.

Responses mirror OpenAI's JSON exactly so that the `openai` client parses them;
`model_dump(exclude_none=True)` drops our optional extras (debug, usage on
stream chunks) yet keeps the fields OpenAI always sends as null
(`finish_reason`, `logprobs`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from cluster.validation import field_errors

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# ---- errors ---------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def __reduce__(self):  # picklable across Ray workers (its __init__ takes more than the message)
        return APIError, (self.status, self.message, self.type, self.param, self.code, self.headers)


def remote_message(err: BaseException) -> str:
    """An error's own message. One raised in another actor reaches here wrapped in a
    RayTaskError whose text is the remote traceback; a client gets the cause's."""
    return str(getattr(err, "cause", None) or err)


def unknown_model(asked: str, served: str) -> APIError:
    """The 404 for a model this server does not serve (OpenAI's code: model_not_found)."""
    return APIError(404, f"model {asked!r} does not exist; this server serves {served!r}", "not_found_error",
                    param="model", code="model_not_found")


def error_body(exc: APIError) -> dict:
    """`{"error": {message, type, param, code}}`: the shape OpenAI clients turn into exceptions."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """A 400 whose message names every bad field path and whose `param` is the first one.

    FastAPI prefixes body errors with a `body` location element; the client never
    wrote that, so it is dropped.
    """
    parts, params = [], []
    for e in field_errors(err.errors(), skip_first="body"):
        if e.type == "json_invalid":
            parts.append(f"body is not valid JSON: {e.ctx.get('error', e.msg)}")
            continue
        msg = "unrecognized request argument" if e.type == "extra_forbidden" else e.msg
        parts.append(f"{e.path}: {msg}" if e.path else msg)
        if e.path:
            params.append(e.path)
    return APIError(400, "; ".join(parts) or "invalid request", "invalid_request_error", params[0] if params else None)


# ---- requests -------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with the request's usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk (guidellm sends it)


class _Request(BaseModel):
    """Sampling fields shared by completions and chat; OpenAI's defaults, plus vLLM-style extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension: 0 = off
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)  # "" would match anywhere
    stop_token_ids: list[int] = Field(default_factory=list)  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    debug: bool = False  # extension: lifecycle stage timings in the response
    # OpenAI features not implemented: accepted at their default only, otherwise a 400 naming the field
    DEFAULT_ONLY: ClassVar[dict[str, tuple]] = {
        "logprobs": (None,), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}
    logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"temperature": null` (sent by some clients) means OpenAI's default, not an error."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if not (v is None and k in cls.model_fields and cls.model_fields[k].default is not None)}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported (got {v}); send one request per completion")
        return v

    @field_validator("logprobs", "echo", "best_of", "suffix", "logit_bias", "top_logprobs", "presence_penalty",
                     "frequency_penalty", check_fields=False)
    @classmethod
    def _default_only(cls, v: Any, info: ValidationInfo) -> Any:
        """OpenAI features not implemented here: only their default values pass (see DEFAULT_ONLY)."""
        allowed = cls.DEFAULT_ONLY[info.field_name]
        if v not in allowed:
            raise ValueError(f"unsupported by this server; only OpenAI's default ({json.dumps(allowed[-1])}) "
                             "is accepted")
        return v


class CompletionRequest(_Request):
    """POST /v1/completions: one prompt (text or token ids), one choice."""

    DEFAULT_ONLY = _Request.DEFAULT_ONLY | {"echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}
    prompt: str | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(t, (str, list)) for t in v):
            if len(v) == 1 and isinstance(v[0], str):
                return v[0]  # a batch of one is just a prompt
            raise ValueError("batch prompts (a list of strings or of token lists) are unsupported: send one prompt "
                             "(a string or a list of token ids) per request; n=1 only")
        if not isinstance(v, (str, list)):
            raise ValueError("prompt must be a string or a list of token ids")  # noqa: TRY004 (pydantic wants ValueError)
        return v


class ChatMessage(BaseModel):
    """One chat turn; `content` is normalized to a string (text parts joined)."""

    model_config = ConfigDict(extra="forbid")
    _NULL_OK: ClassVar[tuple[str, ...]] = ("refusal", "tool_calls", "function_call", "audio", "annotations")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, data: Any) -> Any:
        """An assistant message echoed back from an openai client response carries these as null."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in cls._NULL_OK and v is None)}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"content part {i} has type {kind!r}; only {{'type': 'text', 'text': ...}} "
                                     "parts are supported")
                texts.append(part["text"])
            return "".join(texts)
        if not isinstance(v, str):
            raise ValueError("content must be a string or a list of text parts")  # noqa: TRY004
        return v


NO_TOOL_CALLS = "tool calling is not served here: the models cannot call tools"


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions. `max_tokens` unset means `to_sampling`'s default."""

    DEFAULT_ONLY = _Request.DEFAULT_ONLY | {"logprobs": (None, False), "top_logprobs": (None, 0)}
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _agree(cls, v: int | None, info: ValidationInfo) -> int | None:
        old = info.data.get("max_tokens")
        if v is not None and old is not None and v != old:
            raise ValueError(f"max_completion_tokens ({v}) and max_tokens ({old}) disagree; send one of them")
        return v

    @model_validator(mode="after")
    def _alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    # tool calling is not served (the models cannot call tools): a request that lets the
    # model call one is a 400; tools sent with tool_choice "none" are accepted and unused,
    # as vLLM does. The choices come first: the tools' validator reads them.
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or a tool
    function_call: str | dict[str, Any] | None = None  # OpenAI's deprecated spelling: "none", "auto" or a function
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = None  # accepted: no tool is ever called

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, "none"):
            raise ValueError(f'{NO_TOOL_CALLS}; only {info.field_name} "none" is accepted')
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list | None, info: ValidationInfo) -> list | None:
        choice = "tool_choice" if info.field_name == "tools" else "function_call"
        if v and info.data.get(choice) != "none":
            raise ValueError(f'{NO_TOOL_CALLS}; {info.field_name} are accepted (and not used) only with '
                             f'{choice} "none"')
        return v


def to_sampling(req: _Request, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """What an engine needs of a request, with defaults filled and `stop` always a list."""
    return {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
        "max_tokens": req.max_tokens if req.max_tokens is not None else default_max_tokens,
        "stop": list(req.stop or []), "stop_token_ids": list(req.stop_token_ids), "ignore_eos": req.ignore_eos,
    }


# ---- responses ------------------------------------------------------------------------


class _Out(BaseModel):
    """Response model: `keep_null` fields are written as null even under exclude_none (OpenAI always sends them)."""

    keep_null: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _keep_nulls(self, handler):
        data = handler(self)
        for name in self.keep_null:
            data.setdefault(name, None)
        return data


class PromptTokensDetails(_Out):
    cached_tokens: int  # prompt tokens whose KV came from a cache (the instance's prefix cache or the global one)


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def _id(prefix: str):
    return Field(default_factory=lambda: f"{prefix}-{uuid.uuid4().hex}")


Created = Annotated[int, Field(default_factory=lambda: int(time.time()))]


class _Envelope(_Out):
    """Fields of every completion body and chunk, in OpenAI's order; subclasses narrow the types."""

    id: str
    object: str
    created: Created
    model: str
    choices: list
    usage: Usage | None = None  # stream chunks: the last (include_usage) or every one (continuous_usage_stats)
    debug: dict | None = None  # extension: lifecycle stage timings when the request asked


class _Choice(_Out):
    keep_null = ("finish_reason", "logprobs")
    index: int = 0
    finish_reason: str | None = None  # "stop" | "length"; None until the last stream chunk
    logprobs: None = None


class CompletionChoice(_Choice):
    text: str  # the whole text, or in a stream chunk the delta


class CompletionResponse(_Envelope):
    id: str = _id("cmpl")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamChunk(_Envelope):
    """OpenAI streams completions under the same object name as the full response."""

    id: str = _id("cmpl")
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(_Out):
    keep_null = ("content",)
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Envelope):
    id: str = _id("chatcmpl")
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None  # only in the first chunk
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Envelope):
    id: str = _id("chatcmpl")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: Created
    owned_by: str = "omniray"
    max_model_len: int | None = None  # vLLM's: prompt + max_tokens may not exceed it


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (see error_body); for the OpenAPI document."""

    error: ErrorDetail


class VersionResponse(BaseModel):
    version: str


# ---- vLLM's tokenizer endpoints ------------------------------------------------------------


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a text. `model` may be left out (lm-eval does)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with chat messages: the ids of the chat template, as a chat completion's prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message left open, for the model to go on with
    add_special_tokens: bool = False  # vLLM's default: the template holds the special tokens
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # only when return_token_strs


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(_Out):
    prompt: str


class TokenizerInfoResponse(_Out):
    """GET /tokenizer_info: what a client needs to tokenize and template as the server
    does (lm-eval's remote tokenizer reads the special tokens and the chat template)."""

    tokenizer_class: str
    name_or_path: str
    model_max_length: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str  # Jinja, rendered with `messages` and `add_generation_prompt`


# ---- server-sent events ---------------------------------------------------------------

SSE_DONE = "data: [DONE]\n\n"


def sse(data: BaseModel | dict) -> str:
    """One server-sent event; models are dumped with exclude_none (OpenAI's nulls are kept, see _Out)."""
    body = data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


# ---- admin: ElasticMoE and Omni Placement (need an admin key) -----------------------------


class ScaleRequest(BaseModel):
    """POST /v1/cluster/scale: exactly one of {instance + npus}, add_instance, remove_instance."""

    model_config = ConfigDict(extra="forbid")

    instance: str | None = None
    npus: int | None = Field(None, gt=0, le=1024)  # the instance's new EP size (or the added instance's)
    add_instance: Literal["prefill", "decode", "mixed"] | None = None  # a role
    remove_instance: str | None = None

    @model_validator(mode="after")
    def _one_action(self) -> "ScaleRequest":
        resize = self.instance is not None
        chosen = [resize, self.add_instance is not None, self.remove_instance is not None]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of instance (with npus), add_instance, remove_instance")
        if resize and self.npus is None:
            raise ValueError("npus: required with instance")
        return self


class RebalanceRequest(BaseModel):
    """POST /v1/cluster/rebalance: recompute the expert maps from the measured load."""

    model_config = ConfigDict(extra="forbid")

    instance: str | None = None  # None: every instance
