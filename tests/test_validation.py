"""cluster.validation: the one reader of pydantic's error structure."""

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from cluster.config import format_validation_error
from cluster.validation import field_errors

pytestmark = pytest.mark.fast


class Inner(BaseModel):
    n: int


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner
    name: str

    @field_validator("name")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v


def _errors(data):
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_each_bad_field_by_its_dotted_path_and_type():
    got = field_errors(_errors({"inner": {"n": "x"}, "name": "a", "extra": 1}).errors())
    assert [(e.path, e.type) for e in got] == [("inner.n", "int_parsing"), ("extra", "extra_forbidden")]


def test_a_validators_message_loses_pydantics_value_error_prefix():
    (e,) = field_errors(_errors({"inner": {"n": 1}, "name": ""}).errors())
    assert (e.path, e.msg) == ("name", "must not be empty")


def test_a_first_location_the_user_never_wrote_is_dropped():
    errors = [{"loc": ("body", "max_tokens"), "type": "greater_than_equal", "msg": "too small"}]
    assert field_errors(errors, skip_first="body")[0].path == "max_tokens"
    assert field_errors(errors)[0].path == "body.max_tokens"


def test_the_cli_line_names_every_bad_field():
    line = format_validation_error(_errors({"inner": {}, "name": ""}))
    assert line == "inner.n: Field required; name: must not be empty"
