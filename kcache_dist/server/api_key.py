"""ASGI middleware: with `--api-key`, every /v1/ route needs `Authorization: Bearer <key>` (401
otherwise). /health and /metrics stay open, as in vLLM, for probes and scrapers."""

from __future__ import annotations

import hmac

from .body_limit import send_json
from .errors import error_body

PROTECTED_PREFIX = "/v1"


class APIKeyCheck:
    def __init__(self, app, api_keys: list[str]):
        self.app = app
        self.expected = [f"Bearer {key}".encode() for key in api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.expected and scope["path"].startswith(PROTECTED_PREFIX):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not any(hmac.compare_digest(given, expected) for expected in self.expected):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                           else "invalid API key")
                await send_json(send, 401, error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                ((b"www-authenticate", b"Bearer"),))
                return
        await self.app(scope, receive, send)
