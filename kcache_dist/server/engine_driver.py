"""The engine driver: one background thread owns the engine and steps it while work exists.

HTTP handlers (on the asyncio event loop) never touch the engine. They `submit` a request, which
puts a command on a thread-safe queue and waits until the driver thread has run
`engine.add_request` (its ValueError comes back to the handler, for a 400). Before every step the
driver applies all queued commands, so requests that arrive while others run join the batch at the
next step (continuous batching). After a step, each request's output (as its `output_kind` asks) is
handed to that request's asyncio queue on its event loop (`call_soon_threadsafe`); `RequestStream`
reads it.
`abort` (a client went away) is a command too: the engine frees the request's blocks.

Overload: with `max_queued_requests`, a submit that finds that many requests already queued (sent
to the driver or waiting in the engine for a batch slot or cache blocks, preempted ones included)
fails at once with `ServerOverloaded` (the handler answers 503 with a Retry-After header), so the
queue cannot grow without limit. Requests the engine accepted are never dropped for lack of room:
they wait, or are preempted and recomputed.

Shutdown: `stop_accepting` makes later submits fail with `ServerDraining`; `shutdown` waits until
every in-flight request has finished (aborting what is left after its timeout) and ends the thread.

Multi-rank serving: on rank 0 the driver steps the engine, whose step sends the plan to the other
ranks of the tensor-parallel group (they run `engine.run_worker()`); while there is no work the
driver calls `engine.keepalive()` at least every `engine.keepalive_interval_s`, so that the
workers' wait for the next plan never reaches the collective timeout. A lost rank (RankLostError)
is not a failure of the requests in flight but of the job: it stops the driver and goes to
`on_crash` (the server answers 503 for a few seconds, then exits).

Failed state: once the driver's loop has stopped on an error (`crash`), every request in flight and
every later submit gets an `EngineFailure` whose message carries that error (e.g. the lost rank).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..outputs import RequestOutput
from ..parallel import RankLostError
from ..sampling_params import RequestOutputKind, SamplingParams
from .engine_stats import EngineStats, StatsRecorder

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]
IDLE_WAKEUP_S = 1.0  # while idle, wake up at least this often to refresh the stats (throughput decays to 0)
OVERLOAD_RETRY_AFTER_S = 1  # what a refused client is told to wait: about one batch of short requests


class ServerDraining(RuntimeError):
    """The server is shutting down and takes no new requests."""


class ServerOverloaded(RuntimeError):
    """The request queue is full; the client should retry after `retry_after_s` seconds."""

    def __init__(self, num_queued: int, max_queued_requests: int, retry_after_s: int = OVERLOAD_RETRY_AFTER_S):
        super().__init__(f"the server is overloaded: {num_queued} requests are queued already (at most "
                         f"{max_queued_requests} may wait); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineFailure(RuntimeError):
    """The engine raised while running this request; the request was dropped."""


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Union[RequestOutput, BaseException]]"


@dataclass
class _AddRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    subscriber: _Subscriber
    accepted: "asyncio.Future[None]"
    max_tokens_within_context: bool


@dataclass
class _AbortRequest:
    request_id: str


class _AbortAll:
    """Abort every request still in flight (shutdown after its timeout)."""


class RequestStream:
    """The outputs of one request, as the engine produces them for its `output_kind`.

    `async for output in stream` yields whenever there is news and stops after the finished output;
    outputs that piled up while the consumer was busy come as one (the newest, or DELTA outputs
    joined). `num_output_tokens` counts the request's output tokens yielded so far. Raises
    `EngineFailure` if the engine failed the request.
    """

    def __init__(self, request_id: str, queue: "asyncio.Queue[Union[RequestOutput, BaseException]]",
                 driver: "EngineDriver", output_kind: RequestOutputKind):
        self.request_id = request_id
        self._queue = queue
        self._driver = driver
        self.output_kind = output_kind
        self.finished = False
        self.num_output_tokens = 0

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        items = [await self._queue.get()]
        while not isinstance(items[-1], BaseException) and not items[-1].finished and not self._queue.empty():
            items.append(self._queue.get_nowait())
        if isinstance(items[-1], BaseException):
            self.finished = True
            raise items[-1]
        output = self._joined(items)
        self.finished = output.finished
        num_tokens = len(output.outputs[0].token_ids)
        self.num_output_tokens = self.num_output_tokens + num_tokens if self._is_delta(output) else num_tokens
        return output

    async def final_output(self) -> RequestOutput:
        """Wait for the finished output; all the request's text and token ids, whatever its kind."""
        outputs: list[RequestOutput] = []
        async for output in self:
            if not self._is_delta(output):
                outputs.clear()
            outputs.append(output)
        assert outputs and outputs[-1].finished
        return self._joined(outputs)

    def _is_delta(self, output: RequestOutput) -> bool:
        """Whether `output` holds only what is new since the request's previous one (a DELTA
        request's, except the abort's, which holds everything)."""
        return self.output_kind is RequestOutputKind.DELTA and output.outputs[0].finish_reason != "abort"

    def _joined(self, outputs: list[RequestOutput]) -> RequestOutput:
        """One output in place of this request's consecutive `outputs`: the last, or if that is a
        delta, the deltas' text and token ids joined."""
        last = outputs[-1]
        if len(outputs) == 1 or not self._is_delta(last):
            return last
        completion = dataclasses.replace(last.outputs[0], text="".join(o.outputs[0].text for o in outputs),
                                         token_ids=[t for o in outputs for t in o.outputs[0].token_ids])
        return dataclasses.replace(last, outputs=[completion])

    def abort(self) -> None:
        """Stop the request (if it is still running) and free its blocks."""
        if not self.finished:
            self._driver.abort(self.request_id)


class EngineDriver:
    """Runs `engine` on its own thread; every method is safe to call from any thread (`submit` from
    a running event loop).

    on_crash: called on the driver thread with the exception that stopped its loop (e.g. a
    RankLostError), after every request in flight got an `EngineFailure` and `crash` was set (so
    later submits fail too); the driver counts as alive until it returns.
    max_queued_requests: most requests that may wait for a batch slot (None: no bound); a submit
    beyond it raises `ServerOverloaded`.
    """

    def __init__(self, engine, thread_name: str = "engine-driver",
                 on_crash: Optional[Callable[[BaseException], None]] = None,
                 max_queued_requests: Optional[int] = None):
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self._engine = engine
        self._on_crash = on_crash
        self.max_queued_requests = max_queued_requests
        # Requests submitted and not yet running. Raised by `submit`, set to the exact count (engine
        # waiting + adds not yet applied) by the driver thread after each step: never below the truth.
        self._num_queued = 0
        self.max_model_len: int = engine.max_model_len
        self._wakeup = threading.Condition()
        self._commands: list[Union[_AddRequest, _AbortRequest, _AbortAll]] = []
        self._accepting = True
        self._stop_when_idle = False
        self._subscribers: dict[str, _Subscriber] = {}  # driver thread only
        self._recorder = StatsRecorder()
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.crash: Optional[BaseException] = None
        self._num_aborted_at_shutdown = 0

    # ---- any thread -----------------------------------------------------------------------
    def start(self) -> "EngineDriver":
        self._publish_stats()
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> EngineStats:
        return self._stats

    def failure_message(self) -> Optional[str]:
        """Why the driver failed (None while it has not): what requests and /health answer with."""
        if self.crash is None:
            return None
        return f"the engine failed: {self.crash}"

    async def submit(self, prompt: Prompt, params: SamplingParams, request_id: str,
                     max_tokens_within_context: bool = False) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises the engine's ValueError for a
        bad request (with `max_tokens_within_context`, also for a prompt plus max_tokens past the
        context), `ServerDraining` while shutting down, `EngineFailure` if the driver is not running."""
        loop = asyncio.get_running_loop()
        subscriber = _Subscriber(loop, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        with self._wakeup:
            if self.crash is not None:
                raise EngineFailure(self.failure_message())
            if not self._accepting:
                raise ServerDraining("the server is shutting down and takes no new requests")
            if not self._thread.is_alive():
                raise EngineFailure("the engine is not running")
            if self.max_queued_requests is not None and self._num_queued >= self.max_queued_requests:
                raise ServerOverloaded(self._num_queued, self.max_queued_requests)
            self._num_queued += 1
            self._commands.append(_AddRequest(request_id, prompt, params, subscriber, accepted,
                                              max_tokens_within_context))
            self._wakeup.notify()
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller went away before the engine took the request
            raise
        return RequestStream(request_id, subscriber.queue, self, params.output_kind)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (nothing happens if it already finished)."""
        with self._wakeup:
            self._commands.append(_AbortRequest(request_id))
            self._wakeup.notify()

    def stop_accepting(self) -> None:
        """Refuse later submits. Takes no lock: it runs inside a signal handler."""
        if self._accepting:
            self._accepting = False
            logger.info("shutting down: no new requests; finishing the ones in flight")

    def shutdown(self, timeout_s: Optional[float] = None) -> bool:
        """Stop accepting, let in-flight requests finish (abort what remains after `timeout_s`),
        and end the driver thread. Returns True if every request finished by itself."""
        self.stop_accepting()
        with self._wakeup:
            self._stop_when_idle = True
            self._wakeup.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with self._wakeup:
                self._commands.append(_AbortAll())
                self._wakeup.notify()
            self._thread.join(30.0)
        return self._num_aborted_at_shutdown == 0

    # ---- driver thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        try:
            while True:
                with self._wakeup:
                    if not self._commands and not engine.has_unfinished_requests():
                        if self._stop_when_idle:
                            break
                        self._wakeup.wait(min(IDLE_WAKEUP_S, engine.keepalive_interval_s))
                    commands, self._commands = self._commands, []
                for command in commands:
                    if isinstance(command, _AddRequest):
                        self._add(command)
                    elif isinstance(command, _AbortRequest):
                        self._abort(command.request_id)
                    else:
                        self._abort_all()
                if engine.has_unfinished_requests():
                    self._step()
                engine.keepalive()  # sends only if the workers have not heard from this rank for a while
                self._publish_stats()
        except BaseException as e:  # the loop itself broke: fail everyone, refuse new requests
            logger.exception("engine driver stopped")
            with self._wakeup:
                self.crash = e  # from now on submit refuses
                self._accepting = False
                commands, self._commands = self._commands, []
            message = self.failure_message()
            for request_id in list(self._subscribers):
                self._deliver(self._subscribers.pop(request_id), EngineFailure(message))
            for command in commands:
                if isinstance(command, _AddRequest):
                    self._resolve(command.accepted, EngineFailure(message))
            if self._on_crash is not None:
                self._on_crash(e)
        logger.info("engine driver finished")

    def _add(self, command: _AddRequest) -> None:
        try:
            self._engine.add_request(command.prompt, command.params, command.request_id,
                                     command.max_tokens_within_context)
        except Exception as e:  # ValueError: a bad request (the handler turns it into a 400)
            self._resolve(command.accepted, e)
            return
        self._subscribers[command.request_id] = command.subscriber
        self._resolve(command.accepted, None)

    def _abort(self, request_id: str) -> None:
        subscriber = self._subscribers.pop(request_id, None)
        output = self._engine.abort_request(request_id)
        if output is not None:
            self._recorder.record_finished(output)
            logger.info("request %s aborted after %d tokens", request_id, len(output.outputs[0].token_ids))
            if subscriber is not None:
                self._deliver(subscriber, output)

    def _abort_all(self) -> None:
        if self._subscribers:
            logger.warning("shutdown timeout: aborting %d requests still running", len(self._subscribers))
        self._num_aborted_at_shutdown += len(self._subscribers)
        for request_id in list(self._subscribers):
            self._abort(request_id)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self._engine.step()
        except RankLostError:
            raise  # the job is broken, not this step's requests: stop the driver
        except Exception as e:
            logger.exception("engine step failed; dropping the %d requests in flight", len(self._subscribers))
            for request_id in list(self._subscribers):
                self._deliver(self._subscribers.pop(request_id), EngineFailure(f"engine step failed: {e}"))
                self._recorder.forget(request_id)
                try:
                    self._engine.abort_request(request_id)
                except Exception:
                    logger.exception("could not abort request %s", request_id)
            return
        self._recorder.record_step(outputs, time.perf_counter() - start)
        for output in outputs:
            subscriber = self._subscribers.get(output.request_id)
            if output.finished:
                self._subscribers.pop(output.request_id, None)
            if subscriber is not None:
                self._deliver(subscriber, output)

    def _publish_stats(self) -> None:
        snapshot = self._engine.snapshot()
        with self._wakeup:
            self._num_queued = snapshot.num_requests_waiting + sum(isinstance(c, _AddRequest) for c in self._commands)
        self._stats = self._recorder.combine(snapshot)

    @staticmethod
    def _deliver(subscriber: _Subscriber, item: Union[RequestOutput, BaseException]) -> None:
        try:
            subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    @staticmethod
    def _resolve(future: "asyncio.Future[None]", error: Optional[BaseException]) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:
            pass
