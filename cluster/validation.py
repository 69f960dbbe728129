"""Pydantic's validation errors as one record per bad field: the one place that
reads their structure, for the CLI's manifest errors and the proxy's 400s (each
words its message for its reader)."""

from __future__ import annotations

from typing import NamedTuple


class FieldError(NamedTuple):
    path: str  # dotted field path ("" for the whole input)
    type: str  # pydantic's error type, e.g. "extra_forbidden"
    msg: str  # pydantic's message, without the "Value error, " a validator's ValueError gets
    ctx: dict  # pydantic's context, e.g. the JSON decoder's error


def field_errors(errors: list[dict], skip_first: str | None = None) -> list[FieldError]:
    """`errors` (ValidationError.errors()) as FieldErrors; `skip_first`: a first
    location element the user never wrote (FastAPI's "body")."""
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        if loc and skip_first is not None and loc[0] == skip_first:
            loc = loc[1:]
        out.append(FieldError(".".join(str(p) for p in loc), e.get("type", ""),
                              str(e.get("msg", "")).removeprefix("Value error, "), e.get("ctx") or {}))
    return out
