"""ASGI middleware: refuse request bodies larger than a limit with HTTP 413 (OpenAI-style body).

A declared `Content-Length` over the limit is refused before the body is read; a body sent
without one (chunked) is counted as it arrives.
"""

from __future__ import annotations

import json

from .errors import APIError

DEFAULT_MAX_REQUEST_BODY_BYTES = 1 << 20  # 1 MiB


def too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {max_bytes} bytes",
                    code="request_too_large")


async def send_json(send, status: int, body: dict, extra_headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = too_large(self.max_bytes)
            await send_json(send, error.status, error.body(), ((b"connection", b"close"),))
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)  # the app's APIError handler answers 413
            return message

        await self.app(scope, counting_receive, send)
