"""The server's requests and errors, in OpenAI's shapes.

A request body is read by ``read_json`` (bounded in bytes, UTF-8, JSON, an object) and checked by
the pydantic models here; every refusal is an ``ApiError``, answered as OpenAI answers errors:
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (503 when the server cannot
serve in time), never a traceback.
"""

from __future__ import annotations

import base64
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect, Request

from ctxvec.texts import lone_surrogate


class ApiError(Exception):
    """A request the server refuses, as one sentence, with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextsRequest(BaseModel):
    """What both endpoints take: ``input`` (one text or a list), ``model``, ``encoding_format``,
    and ctxvec's ``truncate`` (False: an input over the model's limit is an error naming its
    index). Types are strict: nothing is coerced."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: object) -> str | list[str]:
        if not isinstance(value, (str, list)):
            raise ValueError(f"must be a string or a list of strings, not {_kind(value)}")
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("is an empty list; send at least one text")
        for i, text in enumerate(texts):
            item = "" if isinstance(value, str) else f"[{i}] "
            if not isinstance(text, str):
                raise ValueError(f"{item}must be a string, not {_kind(text)} (token ids are not accepted: send text)")
            if text == "":
                raise ValueError(f"{item}is an empty string")
            if (at := lone_surrogate(text)) is not None:
                raise ValueError(f"{item}holds a lone surrogate at character {at}, which is not valid Unicode")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(TextsRequest):
    """``POST /v1/embeddings``: OpenAI's fields (``dimensions``: keep the first k values and
    normalise them again), and ctxvec's ``truncate``."""

    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class EncodeRequest(TextsRequest):
    """``POST /v1/encode``: every token's context vector (the seed's own output)."""


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request's JSON object, or an ``ApiError``: 415 for another content type, 413 over
    ``max_bytes`` (counted as the body arrives, not trusted from a header), 400 for anything
    that is not UTF-8 JSON holding an object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"send the body as application/json, not {kind or 'no content type'}.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the body has {int(declared):,} bytes, more than the server's limit of "
                            f"{max_bytes:,} (--max-request-bytes).", code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"the body is over the server's limit of {max_bytes:,} bytes "
                                    "(--max-request-bytes).", code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(499, "the client went away before sending the whole body.",
                       code="client_closed_request") from None
    try:
        value = json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {err.start}).") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the body is not valid JSON ({err.msg} at character {err.pos}).") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply.") from None
    except ValueError as err:  # e.g. an integer of over 4,300 digits
        raise ApiError(400, f"the body is not valid JSON ({str(err).rstrip('.')}).") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, not a {type(value).__name__}.")
    return value


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """``model`` from ``body``, or a 400 that names the first field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else None
        message = first["msg"].removeprefix("Value error, ").replace("Input should", "should")
        if message.startswith("["):  # an item of input: "input[3] is an empty string"
            where, message = f"{where}{message[:message.index(']') + 1]}", message[message.index("]") + 2:]
        if first["type"] == "missing":
            message = "is required"
        raise ApiError(400, f"{where} {message}." if where else f"{message}.", param=where) from None


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")


def vector_payload(vector: np.ndarray, encoding: str) -> list[float] | str:
    """A float32 vector as JSON floats, or as base64 of its little-endian bytes (what the
    official ``openai`` client asks for by default)."""
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()
