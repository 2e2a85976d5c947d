"""Errors the HTTP API answers with, in OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}
"""

from __future__ import annotations

from typing import Any, Optional


class APIError(Exception):
    """An error to send to the client as `status` with an OpenAI-style body."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """HTTP 400: the request itself is wrong (and the server keeps serving)."""
    return APIError(400, message, "invalid_request_error", param, code)


def param_named_in(message: str, candidates: tuple[str, ...]) -> Optional[str]:
    """The request field a validation message is about: its first word, when that is a field name
    (SamplingParams and the engine start their messages with the field, e.g. "top_p must be ...")."""
    first_word = message.split(" ", 1)[0].strip("'\":,")
    return first_word if first_word in candidates else None
