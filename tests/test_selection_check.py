"""benchmarks/selection_check.py: which selection rows break the kernel's contract, on hand-made rows,
and what a check of a run keeps."""

from __future__ import annotations

import os
import sys

import torch

from kcache_dist.kcache.selection import SelectionSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from selection_check import SelectionCheck, faulty_rows  # noqa: E402

SPEC = SelectionSpec(top_n=4, sink_tokens=2, recent_window=3, renormalize=True, group_reduce="max")


def test_faulty_rows_by_hand():
    # sequences 0 and 1: length 20, far range [2, 17), four positions; 2 and 3: length 7, far [2, 4), two
    rows = torch.tensor([
        [3, 5, 9, 16],      # right
        [2, 4, 8, 17],      # 17 is in the window
        [3, 5, -1, 16],     # a cleared slot inside the selection (the guarded fault)
        [3, 3, 9, 16],      # a position twice
        [2, 3, -1, -1],     # right (far has 2 positions)
        [2, 3, 5, -1],      # an entry past the far range
        [3, 2, -1, -1],     # not ascending
        [2, 3, -1, 7],      # padding not -1
    ], dtype=torch.int32)
    seq_lens = torch.tensor([20, 20, 7, 7])  # 2 KV heads each
    assert faulty_rows(rows, seq_lens, 2, SPEC).tolist() == [False, True, True, True, False, True, True, True]


def test_rows_with_no_far_positions_must_be_all_padding():
    seq_lens = torch.tensor([4])  # sink 2 + window 3 cover it
    assert faulty_rows(torch.full((1, 4), -1), seq_lens, 1, SPEC).tolist() == [False]
    assert faulty_rows(torch.tensor([[2, -1, -1, -1]]), seq_lens, 1, SPEC).tolist() == [True]


def test_check_counts_rows_and_keeps_the_first_faulty_one():
    from types import SimpleNamespace

    check = SelectionCheck()
    lens = torch.tensor([20])
    scores, lse = torch.randn(2, 4, 20), torch.randn(2, 4)
    check.record(SimpleNamespace(idx=torch.tensor([[3, 5, 9, 16], [2, 4, 6, 8]]), scores=scores, lse=lse), lens, 2, SPEC)
    check.record(SimpleNamespace(idx=torch.tensor([[3, 5, 9, 16], [2, -1, 6, 8]]), scores=scores, lse=lse), lens, 2,
                 SPEC)
    summary = check.summary()
    assert (summary["calls"], summary["rows"], summary["faulty_rows"]) == (2, 4, 1)
    assert summary["first_faulty"] == {"call": 2, "row": 1, "rows": 2, "seq_len": 20}
    assert torch.equal(check.first_faulty["idx"], torch.tensor([2, -1, 6, 8]))
    assert torch.equal(check.first_faulty["scores"], scores[1])
