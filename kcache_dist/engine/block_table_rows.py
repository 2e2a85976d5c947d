"""The running sequences' block tables, kept on the host across steps: one row per hot slot,
padded with block 0.

A step's block tables are one gather of its sequences' rows, where padding each sequence's list of
block ids afresh took ~2 ms a step at 267 sequences of 8K tokens in 16-token blocks, although a
decode step appends a block to a sequence only every block_size steps. A plan says, per sequence,
how many leading blocks of its table the row of its hot slot holds from earlier plans
(`StepPlan.kept_blocks`, from `Sequence.num_slot_blocks`) and the blocks after them
(`StepPlan.new_blocks`), so a decode step writes almost nothing, and what the scheduling rank sends
its tensor-parallel workers is small (~5 KB for that step, against 469 KB for whole tables).

This holds because a sequence's table only grows while it holds its hot slot: blocks are freed
(the table emptied) only when the sequence gives its slot up, finished, aborted or preempted, and a
sequence that gets a slot starts with none of its table in the slot's row. Every runner, on every
rank, writes every plan, in order.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .step_plan import StepPlan


class BlockTableRows:
    """Block tables int32 [num_hot_slots, max_blocks_per_seq], the row of a hot slot holding the
    table of the sequence in it as of the last plan that ran it."""

    def __init__(self, num_hot_slots: int, max_blocks_per_seq: int):
        self._rows = np.zeros((num_hot_slots, max_blocks_per_seq), dtype=np.int32)
        self._num_blocks = [0] * num_hot_slots
        self._seq_ids: list[Optional[int]] = [None] * num_hot_slots

    def write(self, plan: StepPlan) -> None:
        """Bring the rows of the plan's hot slots to its sequences' tables; RuntimeError if a
        sequence keeps blocks that its row does not hold (a plan missed or run twice)."""
        for seq_id, slot, kept, new in zip(plan.seq_ids, plan.hot_slots, plan.kept_blocks, plan.new_blocks):
            if kept and (self._seq_ids[slot] != seq_id or self._num_blocks[slot] != kept):
                raise RuntimeError(f"step plan out of sync: sequence {seq_id} keeps {kept} block(s) of hot slot "
                                   f"{slot}, which holds {self._num_blocks[slot]} of sequence {self._seq_ids[slot]}")
            if new or not kept:
                end = kept + len(new)
                row = self._rows[slot]
                row[kept:end] = new
                if not kept:
                    row[end:] = 0
                self._num_blocks[slot] = end
                self._seq_ids[slot] = seq_id

    def block(self, hot_slot: int, index: int) -> int:
        """Block `index` of the table of the sequence in `hot_slot`."""
        return int(self._rows[hot_slot, index])

    def gather(self, hot_slots: list[int]) -> np.ndarray:
        """The tables of the sequences in `hot_slots`, int32 [len(hot_slots), longest of them]
        padded with block 0 (a copy: later writes leave it as it is)."""
        width = max(self._num_blocks[slot] for slot in hot_slots)
        return self._rows[hot_slots, :width]


def cache_slots(block_tables: np.ndarray, seq_rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slot int64 [T] of each of T tokens: the token at `positions[t]` of the sequence whose
    table is row `seq_rows[t]` of `block_tables` [S, W]."""
    return block_tables[seq_rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
