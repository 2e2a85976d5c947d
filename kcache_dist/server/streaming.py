"""Server-sent events: the pieces of text to send as a request's cumulative output grows.

The engine cuts a stop string out of the text once it is complete, so text that might be the start
of a stop string is held back until it is known not to be one; the pieces sent then add up to the
final text exactly.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from starlette.responses import StreamingResponse

from ..engine.detokenizer import StreamedText, held_back_length  # noqa: F401 (the app's, and the tests')

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that calls `on_close` however it ends — finished, the client
    disconnected, or the server cancelled it — so the request behind it can be aborted."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
