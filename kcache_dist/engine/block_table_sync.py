"""Step plans to the tensor-parallel workers with only the block-table entries they lack.

A plan's block tables are most of its bytes: at 267 sequences of 8K tokens in 16-token blocks they
are 137K block ids, about 2 ms to pickle on the scheduling rank and 6 ms to unpickle on each worker,
every step, though a decode step appends a block to a sequence only every block_size steps. Both
ends keep a `BlockTableSync` holding the tables of the last plan sent; a `StepPlanDelta` carries,
per sequence, how many leading entries of its previous table still hold and the entries after
them. Both ends drop the tables of sequences absent from a plan (the same rule on both sides keeps
them equal), so a sequence that comes back is sent whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .step_plan import StepPlan


@dataclass
class StepPlanDelta:
    """A `StepPlan` whose block_tables are empty, and for its sequence i: `kept[i]` leading entries
    of the table this sequence had in the previous plan, followed by `appended[i]`."""

    plan: StepPlan
    kept: list[int]
    appended: list[list[int]]


class BlockTableSync:
    """The block tables of the last plan sent (or received), by sequence id."""

    def __init__(self) -> None:
        self._tables: dict[int, list[int]] = {}

    def encode(self, plan: StepPlan) -> StepPlanDelta:
        """On the scheduling rank: the message for `plan`; remembers its tables (the plan's own
        lists, which the scheduler builds afresh for every plan)."""
        kept, appended, tables = [], [], {}
        for seq_id, table in zip(plan.seq_ids, plan.block_tables):
            old = self._tables.get(seq_id)
            keep = len(old) if old is not None and len(old) <= len(table) and table[:len(old)] == old else 0
            kept.append(keep)
            appended.append(table[keep:])
            tables[seq_id] = table
        self._tables = tables
        return StepPlanDelta(dataclasses.replace(plan, block_tables=[]), kept, appended)

    def decode(self, delta: StepPlanDelta) -> StepPlan:
        """On a worker: the plan the scheduling rank encoded into `delta`."""
        tables = {}
        for seq_id, keep, new in zip(delta.plan.seq_ids, delta.kept, delta.appended):
            old = self._tables.get(seq_id)
            if keep and (old is None or keep > len(old)):
                raise RuntimeError(f"step plan out of sync: sequence {seq_id} keeps {keep} block(s) of a table of "
                                   f"{0 if old is None else len(old)}")
            if not keep:
                tables[seq_id] = list(new)
            elif keep == len(old):  # the common case: grown at the end (the previous plan is done with it)
                old.extend(new)
                tables[seq_id] = old
            else:
                tables[seq_id] = old[:keep] + new
        self._tables = tables
        return dataclasses.replace(delta.plan, block_tables=[tables[s] for s in delta.plan.seq_ids])
