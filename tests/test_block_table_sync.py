"""Step plans sent to tensor-parallel workers as block-table deltas (`engine/block_table_sync.py`):
what a worker decodes is the plan the scheduling rank encoded, step after step, through growth,
resets, sequences leaving and coming back; and a decode step's message is small."""

from __future__ import annotations

import pickle
import random

import pytest

from kcache_dist.engine.block_table_sync import BlockTableSync, StepPlanDelta
from kcache_dist.engine.step_plan import StepPlan


def _plan(tables: dict[int, list[int]]) -> StepPlan:
    ids = sorted(tables)
    return StepPlan(seq_ids=ids, num_new_tokens=[1] * len(ids), num_computed_tokens=[7] * len(ids),
                    token_ids=list(range(len(ids))), block_tables=[list(tables[s]) for s in ids],
                    hot_slots=list(range(len(ids))), sample=[True] * len(ids))


def test_workers_decode_the_plans_the_scheduler_encoded():
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    sender, receiver = BlockTableSync(), BlockTableSync()
    live: dict[int, list[int]] = {}
    next_id, next_block = 0, 0
    kept_total = 0
    for step in range(300):
        for seq_id in list(live):
            r = rng.random()
            if r < 0.05:
                del live[seq_id]  # finished, or preempted and waiting
            elif r < 0.08:  # preempted and readmitted: a new table, sometimes starting with the same block
                live[seq_id] = live[seq_id][:1] + [next_block] if rng.random() < 0.5 else [next_block]
                next_block += 1
            elif r < 0.10:  # a shorter table with the same first blocks
                live[seq_id] = live[seq_id][:max(1, len(live[seq_id]) // 2)]
            elif r < 0.40:
                live[seq_id].append(next_block)
                next_block += 1
        while len(live) < 12 and rng.random() < 0.7:
            live[next_id] = list(range(next_block, next_block + rng.randrange(1, 5)))
            next_block += len(live[next_id])
            next_id += 1
        scheduled = {s: t for s, t in live.items() if rng.random() < 0.9}  # some running sequences sit out
        if not scheduled:
            continue
        plan = _plan(scheduled)
        delta = sender.encode(plan)
        kept_total += sum(delta.kept)
        got = receiver.decode(pickle.loads(pickle.dumps(delta)))
        assert got == plan, (seed, step)
    assert kept_total > 0, seed  # the deltas were used, not only whole tables


def test_a_decode_step_sends_its_new_blocks_only():
    tables = {s: list(range(s * 512, (s + 1) * 512)) for s in range(267)}  # 267 sequences of 8K in 16-token blocks
    sender, receiver = BlockTableSync(), BlockTableSync()
    first = pickle.dumps(sender.encode(_plan(tables)))
    receiver.decode(pickle.loads(first))
    tables[3].append(10 ** 6)
    delta = sender.encode(_plan(tables))
    assert delta.appended[3] == [10 ** 6] and sum(map(len, delta.appended)) == 1
    assert delta.plan.block_tables == [] and delta.kept[3] == 512
    size = len(pickle.dumps(delta))
    assert size * 50 < len(pickle.dumps(_plan(tables))), size
    assert receiver.decode(pickle.loads(pickle.dumps(delta))).block_tables[3][-2:] == [3 * 512 + 511, 10 ** 6]


def test_a_worker_out_of_step_says_so():
    sender = BlockTableSync()
    sender.encode(_plan({5: [1, 2]}))
    delta = sender.encode(_plan({5: [1, 2, 3]}))
    assert isinstance(delta, StepPlanDelta)
    with pytest.raises(RuntimeError, match=r"^step plan out of sync: sequence 5 keeps 2 block\(s\) of a table of 0$"):
        BlockTableSync().decode(delta)
