"""Which cached positions a decode step attends to, and where their V rows live."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectionSpec:
    """sink_tokens first positions and recent_window last positions are always attended (their V
    rows stay in device memory); among the rest, the top_n positions by group score per KV head."""

    top_n: int
    sink_tokens: int
    recent_window: int
    renormalize: bool
    group_reduce: str  # "max" | "sum" over the query heads that share a KV head

    def split(self, seq_len: int) -> tuple[int, int]:
        """(sink_end, window_start): sink is [0, sink_end), far is [sink_end, window_start),
        window is [window_start, seq_len)."""
        sink_end = min(self.sink_tokens, seq_len)
        return sink_end, max(sink_end, seq_len - self.recent_window)

    @property
    def hot_rows(self) -> int:
        """Rows of the device-resident V buffer of one (sequence, KV head): sink + window ring."""
        return self.sink_tokens + self.recent_window

    def hot_row(self, positions: torch.Tensor) -> torch.Tensor:
        """Row in the hot buffer of each position (sink positions first, then a ring of the window).
        Only meaningful for sink positions and the last `recent_window` positions; any other
        position still maps to a row in range (writers send such rows to a slot nobody reads)."""
        if self.recent_window == 0:
            return positions.clamp(max=self.sink_tokens - 1)
        ring = self.sink_tokens + (positions - self.sink_tokens) % self.recent_window
        return torch.where(positions < self.sink_tokens, positions, ring)
