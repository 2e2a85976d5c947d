"""The runners' block tables kept across steps (`engine/block_table_rows.py`): step after step of a
real scheduler, through growth, chunked prefill, preemption, aborts and hot slots passing to other
sequences, the rows gathered for a plan (and for each of its micro-batches) are its sequences'
tables padded afresh, on the scheduling rank and on a worker that gets the plans pickled; a running
sequence may sit steps out; a decode plan carries the new blocks only; a runner out of step says so."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from kcache_dist import SamplingParams
from kcache_dist.cache.block_manager import BlockManager
from kcache_dist.engine.block_table_rows import BlockTableRows, cache_slots
from kcache_dist.engine.scheduler import Scheduler
from kcache_dist.engine.sequence import Sequence
from kcache_dist.engine.step_plan import StepPlan


def _padded(tables: list[list[int]]) -> np.ndarray:
    """The tables as int32 [len(tables), longest], padded with block 0, built from scratch."""
    width = max(map(len, tables))
    return np.array([table + [0] * (width - len(table)) for table in tables], dtype=np.int32)


def _sequence(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, str(seq_id), None, list(range(num_tokens)), SamplingParams())


def test_rows_are_the_tables_padded_afresh_step_after_step():
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    block_size, max_num_seqs, max_model_len = 4, 8, 64
    scheduler = Scheduler(BlockManager(40, block_size), max_num_seqs, max_num_batched_tokens=6)
    scheduling_rank, worker = (BlockTableRows(max_num_seqs, max_model_len // block_size) for _ in range(2))
    seqs: dict[int, Sequence] = {}
    slot_holders: dict[int, set[int]] = {}
    kept_total = num_added = 0
    for step in range(800):
        while len(seqs) < 12 and rng.random() < 0.3:
            seq = _sequence(num_added, rng.randrange(1, 40))
            num_added += 1
            seqs[seq.seq_id] = seq
            scheduler.add(seq)
        if seqs and rng.random() < 0.05:  # aborted, running or waiting
            scheduler.finish(seqs.pop(rng.choice(list(seqs))))
        plan = scheduler.schedule()
        if plan is None:
            continue
        scheduling_rank.write(plan)
        worker.write(pickle.loads(pickle.dumps(plan)))
        want = _padded([seqs[s].block_table for s in plan.seq_ids])
        for rows in (scheduling_rank, worker):
            assert np.array_equal(rows.gather(plan.hot_slots), want), (seed, step)
            for part in plan.split(rng.randrange(2, 4)):
                assert np.array_equal(rows.gather(part.hot_slots), _padded([seqs[s].block_table for s in part.seq_ids]))
        kept_total += sum(plan.kept_blocks)
        for seq_id, slot in zip(plan.seq_ids, plan.hot_slots):
            slot_holders.setdefault(slot, set()).add(seq_id)
        for seq_id, n, sample in zip(plan.seq_ids, plan.num_new_tokens, plan.sample):  # the engine's step
            seq = seqs[seq_id]
            seq.num_computed_tokens += n
            if sample:
                seq.token_ids.append(0)
                if seq.num_tokens >= max_model_len or rng.random() < 0.05:
                    scheduler.finish(seqs.pop(seq_id))
    assert scheduler.num_preemptions > 0 and kept_total > 0, seed
    assert any(len(holders) > 1 for holders in slot_holders.values()), seed


def test_a_decode_plan_carries_the_new_blocks_only():
    scheduler = Scheduler(BlockManager(267 * 513, 16), 267, max_num_batched_tokens=267 * 8192)
    seqs = [_sequence(i, 8192 - 16 + i % 17) for i in range(267)]  # 267 sequences of 8K, some at a block's end
    for seq in seqs:
        scheduler.add(seq)
    prefill = scheduler.schedule()
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(0)
    decode = scheduler.schedule()
    assert decode.kept_blocks == [len(table) for table in prefill.new_blocks]
    grown = [s.block_table[-1:] if s.num_computed_tokens % 16 == 0 else [] for s in seqs]
    assert decode.new_blocks == grown and 0 < sum(map(len, grown)) < 267
    size = len(pickle.dumps(decode))
    assert size * 50 < len(pickle.dumps([s.block_table for s in seqs])), size


def _plan(seq_id: int, hot_slot: int, kept_blocks: int, new_blocks: list[int]) -> StepPlan:
    return StepPlan([seq_id], [1], [0], [0], [kept_blocks], [new_blocks], [hot_slot], [True])


def test_a_row_taken_anew_is_cleared_and_rows_are_padded_with_block_zero():
    rows = BlockTableRows(3, 8)
    rows.write(StepPlan([0, 1, 2], [1] * 3, [0] * 3, [0] * 3, [0] * 3, [[3, 9, 5], [4, 1, 8, 2, 6], [11]], [0, 1, 2],
                        [True] * 3))
    rows.write(_plan(7, 0, 0, [12]))  # slot 0 passes to another sequence, with a shorter table
    rows.write(_plan(2, 2, 1, [13]))  # sequence 1 sits these steps out ...
    rows.write(_plan(1, 1, 5, []))  # ... and comes back with its table as it was
    tables = rows.gather([0, 1, 2])
    assert tables.dtype == np.int32
    assert tables.tolist() == [[12, 0, 0, 0, 0], [4, 1, 8, 2, 6], [11, 13, 0, 0, 0]]
    assert cache_slots(tables, np.array([1, 1, 2]), np.array([5, 18, 6]), 4).tolist() == [5, 4 * 6 + 2, 13 * 4 + 2]


def test_a_runner_out_of_step_says_so():
    rows = BlockTableRows(2, 8)
    rows.write(_plan(5, 1, 0, [1, 2]))
    with pytest.raises(RuntimeError, match=r"^step plan out of sync: sequence 5 keeps 3 block\(s\) of hot slot 1, "
                                           r"which holds 2 of sequence 5$"):
        rows.write(_plan(5, 1, 3, [4]))  # a plan that added block 3 was missed
    with pytest.raises(RuntimeError, match="sequence 6 keeps 2 block"):
        rows.write(_plan(6, 1, 2, []))
    with pytest.raises(RuntimeError, match="which holds 0 of sequence None"):
        rows.write(_plan(5, 0, 2, []))
