"""Server-sent events. The pieces of text they carry are the engine's DELTA outputs, which hold
back text that might be the start of a stop string (`engine.detokenizer.StreamedText`): the pieces
sent add up to the final text exactly.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from starlette.responses import StreamingResponse

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
