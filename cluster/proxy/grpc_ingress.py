"""The gRPC face of the slaves: GenerateRequest <-> the OpenAI request models,
and API errors <-> gRPC status codes. The slave's `Generate` and `ListModels`
methods (cluster.proxy.app) are what Ray Serve's gRPC proxy calls; their
servicer is SERVICER, generated from omniray.proto."""

from __future__ import annotations

import grpc

from cluster.proxy import omniray_pb2 as pb
from cluster.proxy.protocol import APIError, ChatCompletionRequest, CompletionRequest

SERVICER = "cluster.proxy.omniray_pb2_grpc.add_OmniRayServicer_to_server"

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def to_openai(request: pb.GenerateRequest) -> tuple[type, dict]:
    """The request model (chat if `messages` is set) and its fields, to validate
    exactly as the HTTP API does."""
    body: dict = {"model": request.model, "ignore_eos": request.ignore_eos}
    for name in _OPTIONAL:
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.messages:
        if request.prompt or request.prompt_token_ids:
            raise APIError(400, "give messages or a prompt, not both", "invalid_request_error", "messages")
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        return ChatCompletionRequest, body
    if request.prompt and request.prompt_token_ids:
        raise APIError(400, "give prompt or prompt_token_ids, not both", "invalid_request_error", "prompt")
    body["prompt"] = list(request.prompt_token_ids) or request.prompt
    return CompletionRequest, body


def chunk(delta) -> pb.GenerateChunk:
    return pb.GenerateChunk(text=delta.text, finish_reason=delta.finish_reason or "",
                            prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)


def fail(context, err: APIError) -> None:
    """Set the API error's status code and message on the call's context (the
    caller then raises: Ray Serve answers a raised error with the code set)."""
    context.set_code(STATUS.get(err.status, grpc.StatusCode.INTERNAL))
    context.set_details(err.message)


def metadata(context, key: str) -> str:
    """A request metadata value ("" when absent or outside a gRPC call)."""
    return dict(context.invocation_metadata()).get(key, "") if context is not None else ""
