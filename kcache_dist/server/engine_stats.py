"""What /metrics reports: counters kept from the engine's outputs, plus the engine's own snapshot
of its queues and cache (`LLMEngine.snapshot()`).

`StatsRecorder` lives on the engine driver's thread (the only thread that touches the engine);
`combine(engine.snapshot())` returns an immutable `EngineStats` the HTTP side may read at any time.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from ..engine.engine_snapshot import EngineSnapshot
from ..outputs import RequestOutput

THROUGHPUT_WINDOW_S = 10.0


@dataclass(frozen=True)
class EngineStats:
    """One consistent view of the engine (taken between steps); the gauges mean what they mean in
    `EngineSnapshot` (under tensor parallelism, `v_bytes_fetched_total` is rank 0's share)."""

    kcache_mode: str = "full"
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_token_steps_total: int = 0  # engine steps that produced tokens (tokens / steps > 1: batched)
    num_preemptions_total: int = 0
    num_finished_total: dict[str, int] = field(default_factory=dict)  # by finish_reason
    decode_throughput_tokens_per_s: float = 0.0
    device_cache_blocks_in_use: int = 0
    device_cache_blocks_total: int = 0
    host_v_blocks_in_use: int = 0
    host_v_blocks_total: int = 0
    v_bytes_fetched_total: int = 0
    pinned_host_bytes: int = 0


class StatsRecorder:
    """Counts tokens and finished requests step by step, and the recent decode throughput."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_token_steps_total = 0
        self.num_finished_total: dict[str, int] = collections.Counter()
        self._requests_with_tokens: set[str] = set()  # unfinished requests that got a token (prompt counted)
        self._recent_steps: collections.deque[tuple[float, float, int]] = collections.deque()  # (end, seconds, tokens)

    def record_step(self, outputs: list[RequestOutput], step_seconds: float, now: Optional[float] = None) -> None:
        """One engine step produced one token for each of `outputs` (CUMULATIVE or DELTA ones: a
        FINAL_ONLY request's tokens would count as one, at its end)."""
        now = time.monotonic() if now is None else now
        for out in outputs:
            if out.request_id not in self._requests_with_tokens:  # the first token: its prompt was just prefilled
                self._requests_with_tokens.add(out.request_id)
                self.num_prompt_tokens_total += len(out.prompt_token_ids)
            if out.finished:
                self.record_finished(out)
        self.num_generation_tokens_total += len(outputs)
        self.num_token_steps_total += 1 if outputs else 0
        self._recent_steps.append((now, step_seconds, len(outputs)))

    def record_finished(self, output: RequestOutput) -> None:
        self.forget(output.request_id)
        self.num_finished_total[output.outputs[0].finish_reason or "unknown"] += 1

    def forget(self, request_id: str) -> None:
        """The request is over (finished, or dropped by the driver)."""
        self._requests_with_tokens.discard(request_id)

    def decode_throughput(self, now: Optional[float] = None) -> float:
        """Generated tokens per second of engine step time over the last `window_s` (0 when idle)."""
        now = time.monotonic() if now is None else now
        while self._recent_steps and self._recent_steps[0][0] < now - self.window_s:
            self._recent_steps.popleft()
        busy_s = sum(seconds for _, seconds, _ in self._recent_steps)
        tokens = sum(n for _, _, n in self._recent_steps)
        return tokens / busy_s if busy_s > 0 else 0.0

    def combine(self, engine: EngineSnapshot) -> EngineStats:
        """These counters plus the engine's queues and cache occupancy (`LLMEngine.snapshot()`: every
        field of it is a field of EngineStats)."""
        return EngineStats(
            **{f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)},
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
            num_token_steps_total=self.num_token_steps_total,
            num_finished_total=dict(self.num_finished_total),
            decode_throughput_tokens_per_s=self.decode_throughput(),
        )
