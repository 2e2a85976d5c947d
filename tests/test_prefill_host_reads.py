"""The copies of a prefill chunk's earlier host rows (`cache/prefill_host_reads.py`): which blocks
are copied in which runs, the rows they give against the paged gather, and the step they belong to.
On CUDA also from a pinned pool, ordered after host writes of a side stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kcache_dist.cache.prefill_host_reads import PrefillHostReads, block_runs, earlier_lengths
from kcache_dist.forward_context import ForwardContext
from kcache_dist.layers.paged_attention import gather_context


def test_block_runs_split_at_every_break():
    assert block_runs(np.array([], dtype=np.int32)) == []
    assert block_runs(np.array([5], dtype=np.int32)) == [(0, 5, 1)]
    assert block_runs(np.array([7, 8, 9, 2, 3], dtype=np.int32)) == [(0, 7, 3), (3, 2, 2)]
    assert block_runs(np.array([4, 3, 2], dtype=np.int32)) == [(0, 4, 1), (1, 3, 1), (2, 2, 1)]
    assert block_runs(np.array([1, 2, 4, 5, 6, 0], dtype=np.int32)) == [(0, 1, 2), (2, 4, 3), (5, 0, 1)]


def step_context(tables: np.ndarray, seq_lens: list[int], new_tokens: list[int], num_decodes: int,
                 device: torch.device, host_tables: bool = True) -> ForwardContext:
    """A step's context as the model runner builds it, for the fields these reads use."""
    starts = np.concatenate(([0], np.cumsum(new_tokens))).tolist()
    n = len(seq_lens)
    return ForwardContext(positions=torch.zeros(starts[-1], dtype=torch.long, device=device),
                          slot_mapping=torch.zeros(starts[-1], dtype=torch.long, device=device),
                          block_tables=torch.from_numpy(tables).to(device),
                          seq_lens=torch.tensor(seq_lens, device=device), seq_lens_list=seq_lens,
                          max_seq_len=max(seq_lens), query_start_loc=starts, num_decodes=num_decodes,
                          hot_slots=torch.arange(n, device=device), hot_slots_list=list(range(n)), kv_cache=None,
                          block_tables_host=tables if host_tables else None)


def check_reads(device: torch.device, pool: torch.Tensor) -> None:
    """A decode, a prompt's first chunk and two later chunks (one table in runs, one scattered):
    only the later chunks get rows, equal to gathering their earlier positions from the pool."""
    g = torch.Generator().manual_seed(0)
    nb, bs = pool.shape[0], pool.shape[2]
    tables = np.zeros((4, 8), dtype=np.int32)
    tables[0, :3] = [9, 1, 2]
    tables[1, :2] = [3, 4]
    tables[2, :6] = [10, 11, 12, 5, 6, 13]
    tables[3, :5] = torch.randperm(nb, generator=g)[:5].numpy()
    seq_lens, new_tokens = [3 * bs - 2, 2 * bs - 1, 5 * bs + 3, 4 * bs + 1], [1, 2 * bs - 1, 7, bs]
    for host_tables in (True, False):
        ctx = step_context(tables, seq_lens, new_tokens, num_decodes=1, device=device, host_tables=host_tables)
        assert earlier_lengths(ctx) == {2: 5 * bs - 4, 3: 3 * bs + 1}
        reads = PrefillHostReads(device)
        reads.start(0, pool, ctx, None)
        rows = reads.take(0, pool, ctx, None)
        assert sorted(rows) == [2, 3]
        for i, got in rows.items():
            assert got.device.type == device.type
            want = gather_context(pool, torch.from_numpy(tables[i]), seq_lens[i] - new_tokens[i])
            assert torch.equal(got.cpu(), want), i
        # a take for another step (or without a start) reads that step's rows
        later = step_context(tables, [s + 1 for s in seq_lens], new_tokens, num_decodes=1, device=device)
        reads.start(1, pool, ctx, None)
        rows = reads.take(1, pool, later, None)
        assert rows[2].shape[1] == 5 * bs - 3
        assert torch.equal(rows[2].cpu(), gather_context(pool, torch.from_numpy(tables[2]), 5 * bs - 3))
    decode_only = step_context(tables, seq_lens, [1, 1, 1, 1], num_decodes=4, device=device)
    assert earlier_lengths(decode_only) == {}
    assert PrefillHostReads(device).take(0, pool, decode_only, None) == {}


def test_reads_give_the_earlier_positions_rows_on_cpu():
    pool = torch.randn(16, 2, 4, 8)
    check_reads(torch.device("cpu"), pool)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned pool, copy engine, streams)")
def test_reads_from_a_pinned_pool_on_cuda_wait_for_host_writes():
    from kcache_dist.cache.host_pool import HostPool

    device = torch.device("cuda", torch.cuda.current_device())
    host = HostPool(HostPool.bytes_for([(16, 2, 4, 8)], torch.float16), device)
    pool = host.take((16, 2, 4, 8), torch.float16)
    pool.copy_(torch.randn(16, 2, 4, 8).half())
    check_reads(device, pool)
    # rows written by a side stream just before: the copies wait for its event
    writer = torch.cuda.Stream(device)
    rows = torch.randn(16, 2, 4, 8, device=device).half()
    torch.cuda.synchronize(device)
    with torch.cuda.stream(writer):
        torch.cuda._sleep(10_000_000)  # the write lands well after the reads were queued
        pool.copy_(rows, non_blocking=True)
        written = torch.cuda.Event()
        written.record(writer)
    tables = np.arange(16, dtype=np.int32).reshape(2, 8)
    ctx = step_context(tables, [7 * 4, 8 * 4], [4, 4], num_decodes=0, device=device)
    got = PrefillHostReads(device).take(0, pool, ctx, written)
    torch.cuda.synchronize(device)
    assert torch.equal(got[0].cpu(), gather_context(rows.cpu(), torch.from_numpy(tables[0]), 6 * 4))
    assert torch.equal(got[1].cpu(), gather_context(rows.cpu(), torch.from_numpy(tables[1]), 7 * 4))
