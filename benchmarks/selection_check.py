"""Check every KCache selection of a run on the host (slow): `throughput.py --check-selection`.

The Triton selection (`kcache_dist/kcache/triton_kcache.py`) must give each (sequence, KV head) row
min(top_n, far) distinct far positions, ascending, then -1. `faulty_rows` says which rows break
that; `SelectionCheck` wraps `score_and_select` for a run, counts rows and faulty rows, and keeps
the first faulty row's scores, lse and positions (README, Known issues: rare faulty rows). On the
first faulty call it also replays the "row" selection on copies of that call's own scores (each
row's whole buffer row, the bytes past the sequence end included) and partials
(`select_from_partials`): the whole launch, the faulty row's sequence alone, and the row alone;
`replays` says which of them give the faulty row again. The saved row (`<out>.faulty_row.pt` of
`throughput.py --check-selection`) replays in a process of its own:

    python benchmarks/selection_check.py run.faulty_row.pt

as saved, and with the scores past the sequence end replaced by 0, -inf and NaN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402


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
                self.first_faulty.update(
                    scores_buffer=buffer_rows(result.scores, slice(r, r + 1))[0].cpu().clone(),
                    context=result.scores.shape[2], split_max=result.split_max[r].cpu().clone(),
                    split_sum=result.split_sum[r].cpu().clone(), spec=dataclasses.asdict(spec),
                    cfg=dataclasses.asdict(cfg) if cfg is not None else None)
                self.first_faulty["replays"] = replay(result, seq_lens, num_kv_heads, spec, cfg, r)

    def summary(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "faulty_rows": self.faulty,
                "first_faulty": None if self.first_faulty is None else
                {k: v for k, v in self.first_faulty.items() if not torch.is_tensor(v)}}


def buffer_rows(scores: torch.Tensor, rows: slice) -> torch.Tensor:
    """The whole buffer rows [n, G, row stride] behind rows `rows` of a selection's scores view
    [rows, G, context] (`score_and_select` allocates whole key tiles per row: the stride)."""
    start, stop, _ = rows.indices(scores.shape[0])
    rows_total, g, stride = stop - start, scores.shape[1], scores.stride(1)
    return scores.as_strided((rows_total, g, stride), (g * stride, stride, 1),
                             scores.storage_offset() + start * g * stride)


def _select_again(scores_buffer: torch.Tensor, context: int, split_max: torch.Tensor, split_sum: torch.Tensor,
                  seq_lens: torch.Tensor, spec: SelectionSpec, cfg, num_kv_heads: int) -> torch.Tensor:
    """idx of the "row" selection on copies of scores_buffer [n, G, row stride] (scores in
    [..., :context]) and of the partials."""
    from kcache_dist.kcache.triton_kcache import KPassConfig, select_from_partials

    cfg = KPassConfig() if cfg is None else cfg
    scores = scores_buffer.clone()[:, :, :context]
    return select_from_partials(scores, split_max.clone(), split_sum.clone(), seq_lens.clone(), spec, cfg,
                                num_kv_heads).idx


def replay(result, seq_lens: torch.Tensor, num_kv_heads: int, spec: SelectionSpec, cfg, row: int) -> dict:
    """Whether row `row` of `result` is faulty again when the "row" selection reruns on copies of
    its scores (whole buffer rows) and partials: for the whole launch, for its sequence's rows, and
    for the row alone."""
    b, h = divmod(row, num_kv_heads)
    out = {}
    for name, rows, seqs, heads, local in (
            ("whole_launch", slice(None), slice(None), num_kv_heads, row),
            ("sequence_alone", slice(b * num_kv_heads, (b + 1) * num_kv_heads), slice(b, b + 1), num_kv_heads, h),
            ("row_alone", slice(row, row + 1), slice(b, b + 1), 1, 0)):
        idx = _select_again(buffer_rows(result.scores, rows), result.scores.shape[2], result.split_max[rows],
                            result.split_sum[rows], seq_lens[seqs], spec, cfg, heads)
        out[name] = bool(faulty_rows(idx, seq_lens[seqs], heads, spec)[local])
    return out


TAILS = {"as saved": None, "zero": 0.0, "-inf": float("-inf"), "nan": float("nan")}


def replay_saved(saved: dict, device: str) -> dict:
    """A saved faulty row (`SelectionCheck.first_faulty`) selected again on `device`, alone: whether
    it is faulty with its scores buffer as saved and with the scores past the sequence end set to
    each of TAILS."""
    from kcache_dist.kcache.triton_kcache import KPassConfig

    spec = SelectionSpec(**saved["spec"])
    cfg = KPassConfig(**saved["cfg"]) if saved.get("cfg") else None
    seq_lens = torch.tensor([saved["seq_len"]], device=device)
    out = {}
    for name, value in TAILS.items():
        buffer = saved["scores_buffer"].to(device)[None]
        if value is not None:
            buffer[:, :, saved["seq_len"]:] = value
        idx = _select_again(buffer, saved["context"], saved["split_max"].to(device)[None],
                            saved["split_sum"].to(device)[None], seq_lens, spec, cfg, 1)
        out[name] = bool(faulty_rows(idx, seq_lens, 1, spec)[0])
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python benchmarks/selection_check.py FAULTY_ROW.pt")
    saved = torch.load(argv[0], weights_only=False)
    if "scores_buffer" not in saved:
        raise SystemExit(f"{argv[0]} holds no scores buffer and partials (saved by an older --check-selection)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "row": saved["row"], "seq_len": saved["seq_len"],
                      "faulty_again": replay_saved(saved, device)}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
