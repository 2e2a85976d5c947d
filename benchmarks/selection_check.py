"""Check every KCache selection of a run on the host (slow): `throughput.py --check-selection`.

The Triton selection (`kcache_dist/kcache/triton_kcache.py`) must give each (sequence, KV head) row
min(top_n, far) distinct far positions, ascending, then -1. `faulty_rows` says which rows break
that; `SelectionCheck` wraps `score_and_select` for a run, counts rows and faulty rows, and keeps
the first faulty row's scores, lse and positions (README, Known issues: rare faulty rows). On the
first faulty call it also replays the "row" selection on copies of that call's own scores and
partials (`select_from_partials`): the whole launch, the faulty row's sequence alone, and the row
alone; `replays` says which of them give the faulty row again.
"""

from __future__ import annotations

from typing import Optional

import torch

from kcache_dist.kcache.selection import SelectionSpec


def faulty_rows(idx: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int, spec: SelectionSpec) -> torch.Tensor:
    """idx [B * Hkv, top_n] (row b * Hkv + h), seq_lens [B] -> bool [B * Hkv]: True where the row is
    not its sequence's min(top_n, far) far positions, ascending and distinct, followed by -1."""
    idx = idx.long().cpu()
    sink_end, window_start = torch.tensor([spec.split(int(n)) for n in seq_lens]).repeat_interleave(
        num_kv_heads, dim=0).unbind(1)
    want = (window_start - sink_end).clamp(max=idx.shape[1])
    slot = torch.arange(idx.shape[1])
    should_hold = slot[None, :] < want[:, None]
    valid = (idx >= sink_end[:, None]) & (idx < window_start[:, None])
    bad = (should_hold & ~valid).any(1) | (~should_hold & (idx != -1)).any(1)
    if idx.shape[1] > 1:
        bad |= (should_hold[:, 1:] & (idx[:, 1:] <= idx[:, :-1])).any(1)
    return bad


class SelectionCheck:
    """While installed, every `score_and_select` call that selects is checked (the device is
    synchronised after each: timings of a checked run mean nothing)."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0
        self.faulty = 0
        self.first_faulty: Optional[dict] = None
        self._module = None
        self._original = None

    def install(self) -> "SelectionCheck":
        from kcache_dist.kcache import triton_kcache

        self._module, self._original = triton_kcache, triton_kcache.score_and_select

        def checked(q, k_cache, block_tables, seq_lens, max_seq_len, spec, scale, cfg=None, select=True,
                    idx_out=None):
            result = self._original(q, k_cache, block_tables, seq_lens, max_seq_len, spec, scale, cfg, select,
                                    idx_out)
            if select and spec.top_n > 0 and not torch.cuda.is_current_stream_capturing():
                self.record(result, seq_lens, k_cache.shape[1], spec, cfg)
            return result
        triton_kcache.score_and_select = checked
        return self

    def uninstall(self) -> None:
        if self._module is not None:
            self._module.score_and_select = self._original
            self._module = None

    def record(self, result, seq_lens: torch.Tensor, num_kv_heads: int, spec: SelectionSpec, cfg=None) -> None:
        bad = faulty_rows(result.idx, seq_lens, num_kv_heads, spec)
        self.calls += 1
        self.rows += bad.numel()
        self.faulty += int(bad.sum())
        if bad.any() and self.first_faulty is None:
            r = int(bad.nonzero()[0])
            length = int(seq_lens[r // num_kv_heads])
            self.first_faulty = {"call": self.calls, "row": r, "rows": bad.numel(), "seq_len": length,
                                 "scores": result.scores[r, :, :length].float().cpu().clone(),
                                 "lse": result.lse[r].float().cpu().clone(), "idx": result.idx[r].cpu().clone()}
            if getattr(result, "split_max", None) is not None:
                self.first_faulty["replays"] = replay(result, seq_lens, num_kv_heads, spec, cfg, r)

    def summary(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "faulty_rows": self.faulty,
                "first_faulty": None if self.first_faulty is None else
                {k: v for k, v in self.first_faulty.items() if not torch.is_tensor(v)}}


def replay(result, seq_lens: torch.Tensor, num_kv_heads: int, spec: SelectionSpec, cfg, row: int) -> dict:
    """Whether row `row` of `result` is faulty again when the "row" selection reruns on copies of
    its scores and partials: for the whole launch, for its sequence's rows, and for the row alone."""
    from kcache_dist.kcache.triton_kcache import KPassConfig, select_from_partials

    cfg = KPassConfig() if cfg is None else cfg
    b, h = divmod(row, num_kv_heads)
    out = {}
    for name, rows, seqs, heads, local in (
            ("whole_launch", slice(None), slice(None), num_kv_heads, row),
            ("sequence_alone", slice(b * num_kv_heads, (b + 1) * num_kv_heads), slice(b, b + 1), num_kv_heads, h),
            ("row_alone", slice(row, row + 1), slice(b, b + 1), 1, 0)):
        scores = result.scores[rows]
        buffer = torch.empty(scores.shape[0], scores.shape[1], scores.stride(1), dtype=scores.dtype,
                             device=scores.device)
        copy = buffer[:, :, :scores.shape[2]]
        copy.copy_(scores)
        again = select_from_partials(copy, result.split_max[rows].clone(), result.split_sum[rows].clone(),
                                     seq_lens[seqs].clone(), spec, cfg, heads)
        out[name] = bool(faulty_rows(again.idx, seq_lens[seqs], heads, spec)[local])
    return out
