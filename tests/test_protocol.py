"""OpenAI schema: what parses, what is a 400 naming the field, and that the openai client parses our JSON."""

import json

import pytest
from fastapi.exceptions import RequestValidationError
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChunk
from pydantic import ValidationError

from cluster.proxy.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    error_body,
    from_validation_error,
    sse,
    to_sampling,
)

pytestmark = pytest.mark.fast

USER = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


PLAIN = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
         "logit_bias": {}, "logprobs": None, "prompt_logprobs": None, "guide": None}


def test_minimal_completion_gets_openai_defaults():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hello"})
    assert to_sampling(req) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None, "max_tokens": 16,
                                "stop": [], "stop_token_ids": [], "ignore_eos": False} | PLAIN
    assert not req.stream and not req.debug and req.n == 1


def test_full_completion():
    req = CompletionRequest.model_validate({
        "model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0, "top_p": 0.9, "top_k": 5, "seed": 7,
        "stop": "\n", "stop_token_ids": [2], "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "n": 1, "logprobs": None, "echo": False, "best_of": 1,
        "logit_bias": {}, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "u",
        "debug": True})
    assert req.prompt == [1, 2, 3] and req.stream_options.include_usage and req.debug
    assert to_sampling(req) == {"temperature": 0.0, "top_p": 0.9, "top_k": 5, "seed": 7, "max_tokens": 8,
                                "stop": ["\n"], "stop_token_ids": [2], "ignore_eos": True} | PLAIN


def test_openai_and_vllm_sampling_options():
    req = CompletionRequest.model_validate({
        "model": "m", "prompt": [[1, 2], [3]], "n": 2, "best_of": 3, "echo": True, "logprobs": 2, "top_k": -1,
        "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2, "min_tokens": 3,
        "logit_bias": {"5": 100, "7": -100}, "max_tokens": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    s = to_sampling(req)
    assert req.prompts() == [[1, 2], [3]] and s["n"] == 3 and s["top_k"] == 0
    assert s["logprobs"] == 2 and s["prompt_logprobs"] == 2  # echo with logprobs: the prompt's too
    assert s["max_tokens"] == 1  # max_tokens 0 (echo): one token runs the prompt; the answer drops it
    assert s["logit_bias"] == {5: 100, 7: -100} and s["min_tokens"] == 3 and s["repetition_penalty"] == 1.2
    assert s["guide"].kind == "json_schema" and json.loads(s["guide"].schema) == {"type": "object"}
    assert to_sampling(CompletionRequest(model="m", prompt="x", best_of=2))["logprobs"] == 0  # best_of ranks by them
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 3,
                                                 "n": 4, "response_format": {"type": "json_object"}})
    s = to_sampling(chat)
    assert s["logprobs"] == 3 and s["n"] == 4 and s["guide"].kind == "json_object" and s["prompt_logprobs"] is None
    assert to_sampling(ChatCompletionRequest(model="m", messages=USER, logprobs=True))["logprobs"] == 0


def test_null_means_default_and_one_element_prompt_list():
    req = CompletionRequest.model_validate({"model": "m", "prompt": ["hi"], "temperature": None, "n": None,
                                            "max_tokens": None, "stop": ["a", "b"]})
    assert req.prompts() == ["hi"] and req.temperature == 1.0 and req.max_tokens == 16 and req.stop == ["a", "b"]


def test_chat_parses_parts_and_max_completion_tokens():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_completion_tokens": 9, "seed": 1, "stream": True,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None}]})
    assert [m.content for m in req.messages] == ["be brief", "ab", "ok"]
    assert to_sampling(req)["max_tokens"] == 9
    same = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "max_tokens": 4,
                                                 "max_completion_tokens": 4})
    assert same.max_tokens == 4
    assert to_sampling(ChatCompletionRequest(model="m", messages=USER))["max_tokens"] == 16
    assert to_sampling(ChatCompletionRequest(model="m", messages=USER), default_max_tokens=99)["max_tokens"] == 99


def _rejects(cls, body) -> APIError:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    err = from_validation_error(info.value)
    assert err.status == 400 and err.type == "invalid_request_error"
    return err


@pytest.mark.parametrize("extra, param, words", [
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"best_of": 1, "n": 2}, "best_of", "at least n"),
    ({"best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"suffix": "x"}, "suffix", "fill-in-the-middle"),
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"foo": 1}, "foo", "unrecognized"),
    ({"max_tokens": 0}, "echo", "needs echo"),
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"min_p": 0.1}, "min_p", "less than or equal to 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["a", ""]}, "stop.1", "at least 1 character"),
    ({"prompt": []}, "prompt", "empty list of prompts"),
    ({"prompt": [[1, 2], []]}, "prompt", "token-list prompt is empty"),
    ({"prompt": 5}, "prompt", "a list of token ids, or a list of either"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "unrecognized"),
])
def test_completion_rejections_name_the_field(extra, param, words):
    err = _rejects(CompletionRequest, {"model": "m", "prompt": "hi"} | extra)
    assert err.param == param
    assert err.message.startswith(f"{param}: ") and words in err.message


def test_missing_fields_are_named():
    err = _rejects(CompletionRequest, {"prompt": "hi"})
    assert err.param == "model" and "model: Field required" in err.message


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role",
     "'system', 'developer', 'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content", "'image_url'"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", "string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages.0.tool_calls", "unrecognized"),
    ({"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools", "tool calling is not served"),
    ({"messages": USER, "tools": [{"type": "function"}], "tool_choice": "auto"}, "tool_choice", "not served"),
    ({"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "not served"),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions", "function_call \"none\""),
    ({"messages": USER, "function_call": {"name": "f"}}, "function_call", "not served"),
    ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice", 'only tool_choice "none"'),
    ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
])
def test_chat_rejections_name_the_field(body, param, words):
    err = _rejects(ChatCompletionRequest, {"model": "m"} | body)
    assert err.param == param and words in err.message, err.message


def test_fastapi_body_prefix_is_dropped():
    errors = [{"type": "greater_than_equal", "loc": ("body", "max_tokens"), "msg": "Input should be greater than or "
               "equal to 1", "input": 0}]
    err = from_validation_error(RequestValidationError(errors))
    assert err.param == "max_tokens" and err.message == "max_tokens: Input should be greater than or equal to 1"


def test_error_body_is_openai_shape():
    err = APIError(429, "busy", "rate_limit_exceeded", headers={"Retry-After": "1"})
    assert error_body(err) == {"error": {"message": "busy", "type": "rate_limit_exceeded", "param": None,
                                         "code": None}}
    assert err.status == 429 and err.headers == {"Retry-After": "1"} and str(err) == "busy"


def _json(model) -> dict:
    return json.loads(model.model_dump_json(exclude_none=True))


def test_completion_response_parses_with_openai():
    body = CompletionResponse(model="m", usage=USAGE, choices=[{"text": "hi", "finish_reason": "length"}])
    data = _json(body)
    assert data["id"].startswith("cmpl-") and data["choices"][0]["logprobs"] is None and "debug" not in data
    out = Completion.model_validate(data)
    assert out.choices[0].text == "hi" and out.usage.total_tokens == 5
    body.debug = {"stages": {"queued": 0.001}}
    assert body.model_dump(exclude_none=True)["debug"] == {"stages": {"queued": 0.001}}


def test_completion_stream_chunks():
    mid = _json(CompletionStreamChunk(id="cmpl-1", model="m", choices=[{"text": "a"}]))
    assert mid["choices"][0]["finish_reason"] is None and "finish_reason" in mid["choices"][0]
    assert "usage" not in mid and mid["object"] == "text_completion"
    last = CompletionStreamChunk(id="cmpl-1", model="m", choices=[{"text": "b", "finish_reason": "stop"}])
    assert Completion.model_validate(_json(last)).choices[0].finish_reason == "stop"
    usage = _json(CompletionStreamChunk(id="cmpl-1", model="m", choices=[], usage=USAGE))
    assert Completion.model_validate(usage).usage.completion_tokens == 2


def test_chat_response_and_chunks_parse_with_openai():
    body = _json(ChatCompletionResponse(model="m", usage=USAGE, choices=[
        {"message": {"content": "yo"}, "finish_reason": "stop"}]))
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["logprobs"] is None and "logprobs" in body["choices"][0]
    out = ChatCompletion.model_validate(body)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == "yo"

    first = _json(ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[{"delta": {"role": "assistant",
                                                                                       "content": ""}}]))
    assert first["choices"][0]["finish_reason"] is None and "finish_reason" in first["choices"][0]
    assert OpenAIChunk.model_validate(first).choices[0].delta.role == "assistant"
    mid = _json(ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[{"delta": {"content": "x"}}]))
    assert mid["choices"][0]["delta"] == {"content": "x"}
    assert OpenAIChunk.model_validate(mid).choices[0].delta.content == "x"
    last = _json(ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[{"delta": {}, "finish_reason": "length"}]))
    assert OpenAIChunk.model_validate(last).choices[0].finish_reason == "length"
    usage = _json(ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[], usage=USAGE))
    assert OpenAIChunk.model_validate(usage).usage.total_tokens == 5


def test_models_list():
    data = ModelList(data=[ModelCard(id="tiny", created=1, max_model_len=64)]).model_dump()
    assert data == {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 1, "owned_by": "omniray",
                                                "max_model_len": 64}]}


def test_sse_framing():
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[{"delta": {"content": "é"}}])
    event = sse(chunk)
    assert event.startswith("data: {") and event.endswith("}\n\n") and event.count("\n") == 2
    assert json.loads(event[len("data: "):]) == _json(chunk)
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_tools_with_tool_choice_none_and_developer_role_are_accepted():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({"tools": tools, "tool_choice": "none"}, {"tool_choice": "none"}, {"tools": []},
                  {"functions": [{"name": "f"}], "function_call": "none"}, {"parallel_tool_calls": True},
                  {"tools": None, "tool_choice": None}):
        ChatCompletionRequest.model_validate({"model": "m", "messages": USER} | extra)
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "developer", "content": "x"}]})
    assert req.messages[0].role == "developer"


def test_stream_options_continuous_usage():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert req.stream_options.continuous_usage_stats and req.stream_options.include_usage
    assert not StreamOptions().continuous_usage_stats


@pytest.mark.parametrize("body, cls", [
    ({"prompt": "hi"}, TokenizeCompletionRequest),
    ({"model": "m", "prompt": "hi", "add_special_tokens": False, "return_token_strs": None},
     TokenizeCompletionRequest),
    ({"messages": USER, "add_generation_prompt": False, "continue_final_message": True}, TokenizeChatRequest),
    ({"tokens": [0, 5]}, DetokenizeRequest),
])
def test_tokenizer_requests_parse(body, cls):
    cls.model_validate(body)


@pytest.mark.parametrize("body, cls, param", [
    ({"prompt": "hi", "messages": USER}, TokenizeCompletionRequest, "messages"),
    ({"messages": USER, "continue_final_message": True}, TokenizeChatRequest, None),  # with add_generation_prompt
    ({"messages": []}, TokenizeChatRequest, "messages"),
    ({"tokens": [1, -2]}, DetokenizeRequest, "tokens.1"),
    ({"tokens": "1 2"}, DetokenizeRequest, "tokens"),
])
def test_tokenizer_requests_reject(body, cls, param):
    assert _rejects(cls, body).param == param


def test_tokenize_response_shape():
    assert TokenizeResponse(count=2, max_model_len=9, tokens=[1, 2]).model_dump(exclude_none=True) == {
        "count": 2, "max_model_len": 9, "tokens": [1, 2]}
    assert ModelCard(id="m", created=1, max_model_len=9).model_dump()["max_model_len"] == 9


def test_error_body_matches_its_documented_schema():
    body = error_body(APIError(404, "no", "not_found_error", "model", "model_not_found"))
    assert ErrorResponse.model_validate(body).model_dump() == body


def test_openapi_documents_bodies_and_real_error_statuses():
    from cluster.proxy.app import api

    doc = api.openapi()
    schemas, paths = doc["components"]["schemas"], doc["paths"]

    def body_refs(path):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return [r["$ref"].rsplit("/", 1)[1] for r in schema.get("anyOf", [schema])]

    assert body_refs("/v1/completions") == ["CompletionRequest"]
    assert body_refs("/v1/chat/completions") == ["ChatCompletionRequest"]
    assert body_refs("/tokenize") == ["TokenizeCompletionRequest", "TokenizeChatRequest"]
    assert body_refs("/detokenize") == ["DetokenizeRequest"]
    assert body_refs("/v1/cluster/scale") == ["ScaleRequest"] and body_refs("/v1/cluster/rebalance")
    for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "ErrorResponse"):
        assert name in schemas, name  # every $ref resolves
    assert {"messages", "tools", "tool_choice"} <= set(schemas["ChatCompletionRequest"]["properties"])

    def statuses(path, method):
        return set(paths[path][method]["responses"])

    assert statuses("/v1/models/{model}", "get") == {"200", "401", "404"}  # 404, not FastAPI's 422
    assert {"400", "401", "404", "413", "415", "429", "503"} <= statuses("/v1/completions", "post")
    assert {"401", "403", "503"} <= statuses("/v1/cluster/scale", "post")
    assert statuses("/metrics", "get") == {"200"} and statuses("/health", "get") == {"200"}
    error = paths["/v1/chat/completions"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert not any("422" in op["responses"] for ops in paths.values() for op in ops.values())
    assert "HTTPValidationError" not in schemas
