"""Multipart forms (OpenAI's edits and variations): text fields through a pydantic model, files as bytes.

Form values are strings; the model's lax mode reads "2", "0.5" and "true" as it reads JSON numbers and
booleans, so a bad field is the same 400 naming it as on the JSON endpoints. Lists arrive as repeated
`name[]` fields (how the OpenAI SDK sends `extra_body={"cfg": [...]}`); an empty value (the SDK's
explicit None) counts as absent.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.errors import invalid, validation_error

FormModel = TypeVar("FormModel", bound=BaseModel)
MAX_FILES, MAX_FIELDS = 4, 64  # an image, a mask, and room for a mistake that gets a clear 400


async def read_form(request: Request, model: type[FormModel]) -> tuple[FormModel, dict[str, list[bytes]]]:
    """The form's text fields validated by `model` (400 naming the field), and each file field's bytes.

    The whole body is already in memory and bounded (BodyLimit); a malformed form is a 400 (Starlette)."""
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(await value.read())
        elif key.endswith("[]"):
            fields.setdefault(name, []).append(value)
        elif value != "":
            fields[name] = value
    try:
        return model.model_validate(fields), files
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def optional_file(files: dict[str, list[bytes]], name: str) -> bytes | None:
    """The one file sent as `name`, or None."""
    sent = files.get(name, [])
    if len(sent) > 1:
        raise invalid(f"`{name}`: send one file, got {len(sent)}", name)
    return sent[0] if sent else None


def one_file(files: dict[str, list[bytes]], name: str) -> bytes:
    """The one file sent as `name`, which is required."""
    data = optional_file(files, name)
    if data is None:
        raise invalid(f"`{name}` is required: the input image, as a file of a multipart form", name, "missing")
    return data


def form_schema(model: type[BaseModel], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The OpenAPI request body of a multipart endpoint: the model's fields plus its files."""
    schema = model.model_json_schema()
    for name in (*required, *optional):
        schema["properties"][name] = {"type": "string", "format": "binary"}
    schema["required"] = [*schema.get("required", []), *required]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
