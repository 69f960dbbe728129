"""The Serve application: the Omni Proxy slaves (FastAPI ingress replicas).

A slave validates a request, renders the chat template, tokenizes once
(reusing cached results), asks the master where the request runs, streams the
engines' tokens back as text, and answers every error in OpenAI's error JSON
with the right status. Beside OpenAI's routes it serves vLLM's (/tokenize,
/detokenize, /tokenizer_info, /version) and its own Prometheus /metrics; the
OpenAPI document is cluster.proxy.openapi's. Builder: `build_app(manifest)`.
"""


import asyncio
import hmac
import logging
import time

import ray
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from pydantic_core import from_json
from ray import serve
from starlette.exceptions import HTTPException

from actors.engine import guided
from cluster.config import Manifest
from cluster.metrics import ProxyMetrics
from cluster.proxy import grpc_ingress, omniray_pb2
from cluster.proxy.lifecycle import Lifecycle
from cluster.proxy.master import MASTER_NAME, NoInstanceAvailable, fetch_published
from cluster.proxy.openapi import BODY_ERRORS, answers, install, json_body, package_version
from cluster.proxy.choices import Echo, drop_generated, merge
from cluster.proxy.pipeline import Pipeline
from cluster.proxy.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    RebalanceRequest,
    ScaleRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizerInfoResponse,
    TokenizeResponse,
    VersionResponse,
    error_body,
    from_validation_error,
    remote_message,
    to_sampling,
    unknown_model,
)
from cluster.proxy.responses import (
    CHAT,
    COMPLETION,
    ResponseKind,
    Shape,
    collect,
    first_then_rest,
    stream,
)
from cluster.proxy.token_cache import TokenCache
from cluster.proxy.tokens import CHAT_TEMPLATE, Tokenizer

logger = logging.getLogger(__name__)

SNAPSHOT_POLL_S = 0.2  # how often a slave reads the master's published state
SNAPSHOT_READ_TIMEOUT_S = 2.0  # one read (ask for the ref, fetch it): a stuck one must not stop the polling

api = FastAPI(title="OmniRay", description="OpenAI-compatible API of the Omni Proxy", version=package_version())
install(api)  # the request bodies and error statuses the routes document (cluster.proxy.openapi)
GENERATION_ERRORS = (*BODY_ERRORS, 429, 503, 504)  # and what scheduling and generating may answer
STREAM_DESCRIPTION = "The response; with `stream: true`, server-sent events (text/event-stream) of its chunks"


@api.exception_handler(APIError)
async def _api_error(_request, exc: APIError):
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request, exc: RequestValidationError):
    return await _api_error(_request, from_validation_error(exc))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """Routing's own errors (no such path, a method the path does not take) in OpenAI's
    error JSON too, as OpenAI answers them: an OpenAI client raises its error class."""
    where = f"{request.method} {request.url.path}"
    message = {404: f"Invalid URL ({where})", 405: f"Method not allowed ({where})"}.get(exc.status_code, str(exc.detail))
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return await _api_error(request, APIError(exc.status_code, message, kind, headers=exc.headers))


# Serve copies the ingress class when it is decorated: helpers the methods call must be
# imported from other modules (or defined above), not defined below it in this file.
# a stopping slave checks for requests still in flight every 0.25 s, not Serve's 2 s: an
# idle one (a scale-down, a redeploy) goes at once; busy ones still get the full timeout
@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.25)
@serve.ingress(api)
class OmniProxySlave:
    def __init__(self, manifest: Manifest, namespace: str):
        self.manifest, self.namespace = manifest, namespace  # where the master and caches live (not Serve's)
        self.model_name = manifest.model.name
        self.max_model_len = manifest.model.max_position_embeddings  # prompt + max_tokens, at most
        self.settings = manifest.proxy
        self.tokenizer = Tokenizer.from_file(manifest.tokenizer)
        self.tokens = TokenCache(self.tokenizer, self.settings.tokenizer_cache_size, self.settings.tokenizer_reuse,
                                 self.settings.tokenizer_cache_bytes)  # its thread also hashes the prompts' blocks
        self.master = ray.get_actor(MASTER_NAME, namespace=namespace)
        self.metrics = ProxyMetrics(self.model_name)
        self.pipeline = Pipeline(self.tokenizer, self.master, manifest.engine.block_size, self._request_done,
                                 self.tokens.thread)
        self.created = int(time.time())
        self.snapshot: dict | None = None  # the master's latest published state
        self._poller: asyncio.Task | None = None

    def _request_done(self, life: Lifecycle, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.request_done(life, outcome, prompt_tokens, completion_tokens)
        self.metrics.tokenizer(self.tokens.stats())
        if life.ttft_s is not None:  # the autoscaler's SLO signal (fire and forget)
            self.master.observe.remote(life.ttft_s, life.tpot_s(completion_tokens))

    # ---- the master's published state -------------------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_snapshot())

    async def _poll_snapshot(self) -> None:
        """Read the master's snapshot from the object store every SNAPSHOT_POLL_S, not
        per request. While the master restarts the last snapshot stays in use."""
        while True:
            try:
                await self._read_snapshot()
            except Exception:  # an unexpected error must not leave the snapshot stale for good
                logger.exception("slave: reading the master's snapshot failed")
            await asyncio.sleep(SNAPSHOT_POLL_S)

    async def _read_snapshot(self) -> None:
        snap = await fetch_published(self.master, SNAPSHOT_READ_TIMEOUT_S)
        if snap is not None:
            self.snapshot = snap

    # ---- checks -------------------------------------------------------------------
    def _authorize(self, auth: str) -> None:
        """`auth`: the Authorization header (HTTP) or metadata value (gRPC)."""
        keys = self.settings.api_keys
        if not keys:
            return
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    def _authorize_admin(self, auth: str) -> None:
        """Admin endpoints take only an admin key; with none configured they are off."""
        keys = self.settings.admin_keys
        if not keys:
            raise APIError(403, "admin endpoints are off: start the server with --admin-key (or proxy.admin_keys)",
                           "permission_error", code="admin_disabled")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise APIError(401, "invalid or missing admin key (Authorization: Bearer <admin key>)",
                           "authentication_error", code="invalid_api_key")

    async def _parse(self, request: Request, model_cls, admin: bool = False):
        return self._validate(await self._json_body(request, admin), model_cls)

    async def _json_body(self, request: Request, admin: bool = False) -> dict:
        """The request's JSON object, once the key, the content type and the size are checked."""
        (self._authorize_admin if admin else self._authorize)(request.headers.get("authorization", ""))
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype:
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'}", "invalid_request_error")
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"request body over {limit} bytes (proxy.max_body_bytes)", "invalid_request_error")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        raw = bytearray()  # counted as it arrives: a chunked body has no Content-Length to check first
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise too_large
        try:  # pydantic's parser, not json's: it refuses lone surrogates (no tokenizer takes them), nesting
            data = from_json(bytes(raw))  # deeper than 200 and integers past 4300 digits with a ValueError
        except ValueError as err:
            raise APIError(400, f"body is not valid JSON: {err}", "invalid_request_error") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object", "invalid_request_error")
        return data

    def _validate(self, data: dict, model_cls):
        try:
            req = model_cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err) from None
        if getattr(req, "model", None) not in (None, self.model_name):  # None: the tokenizer routes may leave it out
            raise unknown_model(req.model, self.model_name)
        return req

    async def _prompt_ids(self, prompt: str | list[int], max_tokens: int, life: Lifecycle) -> list[int]:
        if isinstance(prompt, str):
            ids = await self.tokens.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < self.manifest.model.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary", "invalid_request_error", "prompt")
            ids = list(prompt)
        life.stamp("tokenized")
        if not ids:
            raise APIError(400, "prompt: empty prompt", "invalid_request_error", "prompt")
        limit = self.max_model_len
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                           f"and max_tokens asks for {max_tokens}", "invalid_request_error", "max_tokens",
                           "context_length_exceeded")
        return ids

    async def _generate(self, ids, sampling, stops, life):
        self._ensure_poller()
        limit = self.settings.request_timeout_s
        deltas = self.pipeline.run(ids, sampling, stops, life)
        deadline = asyncio.get_running_loop().time() + (limit or 0)
        try:
            while True:
                try:
                    if limit:  # cancelling the pipeline's step runs its cleanup: queue entry and KV freed
                        left = max(0.0, deadline - asyncio.get_running_loop().time())
                        delta = await asyncio.wait_for(deltas.__anext__(), left)
                    else:
                        delta = await deltas.__anext__()
                except StopAsyncIteration:
                    return
                yield delta
        except asyncio.TimeoutError:
            raise APIError(504, f"request timed out after {limit} s (proxy.request_timeout_s)", "timeout",
                           code="request_timeout") from None
        except OverflowError as err:  # the master's queue is full
            raise APIError(429, f"server overloaded: {remote_message(err)}", "rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except NoInstanceAvailable as err:
            raise APIError(503, f"no capacity: {remote_message(err)}", "service_unavailable",
                           headers={"Retry-After": "5"}) from None

    async def _start(self, req, life: Lifecycle):
        """Tokenize a validated request and start generating; errors up to the first
        token are raised here (so they still get a status code). A list of prompts
        runs as that many requests side by side (cluster.proxy.choices.merge)."""
        sampling = to_sampling(req)
        if sampling["guide"] is not None:
            try:
                guided.validate(sampling["guide"])
            except ValueError as err:
                raise APIError(400, str(err), "invalid_request_error", "response_format") from None
        chat = isinstance(req, ChatCompletionRequest)
        prompts = [await self._chat_prompt(req)] if chat else req.prompts()
        # side by side, so that a list of prompts reaches the tokenizer thread as one batch
        ids = list(await asyncio.gather(*(self._prompt_ids(p, sampling["max_tokens"], life) for p in prompts)))
        lives = [life] + [life.copy() for _ in ids[1:]]  # the first prompt's is the one debug shows
        runs = [self._generate(p, sampling, sampling["stop"], lf) for p, lf in zip(ids, lives)]
        deltas = merge(runs, sampling["n"])
        if req.max_tokens == 0:
            deltas = drop_generated(deltas)
        if getattr(req, "echo", False):
            texts = [p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
            deltas = Echo(texts, ids, sampling["n"], sampling["logprobs"] is not None).apply(deltas)
        return await first_then_rest(deltas)

    def _shape(self, req, kind: ResponseKind) -> Shape:
        asked = req.logprobs_asked()
        n = max(req.n, getattr(req, "best_of", None) or 1)
        return Shape(kind, self.model_name, n, req.n, self._token_text if asked is not None else None)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- endpoints ------------------------------------------------------------------
    async def _respond(self, request: Request, model_cls, kind: ResponseKind):
        """Shared by both completion endpoints: validate, tokenize, generate, answer
        (one JSON body, or server-sent events)."""
        life = Lifecycle(kind.id_prefix)
        life.stamp("received")
        try:
            req = await self._parse(request, model_cls)
            deltas = await self._start(req, life)
        except APIError as err:
            self.metrics.rejected(err.status)
            raise
        shape = self._shape(req, kind)
        if req.stream:
            opts = req.stream_options
            return StreamingResponse(stream(shape, deltas, bool(opts and opts.include_usage),
                                            bool(opts and opts.continuous_usage_stats)),
                                     media_type="text/event-stream")
        return await collect(shape, deltas, life.to_debug if req.debug else None)

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The chat template's ids, tokenized message by message (a re-sent history hits the cache)."""
        return await self.tokens.encode_segments(self._chat_segments(req.messages))

    def _chat_segments(self, messages, **template) -> list[str]:
        try:
            return self.tokenizer.chat_segments([{"role": m.role, "content": m.content} for m in messages], **template)
        except ValueError as err:
            raise APIError(400, f"messages: {err}", "invalid_request_error", "messages") from None

    @api.post("/v1/completions", openapi_extra=json_body(CompletionRequest),
              responses=answers(CompletionResponse, *GENERATION_ERRORS, ok_description=STREAM_DESCRIPTION))
    async def completions(self, request: Request):
        return await self._respond(request, CompletionRequest, COMPLETION)

    @api.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
              responses=answers(ChatCompletionResponse, *GENERATION_ERRORS, ok_description=STREAM_DESCRIPTION))
    async def chat_completions(self, request: Request):
        return await self._respond(request, ChatCompletionRequest, CHAT)

    # ---- vLLM's tokenizer endpoints (what lm-eval's remote tokenizer calls) ------------------
    @api.post("/tokenize", openapi_extra=json_body(TokenizeCompletionRequest, TokenizeChatRequest),
              responses=answers(TokenizeResponse, *BODY_ERRORS))
    async def tokenize(self, request: Request):
        """A text's ids, or a chat's (its template applied) as a chat completion would prompt with them."""
        data = await self._json_body(request)
        req = self._validate(data, TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest)
        if isinstance(req, TokenizeChatRequest):
            text = "".join(self._chat_segments(req.messages, add_generation_prompt=req.add_generation_prompt,
                                               continue_final_message=req.continue_final_message))
        else:
            text = req.prompt
        ids = (await self.tokens.thread.encode_batch([text], req.add_special_tokens))[0]  # off the event loop
        strs = [self.tokenizer.hf.id_to_token(i) for i in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                token_strs=strs).model_dump(exclude_none=True)

    @api.post("/detokenize", openapi_extra=json_body(DetokenizeRequest),
              responses=answers(DetokenizeResponse, *BODY_ERRORS))
    async def detokenize(self, request: Request):
        """The text of token ids, special tokens included (so that /tokenize of it gives them back)."""
        req = await self._parse(request, DetokenizeRequest)
        vocab = self.manifest.model.vocab_size
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} outside the vocabulary ({vocab})", "invalid_request_error",
                           "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False)).model_dump()

    @api.get("/tokenizer_info", responses=answers(TokenizerInfoResponse, 401))
    async def tokenizer_info(self, request: Request):
        """The special tokens and the chat template (Jinja), as in a Hugging Face tokenizer_config.json."""
        self._authorize(request.headers.get("authorization", ""))
        return TokenizerInfoResponse(tokenizer_class="PreTrainedTokenizerFast", name_or_path=self.model_name,
                                     model_max_length=self.max_model_len, chat_template=CHAT_TEMPLATE,
                                     **self.tokenizer.special_tokens()).model_dump()

    # ---- gRPC (Ray Serve's gRPC proxy calls these by the proto's method names) -----------
    async def Generate(self, request, grpc_context=None):
        """Server-streaming generation: one GenerateChunk per text delta."""
        life = Lifecycle("grpc")
        life.stamp("received")
        try:  # the key first, then the size, then the message (`request` is its bytes: grpc_ingress)
            self._authorize(grpc_ingress.metadata(grpc_context, "authorization"))
            message = grpc_ingress.parse(request, omniray_pb2.GenerateRequest, self.settings.max_body_bytes)
            model_cls, body = grpc_ingress.to_openai(message)
            deltas = await self._start(self._validate(body, model_cls), life)
            async for d in deltas:
                yield grpc_ingress.chunk(d)
        except APIError as err:
            self.metrics.rejected(err.status)
            grpc_ingress.fail(grpc_context, err)
            raise  # Serve answers with the code set on the context

    async def ListModels(self, request, grpc_context=None):
        try:
            self._authorize(grpc_ingress.metadata(grpc_context, "authorization"))
            grpc_ingress.parse(request, omniray_pb2.ListModelsRequest, self.settings.max_body_bytes)
        except APIError as err:
            grpc_ingress.fail(grpc_context, err)
            raise
        return omniray_pb2.ListModelsResponse(models=[self.model_name])

    # ---- HTTP: the rest ------------------------------------------------------------------
    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    @api.get("/v1/models", responses=answers(ModelList, 401))
    async def models(self, request: Request):
        self._authorize(request.headers.get("authorization", ""))
        return ModelList(data=[self._model_card()]).model_dump()

    @api.get("/v1/models/{model:path}", responses=answers(ModelCard, 401, 404))
    async def model(self, model: str, request: Request):
        """OpenAI's retrieve-model (`client.models.retrieve`); model ids may hold slashes."""
        self._authorize(request.headers.get("authorization", ""))
        if model != self.model_name:
            raise unknown_model(model, self.model_name)
        return self._model_card().model_dump()

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/version", responses=answers(VersionResponse, 401))
    async def version(self, request: Request):
        self._authorize(request.headers.get("authorization", ""))
        return VersionResponse(version=package_version()).model_dump()

    @api.get("/metrics", response_class=Response,
             responses={200: {"description": "This slave's metrics (cluster.metrics.ProxyMetrics) in Prometheus' "
                                             "text format", "content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus(self):
        """No key needed (as vLLM's): request counts, latencies and tokens of this slave,
        nothing about the cluster. Every actor's metrics: Ray's metrics export."""
        self.metrics.tokenizer(self.tokens.stats())
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/cluster", responses=answers(None, 401, 503))
    async def cluster(self, request: Request):
        self._authorize(request.headers.get("authorization", ""))
        self._ensure_poller()
        if self.snapshot is None:
            await self._read_snapshot()
        if self.snapshot is None:
            raise APIError(503, "the master has not published its state yet", "service_unavailable",
                           headers={"Retry-After": "1"})
        snap = dict(self.snapshot, age_s=max(0.0, time.time() - self.snapshot["time"]))
        try:
            from actors.kv_cache import KV_CACHE_NAME

            snap["kv_cache"] = await ray.get_actor(KV_CACHE_NAME, namespace=self.namespace).stats.remote()
        except ValueError:
            snap["kv_cache"] = None
        snap["elastic"] = await self._elastic_view()
        snap["model"] = self.model_name
        snap["tokenizer"] = self.tokens.stats()
        return snap

    async def _elastic_view(self) -> dict | None:
        """The cluster controller's NPUs outside the instances' current sets: its
        standby pool, and per instance its reserve (NPUs a scale-down released
        inside the instance's placement group). None without a controller."""
        try:
            return await self._controller().elastic_view.remote()
        except (APIError, ray.exceptions.RayActorError):  # none, or it died (its name is not freed at once)
            return None


    # ---- admin: ElasticMoE and Omni Placement --------------------------------------------------
    @api.post("/v1/cluster/scale", openapi_extra=json_body(ScaleRequest),
              responses=answers(None, 400, 401, 403, 413, 415, 500, 503))
    async def scale(self, request: Request):
        """Resize an instance's EP, add an instance of a role, or drain and remove one."""
        req = await self._parse(request, ScaleRequest, admin=True)
        ctl = self._controller()
        if req.instance is not None:
            call = ctl.scale.remote(req.instance, req.npus)
        elif req.add_instance is not None:
            call = ctl.add_instance.remote(req.add_instance, req.npus)
        else:
            call = ctl.remove_instance.remote(req.remove_instance)
        return await self._admin_call(call)

    @api.post("/v1/cluster/rebalance", openapi_extra=json_body(RebalanceRequest),
              responses=answers(None, 400, 401, 403, 413, 415, 500, 503))
    async def rebalance(self, request: Request):
        """Omni Placement: new expert maps from the measured expert load."""
        req = await self._parse(request, RebalanceRequest, admin=True)
        return await self._admin_call(self._controller().rebalance.remote(req.instance))

    def _controller(self):
        from cluster.controller import CONTROLLER_NAME

        try:
            return ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
        except ValueError:
            raise APIError(503, "no cluster controller is running", "service_unavailable",
                           headers={"Retry-After": "5"}) from None

    @staticmethod
    async def _admin_call(call):
        try:
            return await call
        except ValueError as err:  # ScalingError: the message names the field
            raise APIError(400, remote_message(err), "invalid_request_error") from None
        except ray.exceptions.RayError as err:
            raise APIError(500, f"scaling failed: {remote_message(err)}", "server_error") from None


def build_app(manifest: Manifest, namespace: str):
    """The Serve application of the slaves; the master and instances must be up in
    Ray namespace `namespace` (Serve's replicas run in their own)."""
    scaling = manifest.proxy.autoscaling
    options = {"autoscaling_config": scaling.model_dump()} if scaling else {"num_replicas": manifest.proxy.num_slaves}
    options["max_ongoing_requests"] = manifest.proxy.max_ongoing_requests
    return OmniProxySlave.options(**options).bind(manifest, namespace)

