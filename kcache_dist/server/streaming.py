"""Server-sent events: the pieces of text to send as a request's cumulative output grows.

The engine cuts a stop string out of the text once it is complete, so text that might be the start
of a stop string is held back until it is known not to be one; the pieces sent then add up to the
final text exactly.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from starlette.responses import StreamingResponse

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def held_back_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StreamedText:
    """Tracks what was sent of one request's text; `next_piece` says what to send now."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.sent = ""

    def next_piece(self, text: str, finished: bool) -> str:
        """The new text to send, given the cumulative `text` (final when `finished`)."""
        end = len(text) if finished else len(text) - held_back_length(text, self.stop)
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece = text[len(self.sent):end]
        self.sent += piece
        return piece


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
