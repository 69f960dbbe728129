"""The OpenAPI document (/openapi.json, /docs) of the Omni Proxy's HTTP routes.

The routes read their JSON body themselves (`OmniProxySlave._parse`: OpenAI's
400s naming the field, 413, 415) rather than through FastAPI's body parameters,
so FastAPI knows neither the bodies nor the errors. Each route says them with
`openapi_extra=json_body(Model)` and `responses=answers(200 model, statuses)`,
and `install` puts the bodies' schemas into the document and drops FastAPI's
422, which this server never answers (a bad field is a 400).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cluster.proxy.protocol import ErrorResponse

REF = "#/components/schemas/{model}"
_SCHEMAS = "x-omniray-schemas"  # a body's schemas, carried from json_body to install

# what each error status means here; every one has OpenAI's error body (ErrorResponse)
ERRORS = {
    400: "Invalid request: a bad or unrecognized field (named in `error.param`), malformed JSON, a refused feature",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
    403: "Admin endpoints are off (no admin key configured)",
    404: "Unknown model (`error.code`: model_not_found)",
    413: "Request body over proxy.max_body_bytes",
    415: "Content-Type is not application/json",
    429: "Overloaded: the master's queue is full (see Retry-After)",
    500: "The cluster controller failed the action",
    503: "No capacity: no healthy instance, or the master or controller is not up (see Retry-After)",
    504: "Timed out (proxy.request_timeout_s)",
}
BODY_ERRORS = (400, 401, 404, 413, 415)  # what reading and validating a JSON body may answer


def package_version() -> str:
    try:
        return version("omniray")
    except PackageNotFoundError:  # running from a tree that was never installed
        return "unknown"


def json_body(*models: type[BaseModel]) -> dict:
    """`openapi_extra` of a route that reads its JSON body itself: one of `models`."""
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    refs = [{"$ref": REF.format(model=m.__name__)} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            _SCHEMAS: defs.get("$defs", {})}


def answers(ok: type[BaseModel] | None = None, *statuses: int, ok_description: str | None = None) -> dict:
    """`responses` of a route: its 200 body model (documented, not enforced) and the
    error statuses the route's code raises."""
    out: dict = {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}
    if ok is not None or ok_description:
        out[200] = {k: v for k, v in (("model", ok), ("description", ok_description)) if v}
    return out


def install(app: FastAPI) -> None:
    """Make `app.openapi()` the document described above."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    schemas.update(op.pop(_SCHEMAS, {}))
                    op.get("responses", {}).pop("422", None)  # a bad field is a 400 here
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
