"""The gRPC face of the slaves: GenerateRequest <-> the OpenAI request models,
and API errors <-> gRPC status codes. The slave's `Generate` and `ListModels`
methods (cluster.proxy.app) are what Ray Serve's gRPC proxy calls; their
servicer is SERVICER (omniray.proto's service, taking its requests as bytes).

Ray Serve's gRPC proxy has no message size limit of its own (gRPCOptions has
none; 2 GiB), and it would parse a request before the slave sees the call. So
the servicer hands the slave the request's bytes, and the slave checks the key,
then the size (`proxy.max_body_bytes`, as for HTTP bodies), then parses."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from cluster.proxy import omniray_pb2 as pb
from cluster.proxy.protocol import APIError, ChatCompletionRequest, CompletionRequest

SERVICER = "cluster.proxy.grpc_ingress.add_servicer"

STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def add_servicer(servicer, server) -> None:
    """Register omniray.proto's service (as its generated add_OmniRayServicer_to_server
    does) with no request deserializer: the methods receive the request's bytes."""
    service = pb.DESCRIPTOR.services_by_name["OmniRay"].full_name
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, response_serializer=pb.GenerateChunk.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def parse(raw: bytes, message_cls, max_bytes: int):
    """A request message from its bytes: over `max_bytes` a 413, unparsable a 400."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request message over {max_bytes} bytes (proxy.max_body_bytes)", "invalid_request_error")
    try:
        return message_cls.FromString(raw)
    except (DecodeError, ValueError, TypeError) as err:
        raise APIError(400, f"request is not a valid {message_cls.DESCRIPTOR.full_name}: {err}",
                       "invalid_request_error") from None

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
