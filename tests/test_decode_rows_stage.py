"""`DecodeRowsStage`: the chunk size, which copies a step calls for, and that a copy writes exactly
the staged rows of every sparse layer and KV head into the host pool (on CPU by the reference
copy; on CUDA by the copy engine, against the reference)."""

from __future__ import annotations

import pytest
import torch

from kcache_dist.cache.decode_rows_stage import DecodeRowsStage, stage_chunk_rows
from kcache_dist.cache.host_pool import HostPool

NUM_LAYERS, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, NUM_SLOTS = 3, 5, 2, 16, 3
# rows of 4 bfloat16: a (block, KV head) piece of 128 bytes divides the layers' 4 KiB stride (one
# copy for all layers); rows of 3: 96 bytes do not (a copy a layer)
WIDTHS = pytest.mark.parametrize("width", [4, 3], ids=["one_copy", "copy_per_layer"])


def test_chunk_rows_from_window_and_block_size():
    assert stage_chunk_rows(128, 256) == 64
    assert stage_chunk_rows(1024, 256) == 64  # at most MAX_CHUNK_ROWS
    assert stage_chunk_rows(32, 16) == 16
    assert stage_chunk_rows(32, 8) == 8
    assert stage_chunk_rows(128, 24) == 8  # a power of two dividing the block
    assert stage_chunk_rows(15, 256) == 0  # a chunk would be below 8 rows: no stage
    assert stage_chunk_rows(0, 256) == 0


def _pools(device: torch.device, width: int) -> tuple[HostPool, list[torch.Tensor]]:
    """Sparse layers' host pools [NB, Hkv, bs, width] bfloat16, consecutive in one HostPool
    (each 4 KiB-aligned), filled with -1."""
    shape = (NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, width)
    pool = HostPool(HostPool.bytes_for([shape] * NUM_LAYERS, torch.bfloat16), device)
    return pool, [pool.take(shape, torch.bfloat16).fill_(-1) for _ in range(NUM_LAYERS)]


def _decode(stage: DecodeRowsStage, slot: int, position: int) -> torch.Tensor:
    """Stage a decode row of `slot` at `position` in every layer: value 1000 * layer + position
    (+ 0.5 for the second KV head); the rows [NUM_LAYERS, Hkv, W]."""
    width = stage.stage.shape[-1]
    rows = torch.stack([torch.full((NUM_KV_HEADS, width), 1000.0 * layer + position) for layer in range(NUM_LAYERS)])
    rows[:, 1] += 0.5
    rows = rows.to(torch.bfloat16).to(stage.stage.device)
    for layer in range(NUM_LAYERS):
        stage.store(layer, rows[layer][None], torch.tensor([position], device=rows.device),
                    torch.tensor([slot], device=rows.device))
    return rows


def _expected_host(layers: list[torch.Tensor], writes: dict[tuple[int, int], torch.Tensor]) -> list[torch.Tensor]:
    """The pools as they should be: -1 but for rows written at (block, offset)."""
    expected = [torch.full_like(t, -1, device="cpu") for t in layers]
    for (block, offset), rows in writes.items():
        for layer in range(NUM_LAYERS):
            expected[layer][block, :, offset] = rows[layer].cpu()
    return expected


@WIDTHS
def test_copies_after_steps_write_the_closed_chunks(width):
    """Slot 1's sequence is prefilled to 13 tokens (block 4 holds positions 0-15), then decodes
    positions 13-23 (block 2 from 16): the step at 15 copies rows 13-15 (the chunk's earlier rows
    are the prefill's, left as they are), the step at 23 rows 16-23, the steps between nothing.
    With the layers' stride no whole number of (block, KV head) pieces, a copy a layer instead of
    one for all."""
    pool, layers = _pools(torch.device("cpu"), width)
    stage = DecodeRowsStage(layers, pool.buffer, NUM_SLOTS, 8, torch.device("cpu"))
    tables = {1: [4, 2]}

    def block_of(slot, index):
        return tables[slot][index]

    assert stage.copies_after_step([1], [0], [13], 0, block_of) == []  # a prefill: nothing staged
    writes, counts = {}, []
    for position in range(13, 24):
        writes[position] = _decode(stage, 1, position)
        copies = stage.copies_after_step([1], [position], [1], 1, block_of)
        counts.append(len(copies))
        stage.issue(copies, None)
        closed_end = 23 if position >= 23 else 15 if position >= 15 else 12
        expected = _expected_host(layers, {(block_of(1, q // BLOCK_SIZE), q % BLOCK_SIZE): rows
                                           for q, rows in writes.items() if q <= closed_end})
        assert all(torch.equal(got, want) for got, want in zip(layers, expected)), position
    per_step = 1 if width == 4 else NUM_LAYERS
    assert counts == [0, 0, per_step] + [0] * 7 + [per_step]


def test_pools_of_different_shapes_are_refused():
    pool = HostPool(HostPool.bytes_for([(2, 2, 16, 4), (3, 2, 16, 4)], torch.bfloat16), torch.device("cpu"))
    layers = [pool.take((2, 2, 16, 4), torch.bfloat16), pool.take((3, 2, 16, 4), torch.bfloat16)]
    with pytest.raises(ValueError, match="the sparse layers' host pools must have one shape and lie at a fixed stride"):
        DecodeRowsStage(layers, pool.buffer, NUM_SLOTS, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="stage chunk of 32 rows does not divide the block size 16"):
        DecodeRowsStage(layers[:1], pool.buffer, NUM_SLOTS, 32, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy engine path needs a CUDA device")
@WIDTHS
def test_copy_engine_copies_equal_the_reference(width):
    """Random staged rows of three slots, chunks closed at several offsets: the copies by the copy
    engine (cuMemcpy3DAsync into the pinned pool) leave the pool as the reference copies leave an
    ordinary one."""
    torch.manual_seed(0)
    cuda_pool, cuda_layers = _pools(torch.device("cuda"), width)
    cpu_pool, cpu_layers = _pools(torch.device("cpu"), width)
    assert cuda_pool.pinned
    cuda_stage = DecodeRowsStage(cuda_layers, cuda_pool.buffer, NUM_SLOTS, 8, torch.device("cuda"))
    cpu_stage = DecodeRowsStage(cpu_layers, cpu_pool.buffer, NUM_SLOTS, 8, torch.device("cpu"))
    values = torch.randn(cuda_stage.stage.shape).to(torch.bfloat16)
    cuda_stage.stage.copy_(values)
    cpu_stage.stage.copy_(values)
    tables = {0: [3, 1], 1: [0, 4], 2: [2, 2]}
    stream = torch.cuda.Stream()
    for stage, issue_on in ((cuda_stage, stream), (cpu_stage, None)):
        stage.copies_after_step([0, 1, 2], [0, 0, 0], [3, 9, 16], 0, lambda s, i: tables[s][i])  # prefills
        copies = stage.copies_after_step([0, 1, 2], [7, 15, 31], [1, 1, 1], 3, lambda s, i: tables[s][i])
        assert len(copies) == 3 * (1 if width == 4 else NUM_LAYERS)
        stage.issue(copies, issue_on)
    stream.synchronize()
    for got, want in zip(cuda_layers, cpu_layers):
        assert torch.equal(got, want)
    assert any((t != -1).any() for t in cpu_layers)
