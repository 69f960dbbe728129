"""The Serve application: the Omni Proxy slaves (FastAPI ingress replicas).

A slave validates a request, renders the chat template, tokenizes once
(reusing cached results), asks the master where the request runs, streams the
engines' tokens back as text, and answers every error in OpenAI's error JSON
with the right status. Builder: `build_app(manifest)`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from cluster.config import Manifest
from cluster.proxy.lifecycle import Lifecycle
from cluster.proxy.master import MASTER_NAME
from cluster.proxy.pipeline import Pipeline
from cluster.proxy.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    ModelCard,
    ModelList,
    error_body,
    from_validation_error,
    sse,
    to_sampling,
)
from cluster.proxy.tokens import TokenCache, Tokenizer

api = FastAPI(title="OmniRay", description="OpenAI-compatible API of the Omni Proxy")


@api.exception_handler(APIError)
async def _api_error(_request, exc: APIError):
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class OmniProxySlave:
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.model_name = manifest.model.name
        self.settings = manifest.proxy
        self.tokenizer = Tokenizer.from_file(manifest.tokenizer)
        self.tokens = TokenCache(self.tokenizer, self.settings.tokenizer_cache_size, self.settings.tokenizer_reuse)
        self.master = ray.get_actor(MASTER_NAME)
        self.pipeline = Pipeline(self.tokenizer, self.master, manifest.engine.block_size)
        self.created = int(time.time())

    # ---- checks -------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    async def _parse(self, request: Request, model_cls):
        self._authorize(request)
        ctype = request.headers.get("content-type", "")
        if "application/json" not in ctype:
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'}", "invalid_request_error")
        if int(request.headers.get("content-length") or 0) > self.settings.max_body_bytes:
            raise APIError(413, f"request body over {self.settings.max_body_bytes} bytes", "invalid_request_error")
        raw = await request.body()
        if len(raw) > self.settings.max_body_bytes:
            raise APIError(413, f"request body over {self.settings.max_body_bytes} bytes", "invalid_request_error")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"body is not valid JSON: {err}", "invalid_request_error") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object", "invalid_request_error")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err) from None
        if req.model != self.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")
        return req

    def _prompt_ids(self, prompt: str | list[int], max_tokens: int, life: Lifecycle) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokens.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < self.manifest.model.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary", "invalid_request_error", "prompt")
            ids = list(prompt)
        life.stamp("tokenized")
        if not ids:
            raise APIError(400, "prompt: empty prompt", "invalid_request_error", "prompt")
        limit = self.manifest.model.max_position_embeddings
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                           f"and max_tokens asks for {max_tokens}", "invalid_request_error", "max_tokens",
                           "context_length_exceeded")
        return ids

    async def _generate(self, ids, sampling, stops, life):
        try:
            async for delta in self.pipeline.run(ids, sampling, stops, life):
                yield delta
        except OverflowError as err:  # the master's queue is full
            raise APIError(429, f"server overloaded: {err}", "rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    # ---- endpoints ------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        life = Lifecycle("completion")
        life.stamp("received")
        req = await self._parse(request, CompletionRequest)
        sampling = to_sampling(req)
        ids = self._prompt_ids(req.prompt, sampling["max_tokens"], life)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gen = self._generate(ids, sampling, sampling["stop"], life)
        if req.stream:
            first = await _first(gen)  # errors before the first byte still get a status code

            async def events():
                last = None
                async for d in _chain(first, gen):
                    last = d
                    yield sse(CompletionStreamChunk(id=rid, created=created, model=self.model_name, choices=[
                        {"index": 0, "text": d.text, "finish_reason": d.finish_reason, "logprobs": None}]))
                if req.stream_options and req.stream_options.include_usage and last:
                    yield sse(CompletionStreamChunk(id=rid, created=created, model=self.model_name, choices=[],
                                                    usage=_usage(last)))
                yield SSE_DONE

            return StreamingResponse(events(), media_type="text/event-stream")
        text, last = "", None
        async for d in gen:
            text, last = text + d.text, d
        body = CompletionResponse(id=rid, created=created, model=self.model_name, usage=_usage(last), choices=[
            {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}])
        if req.debug:
            body.debug = life.to_debug()
        return JSONResponse(body.model_dump(exclude_none=True) | {"choices": [c.model_dump() for c in body.choices]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        life = Lifecycle("chat")
        life.stamp("received")
        req = await self._parse(request, ChatCompletionRequest)
        sampling = to_sampling(req)
        try:
            prompt = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages])
        except ValueError as err:
            raise APIError(400, f"messages: {err}", "invalid_request_error", "messages") from None
        ids = self._prompt_ids(prompt, sampling["max_tokens"], life)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen = self._generate(ids, sampling, sampling["stop"], life)
        if req.stream:
            first = await _first(gen)

            async def events():
                yield sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
                last = None
                async for d in _chain(first, gen):
                    last = d
                    yield sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[
                        {"index": 0, "delta": {"content": d.text}, "finish_reason": d.finish_reason}]))
                if req.stream_options and req.stream_options.include_usage and last:
                    yield sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                                  usage=_usage(last)))
                yield SSE_DONE

            return StreamingResponse(events(), media_type="text/event-stream")
        text, last = "", None
        async for d in gen:
            text, last = text + d.text, d
        body = ChatCompletionResponse(id=rid, created=created, model=self.model_name, usage=_usage(last), choices=[
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason,
             "logprobs": None}])
        if req.debug:
            body.debug = life.to_debug()
        return JSONResponse(body.model_dump(exclude_none=True) | {"choices": [c.model_dump() for c in body.choices]})

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)]).model_dump()

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/v1/cluster")
    async def cluster(self, request: Request):
        self._authorize(request)
        snap = await self.master.snapshot.remote()
        try:
            from actors.kv_cache import KV_CACHE_NAME

            snap["kv_cache"] = await ray.get_actor(KV_CACHE_NAME).stats.remote()
        except ValueError:
            snap["kv_cache"] = None
        snap["model"] = self.model_name
        snap["tokenizer"] = self.tokens.stats()
        return snap


def _usage(d) -> dict:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


async def _first(gen):
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
    async for d in gen:
        yield d


def build_app(manifest: Manifest):
    """The Serve application of the slaves; the master and instances must be up."""
    return OmniProxySlave.options(num_replicas=manifest.proxy.num_slaves).bind(manifest)
