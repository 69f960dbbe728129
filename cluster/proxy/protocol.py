"""OpenAI API schema of the Omni Proxy: requests, responses, errors, SSE framing.

Requests are strict (`extra="forbid"`): a field this server does not know, or an
OpenAI feature it does not implement (`suffix`, tool calls), is a 400 naming the
field rather than being silently ignored, because a client that asks for
something and gets none would be wrong without knowing it. A JSON `null` for a
field with a default means "the default", as it does for OpenAI. The sampling
options follow vLLM's semantics (actors.model.sampler).

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

from actors.engine.guided import GuideSpec
from cluster.validation import field_errors

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit)

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


MAX_N = 16  # choices per prompt (n, best_of)


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="forbid")

    class JSONSchema(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        name: str = "response"
        description: str | None = None
        schema_: dict[str, Any] = Field(alias="schema")
        strict: bool | None = None

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


class _Request(BaseModel):
    """Sampling fields shared by completions and chat; OpenAI's defaults, plus vLLM's extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension: 0 or -1 (vLLM's spelling) = off
    min_p: float = Field(0.0, ge=0.0, le=0.0)  # extension: only off (0) is served
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=4)  # "" would match anywhere
    stop_token_ids: list[int] = Field(default_factory=list)  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = None
    debug: bool = False  # extension: lifecycle stage timings in the response
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # extension (vLLM)
    logit_bias: dict[str, float] = Field(default_factory=dict)  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int = Field(0, ge=0)  # extension (vLLM): no EOS or stop token before this many
    response_format: ResponseFormat | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # extension (vLLM)

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

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, v: int) -> int:
        return 0 if v == -1 else v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float]) -> dict[str, float]:
        for token, bias in v.items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"keys are token ids (got {token!r})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {token}: a bias is in [-100, 100] (got {bias})")
        return v

    def logprobs_asked(self) -> int | None:
        """The number of alternatives per generated token, None when no logprobs."""
        raise NotImplementedError


class CompletionRequest(_Request):
    """POST /v1/completions: one prompt or a list of them (strings or token lists), n choices each."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0)  # 0: only with echo (the prompt's logprobs)
    echo: bool = Field(False, validate_default=True)  # the prompt first (with its logprobs when logprobs are asked)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # the n of best_of choices with the highest logprob
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("empty list of prompts")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("a token-list prompt is empty")
        if not isinstance(v, (str, list)):
            raise ValueError("prompt must be a string, a list of token ids, or a list of either")  # noqa: TRY004
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("insertion (a suffix after the completion) is not served: the models have no "
                             "fill-in-the-middle training")
        return v

    @field_validator("echo")
    @classmethod
    def _echo_only(cls, v: bool, info: ValidationInfo) -> bool:
        if not v and info.data.get("max_tokens") == 0:
            raise ValueError("max_tokens 0 generates nothing: it needs echo (the prompt, with its logprobs)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v < n:
            raise ValueError(f"best_of ({v}) must be at least n ({n})")
        if v is not None and v > n and info.data.get("stream"):
            raise ValueError("best_of > n cannot be streamed (the best choices are known at the end)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, a single one as a list of one."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def logprobs_asked(self) -> int | None:
        return self.logprobs


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

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (needs logprobs)

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
    """What an engine needs of a request, with defaults filled and `stop` always a list.

    `n` is the choices the engine generates per prompt (best_of when larger); a
    completion with echo and logprobs asks for the prompt's logprobs too, with
    the same number of alternatives; `max_tokens` 0 (echo only) generates one
    token, which the answer drops."""
    logprobs = req.logprobs_asked()
    echo = getattr(req, "echo", False)
    prompt_logprobs = req.prompt_logprobs
    if echo and logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, logprobs)
    if (getattr(req, "best_of", None) or 1) > req.n and logprobs is None:
        logprobs = 0  # ranking the choices needs their logprobs
    fmt = req.response_format
    return {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
        "max_tokens": max(req.max_tokens if req.max_tokens is not None else default_max_tokens, 1),
        "stop": list(req.stop or []), "stop_token_ids": list(req.stop_token_ids), "ignore_eos": req.ignore_eos,
        "n": max(req.n, getattr(req, "best_of", None) or 1),
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens,
        "logit_bias": {int(k): v for k, v in req.logit_bias.items()},
        "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
        "guide": GuideSpec.from_response_format(fmt.model_dump(by_alias=True, exclude_none=True)) if fmt else None,
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
    logprobs: dict | None = None  # when asked: the API's logprobs object


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
