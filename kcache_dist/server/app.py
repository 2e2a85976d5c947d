"""The HTTP app: OpenAI-compatible routes over an `EngineDriver`.

    POST /v1/completions        prompt (text or token ids) -> text; "stream": true for SSE chunks
    POST /v1/chat/completions   messages -> reply, through the tokenizer's chat template
    GET  /v1/models             the served model name(s)
    GET  /health                200 while the engine driver runs, else 503 (naming why it failed)
    GET  /metrics               Prometheus text: queue, tokens, throughput, cache blocks, V bytes

Every error answers with an OpenAI-style body {"error": {"message", "type", "param", "code"}}.
The app never touches the engine or CUDA; all engine work goes through the driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.llm_engine import ContextLengthExceeded
from ..outputs import RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from . import openai_format as fmt
from .api_key import APIKeyCheck
from .body_limit import BodySizeLimit
from .chat_prompt import ChatPromptBuilder
from .cli_args import ServerSettings
from .engine_driver import EngineDriver, EngineFailure, RequestStream, ServerDraining, ServerOverloaded
from .errors import APIError, bad_request, error_body
from .metrics import PROMETHEUS_CONTENT_TYPE, render_prometheus
from .protocol import ChatCompletionRequest, CompletionRequest, Prompt, parse_request
from .streaming import SSE_DONE, EventStreamResponse, sse_event

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; never seen by the client
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # JSON's \ud800-\udfff escapes


def build_app(driver: EngineDriver, chat_prompts: ChatPromptBuilder, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="kcache_dist", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(APIKeyCheck, api_keys=list(settings.api_keys))  # added last: runs first
    model_names = list(settings.served_model_names)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(message, "invalid_request_error" if error.status_code < 500 else "server_error"),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(error_body(f"internal server error: {error}", "server_error"), status_code=500)

    def check_model(name: str) -> None:
        if name not in model_names:  # 404, as OpenAI and vLLM answer
            raise APIError(404, f"the model '{name}' does not exist; this server serves: {', '.join(model_names)}",
                           param="model", code="model_not_found")

    async def submit(prompt: Prompt, params: SamplingParams, request_id: str, prompt_param: str,
                     max_tokens_param: Optional[str]) -> RequestStream:
        """The request's stream of DELTA outputs: a step copies none of the text or token ids before them.
        `max_tokens_param`: the field that gave max_tokens, if the request gave it; a prompt plus
        that many tokens past the context is then refused (as vLLM's server), else the output ends
        at the context's end."""
        try:
            return await driver.submit(prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA),
                                       request_id, max_tokens_within_context=max_tokens_param is not None)
        except ContextLengthExceeded as e:
            raise bad_request(str(e), param=max_tokens_param) from None
        except ValueError as e:  # the engine's validation: the prompt's length, token ids, ...
            raise bad_request(str(e), param=prompt_param) from None
        except ServerDraining as e:
            raise APIError(503, str(e), "server_error", code="server_shutting_down") from None
        except ServerOverloaded as e:
            raise APIError(503, str(e), "server_error", code="server_overloaded",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineFailure as e:
            raise APIError(503, str(e), "server_error") from None

    @app.get("/health")
    async def health() -> JSONResponse:
        failure = driver.failure_message()  # e.g. a lost rank: the server exits in a moment
        if failure is not None or not driver.alive:
            return JSONResponse(error_body(failure or "the engine is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_prometheus(driver.stats(), model_names[0]), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(fmt.model_list(model_names, started, driver.max_model_len))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(CompletionRequest, await read_json(request))
        check_model(body.model)
        params = body.sampling_params(body.resolved_max_tokens())
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await submit(body.prompt, params, request_id, "prompt",
                              None if body.max_tokens is None else "max_tokens")

        if body.wants_stream:
            async def events() -> AsyncIterator[str]:
                async for piece, output in text_pieces(stream):
                    finish = output.outputs[0].finish_reason if output.finished else None
                    if piece or finish:
                        yield sse_event(fmt.completion_chunk(request_id, created, body.model, piece, finish))
                if body.include_usage_in_stream:
                    yield sse_event(fmt.usage_chunk(request_id, created, body.model, "text_completion",
                                                    usage_of(output, stream)))
            return EventStreamResponse(guarded(events(), stream), on_close=stream.abort)

        output = await final_output_unless_disconnected(stream, request)
        if output is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion = output.outputs[0]
        return JSONResponse(fmt.completion_response(request_id, created, body.model, completion.text,
                                                    completion.finish_reason, usage_of(output, stream)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await read_json(request))
        check_model(body.model)
        prompt_token_ids = await chat_prompts.token_ids(body.template_messages())
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:  # as OpenAI: up to the end of the context
            max_tokens = max(1, driver.max_model_len - len(prompt_token_ids))
        params = body.sampling_params(max_tokens)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = await submit(prompt_token_ids, params, request_id, "messages", body.max_tokens_field())

        if body.wants_stream:
            async def events() -> AsyncIterator[str]:
                yield sse_event(fmt.chat_chunk(request_id, created, body.model, {"role": "assistant", "content": ""},
                                               None))
                async for piece, output in text_pieces(stream):
                    if piece:
                        yield sse_event(fmt.chat_chunk(request_id, created, body.model, {"content": piece}, None))
                    if output.finished:
                        yield sse_event(fmt.chat_chunk(request_id, created, body.model, {},
                                                       output.outputs[0].finish_reason))
                if body.include_usage_in_stream:
                    yield sse_event(fmt.usage_chunk(request_id, created, body.model, "chat.completion.chunk",
                                                    usage_of(output, stream)))
            return EventStreamResponse(guarded(events(), stream), on_close=stream.abort)

        output = await final_output_unless_disconnected(stream, request)
        if output is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion = output.outputs[0]
        return JSONResponse(fmt.chat_response(request_id, created, body.model, completion.text,
                                              completion.finish_reason, usage_of(output, stream)))

    return app


async def read_json(request: Request):
    raw = await request.body()
    if not raw:
        raise bad_request("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a too long integer, too deep nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise bad_request(f"the request body is not valid JSON: {reason}") from None
    if SURROGATE_ESCAPE.search(raw):  # a pair is one character; a lone half cannot be encoded or tokenized
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
                              "its pair): strings must be valid Unicode") from None
    return body


def _refuse_constant(name: str):
    """JSON has no NaN or Infinity (Python's json module reads them unless told not to)."""
    raise ValueError(f"{name} is not a JSON number")


def usage_of(output: RequestOutput, stream: RequestStream) -> dict[str, int]:
    """Token counts of the request `stream` has run to its end (`output`)."""
    return fmt.usage(len(output.prompt_token_ids), stream.num_output_tokens)


async def text_pieces(stream: RequestStream) -> AsyncIterator[tuple[str, RequestOutput]]:
    """(new text to send, newest output) as the request runs; raises APIError if it was aborted."""
    async for output in stream:
        if output.outputs[0].finish_reason == "abort":
            raise APIError(503, "the request was aborted before it finished (the server is shutting down)",
                           "server_error")
        yield output.outputs[0].text, output


async def guarded(events: AsyncIterator[str], stream: RequestStream) -> AsyncIterator[str]:
    """The SSE events, an error event if the request failed on the way, and `data: [DONE]`."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse_event(e.body())
    except EngineFailure as e:
        yield sse_event(error_body(str(e), "server_error"))
    finally:
        stream.abort()  # no-op once finished; stops the request if the stream ended early
    yield SSE_DONE


async def final_output_unless_disconnected(stream: RequestStream, request: Request) -> Optional[RequestOutput]:
    """The finished output; None (and the request aborted) if the client disconnects first."""
    finishing = asyncio.ensure_future(stream.final_output())
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({finishing, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if finishing in done:
            output = finishing.result()
        else:
            logger.info("client went away: aborting request %s", stream.request_id)
            finishing.cancel()
            stream.abort()
            return None
    except EngineFailure as e:
        raise APIError(503, str(e), "server_error") from None
    finally:
        disconnected.cancel()
        finishing.cancel()
    if output.outputs[0].finish_reason == "abort":
        raise APIError(503, "the request was aborted before it finished (the server is shutting down)",
                       "server_error")
    return output


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
