"""Response bodies and stream chunks in OpenAI's format (plain dicts, ready for JSON).

Non-streaming: one `text_completion` / `chat.completion` object with `usage`. Streaming: a
`text_completion` / `chat.completion.chunk` object per new piece of text, the last one carrying
`finish_reason`, then (if `stream_options.include_usage`) a chunk with empty `choices` and `usage`.
"""

from __future__ import annotations

from typing import Any, Optional


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_response(request_id: str, created: int, model: str, text: str, finish_reason: Optional[str],
                        usage_counts: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_counts}


def completion_chunk(request_id: str, created: int, model: str, text: str,
                     finish_reason: Optional[str]) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_response(request_id: str, created: int, model: str, text: str, finish_reason: Optional[str],
                  usage_counts: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_counts}


def chat_chunk(request_id: str, created: int, model: str, delta: dict[str, str],
               finish_reason: Optional[str]) -> dict[str, Any]:
    """`delta` is {"role": "assistant", "content": ""} first, then {"content": piece}, and {} last."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, created: int, model: str, object_name: str,
                usage_counts: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": object_name, "created": created, "model": model, "choices": [],
            "usage": usage_counts}


def model_list(names: list[str], created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "kcache_dist",
                      "root": names[0], "max_model_len": max_model_len} for name in names]}
