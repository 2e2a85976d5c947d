"""What /metrics reports: counters kept from the engine's outputs, plus gauges read from the engine.

`StatsRecorder` lives on the engine driver's thread (the only thread that touches the engine);
`snapshot(engine)` returns an immutable `EngineStats` the HTTP side may read at any time.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Optional

from ..outputs import RequestOutput

THROUGHPUT_WINDOW_S = 10.0


@dataclass(frozen=True)
class EngineStats:
    """One consistent view of the engine (taken between steps).

    Device cache blocks are K blocks in KCache mode and K+V blocks in full mode; host V blocks are
    the blocks whose V rows live in host memory (KCache mode; block ids are shared by the K and V
    pools, so both counts move together there), 0 in full mode.
    """

    kcache_mode: str = "full"
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    num_finished_total: dict[str, int] = field(default_factory=dict)  # by finish_reason
    decode_throughput_tokens_per_s: float = 0.0
    device_cache_blocks_in_use: int = 0
    device_cache_blocks_total: int = 0
    host_v_blocks_in_use: int = 0
    host_v_blocks_total: int = 0
    v_bytes_fetched_total: int = 0


class StatsRecorder:
    """Counts tokens and finished requests step by step, and the recent decode throughput."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_finished_total: dict[str, int] = collections.Counter()
        self._recent_steps: collections.deque[tuple[float, float, int]] = collections.deque()  # (end, seconds, tokens)

    def record_step(self, outputs: list[RequestOutput], step_seconds: float, now: Optional[float] = None) -> None:
        """One engine step produced one token for each of `outputs`."""
        now = time.monotonic() if now is None else now
        for out in outputs:
            if len(out.outputs[0].token_ids) == 1:  # the first token: its prompt was just prefilled
                self.num_prompt_tokens_total += len(out.prompt_token_ids)
            if out.finished:
                self.record_finished(out)
        self.num_generation_tokens_total += len(outputs)
        self._recent_steps.append((now, step_seconds, len(outputs)))

    def record_finished(self, output: RequestOutput) -> None:
        self.num_finished_total[output.outputs[0].finish_reason or "unknown"] += 1

    def decode_throughput(self, now: Optional[float] = None) -> float:
        """Generated tokens per second of engine step time over the last `window_s` (0 when idle)."""
        now = time.monotonic() if now is None else now
        while self._recent_steps and self._recent_steps[0][0] < now - self.window_s:
            self._recent_steps.popleft()
        busy_s = sum(seconds for _, seconds, _ in self._recent_steps)
        tokens = sum(n for _, _, n in self._recent_steps)
        return tokens / busy_s if busy_s > 0 else 0.0

    def snapshot(self, engine) -> EngineStats:
        """Counters plus the engine's current queue and cache occupancy. Call on the engine's thread."""
        blocks = engine.block_manager
        kv_cache = engine.runner.kv_cache
        mode = engine.config.kcache.mode
        keeps_v_on_host = bool(getattr(kv_cache, "v_host", None))  # KCache mode with at least one sparse layer
        v_row_bytes = engine.model_config.head_dim * engine.dtype.itemsize
        return EngineStats(
            kcache_mode=mode,
            num_requests_running=len(engine.scheduler.running),
            num_requests_waiting=len(engine.scheduler.waiting),
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
            num_preemptions_total=engine.scheduler.num_preemptions,
            num_finished_total=dict(self.num_finished_total),
            decode_throughput_tokens_per_s=self.decode_throughput(),
            device_cache_blocks_in_use=blocks.num_used_blocks,
            device_cache_blocks_total=blocks.num_blocks,
            host_v_blocks_in_use=blocks.num_used_blocks if keeps_v_on_host else 0,
            host_v_blocks_total=blocks.num_blocks if keeps_v_on_host else 0,
            v_bytes_fetched_total=getattr(kv_cache, "v_rows_fetched", 0) * v_row_bytes,
        )
