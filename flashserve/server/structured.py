"""Request fields that constrain the output -> one ``StructuredOutputsParams``.

OpenAI's ``response_format`` (``{"type": "text"}``, ``{"type": "json_object"}``, ``{"type": "json_schema",
"json_schema": {"name", "description", "schema", "strict"}}``) and vLLM's request extras ``structured_outputs``
(an object with ``StructuredOutputsParams``' fields) and the older ``guided_json``, ``guided_regex``,
``guided_choice`` and ``guided_grammar``. At most one of them may be given; an invalid one (or a schema, regex or
grammar xgrammar refuses) is an ``InvalidRequestError`` naming the field.
"""
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flashserve.engine.grammars import build_grammar
from flashserve.sampling_params import StructuredOutputsParams
from flashserve.server.errors import InvalidRequestError

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the reply must follow (``strict`` is always honoured)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputFields(BaseModel):
    """The request fields of this module, shared by both generation endpoints."""

    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """(the constraint, the field it came from), or (None, None); ``InvalidRequestError`` naming the field for
        two constraints at once or an invalid one."""
        given = [name for name in ("response_format", "structured_outputs", *GUIDED_FIELDS)
                 if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise InvalidRequestError(f"give at most one of {', '.join(given)} (each constrains the output)",
                                      given[1])
        if not given:
            return None, None
        field = given[0]
        try:
            if field == "response_format":
                spec = _response_format_params(self.response_format)
            elif field == "structured_outputs":
                spec = StructuredOutputsParams(**self.structured_outputs)
            else:
                spec = StructuredOutputsParams(**{GUIDED_FIELDS[field]: getattr(self, field)})
        except TypeError as error:  # an unknown key of structured_outputs
            message = str(error).replace("StructuredOutputsParams.__init__() ", "")
            raise InvalidRequestError(f"{field}: {message}", field) from None
        except ValueError as error:
            raise invalid_constraint(error, field) from None
        check_grammar(spec, field)
        return spec, field


def invalid_constraint(error: ValueError, field: str) -> InvalidRequestError:
    """The 400 on ``field`` of a ValueError of ``StructuredOutputsParams`` or ``build_grammar`` (whose messages
    start with ``structured_outputs[.kind]``, which becomes the request's field name)."""
    message = str(error)
    if field != "structured_outputs":
        message = re.sub(r"^structured_outputs(\.\w+)?", field, message)
    return InvalidRequestError(message, field)


def check_grammar(spec: StructuredOutputsParams, field: str) -> None:
    """``InvalidRequestError`` on ``field`` when xgrammar refuses ``spec``'s schema, regex or grammar."""
    try:
        build_grammar(spec)
    except ValueError as error:
        raise invalid_constraint(error, field) from None


def _response_format_params(response_format: ResponseFormat) -> StructuredOutputsParams:
    """``response_format`` (json_object or json_schema) -> its constraint."""
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.json_schema is None or response_format.json_schema.json_schema is None:
        raise ValueError("response_format of type json_schema needs json_schema.schema")
    return StructuredOutputsParams(json=response_format.json_schema.json_schema)
