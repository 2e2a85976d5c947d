"""Request bodies of the OpenAI API (completions and chat), validated, and turned into
`SamplingParams`.

Fields follow OpenAI's names; `top_k`, `ignore_eos`, `stop_token_ids` and `skip_special_tokens` are
vLLM's extensions. Unknown fields, fields this server does not implement set to a non-default
value (`logprobs`, `echo`, penalties, ...), wrong types and bad values are refused with an
`APIError` (HTTP 400) that names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, param_named_in

OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions

Prompt = Union[str, list[int]]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


# Every step checks each running request's stop strings against its new text on the engine's one
# thread, so a request may not hold so many (or such long) ones that it slows everyone's steps.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: Optional[bool] = None


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "the default"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Any = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM extensions
    top_k: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None

    @field_validator("stop")
    @classmethod
    def _stop_is_text(cls, value: Any) -> Any:
        if not (value is None or isinstance(value, str) or (isinstance(value, list)
                                                            and all(isinstance(s, str) for s in value))):
            raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string is {len(longest)} characters long; at most {MAX_STOP_STRING_CHARS} "
                             "are allowed")
        return value

    @property
    def wants_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse fields that are known but not implemented, unless they hold their neutral value."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported by this server (only 0)", param=name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.wants_stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """SamplingParams for this request; `max_tokens` is the value to use (the request's or a
        default). SamplingParams' own ValueError messages become 400s naming the field."""
        values = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                  "seed": self.seed, "stop": self.stop, "stop_token_ids": self.stop_token_ids,
                  "ignore_eos": self.ignore_eos, "skip_special_tokens": self.skip_special_tokens}
        given = {k: v for k, v in values.items() if v is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **given)
        except ValueError as e:
            fields = tuple(f.name for f in dataclasses.fields(SamplingParams))
            raise bad_request(str(e), param=param_named_in(str(e), fields)) from None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a one-element list of either."""

    prompt: Any
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Prompt:
        if isinstance(value, str) or _is_token_list(value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_list(p) for p in value):
            if len(value) != 1:
                raise ValueError(f"prompt: this server takes one prompt per request, got a batch of {len(value)}")
            return value[0]
        raise ValueError(f"prompt must be a string or a list of token ids (integers), got {_short(value)}")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported by this server", param="echo")
        if self.logprobs is not None:
            raise bad_request("logprobs are not supported by this server", param="logprobs")
        if self.best_of not in (None, 1):
            raise bad_request("best_of must be 1 (one completion per request)", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")

    def resolved_max_tokens(self) -> int:
        return OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: Any = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, value: Any) -> Union[str, list[dict[str, str]], None]:
        """A string, None, or a list of text parts {"type": "text", "text": "..."} (no images)."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"} \
                        or not isinstance(part["text"], str):
                    raise ValueError("content parts must be text parts {\"type\": \"text\", \"text\": \"...\"} "
                                     f"(this server takes no images or other parts), got {_short(part)}")
            return value
        raise ValueError(f"content must be a string or a list of text parts, got {_short(value)}")

    def for_template(self) -> dict[str, str]:
        """The message as the chat template expects it: role and plain-text content."""
        if isinstance(self.content, list):
            content = "".join(part["text"] for part in self.content)
        else:
            content = self.content or ""
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name of `max_tokens`."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must hold at least one message")
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported by this server", param="logprobs")

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def max_tokens_field(self) -> Optional[str]:
        """The field that gave `requested_max_tokens`, or None."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return None if self.max_tokens is None else "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]


def parse_request(model_class: type[_GenerationRequest], body: Any) -> _GenerationRequest:
    """Validate a decoded JSON body; raise APIError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = model_class.model_validate(body)
    except ValidationError as e:
        raise _describe(e, model_class) from None
    request.check_supported()
    return request


def _describe(error: ValidationError, model_class: type[BaseModel]) -> APIError:
    first = error.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    kind, message = first["type"], first["msg"]
    if kind == "missing":
        return bad_request(f"missing required field '{param}'", param=param)
    if kind == "extra_forbidden":
        fields = ", ".join(sorted(model_class.model_fields))
        return bad_request(f"unknown field '{param}'; the fields this server takes are: {fields}", param=param)
    if kind == "value_error":
        return bad_request(message.removeprefix("Value error, "), param=param)
    return bad_request(f"invalid value for '{param}': {_short(first.get('input'))}: {message}", param=param)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
