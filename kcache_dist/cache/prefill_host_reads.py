"""A prefill chunk's read of its earlier chunks' host rows, by copy engine, one layer ahead.

A later chunk of a long prompt attends to every earlier position of it, and in KCache mode those
positions' V (K | V with fp8 scoring keys) of the sparse layers lie in the pinned host pool. Read
by SM loads when the layer's attention runs, they kept the GPU waiting on PCIe: a 32K prompt on one
H100 took 1.73 s against 1.67 s without the read (1.82 s against 1.69 s with fp8 scoring keys,
twice the bytes; benchmarks/notes/throughput.md, "Prefill"). Here the whole blocks that hold a
sequence's earlier positions are copied host -> device by the copy engine on a stream of their own
(`PrefillHostReads.stream`), started for sparse layer s when layer s - 1 begins its attention, so
the transfer can run beside that layer's attention and MLP (copy-engine transfers overlap
HBM-bound kernels, where SM reads of host memory did not: benchmarks/notes/kpass_fetch.md). A run
of consecutive block ids is one copy. Measured, it takes 40-45% of the read's cost off the prompt
(1.73 -> 1.70 s and 1.80 -> 1.75 s in one run).

Ordering: the copy of a layer waits, on the GPU, for the host writes of that layer issued so far
(the offload stream's event) and for every kernel queued on the compute stream before it (so the
device buffer it fills, taken from the compute stream's memory, is free). The layer's attention
waits for the copy's event. Prefill steps are never captured in CUDA graphs. Without CUDA the same
blocks are copied at once, in order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..forward_context import ForwardContext


def block_runs(blocks: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive block ids in `blocks` [n]: (index of the run's first entry, its first
    block id, run length), in order; e.g. [7, 8, 9, 2, 3] -> [(0, 7, 3), (3, 2, 2)]."""
    if len(blocks) == 0:
        return []
    starts = np.concatenate(([0], np.flatnonzero(np.diff(blocks) != 1) + 1))
    ends = np.append(starts[1:], len(blocks))
    return [(int(s), int(blocks[s]), int(e - s)) for s, e in zip(starts, ends)]


def earlier_lengths(ctx: ForwardContext) -> dict[int, int]:
    """{sequence index: positions before its new tokens} of the step's prefill chunks that have
    earlier positions (later chunks of a prompt; a prompt's first chunk has none)."""
    lengths = {}
    for i in range(ctx.num_decodes, ctx.num_seqs):
        earlier = ctx.seq_lens_list[i] - (ctx.query_start_loc[i + 1] - ctx.query_start_loc[i])
        if earlier:
            lengths[i] = earlier
    return lengths


@dataclass
class _LayerReads:
    ctx: ForwardContext  # the step the blocks were read for
    lengths: dict[int, int]  # sequence index -> its earlier positions (`earlier_lengths`)
    blocks: dict[int, torch.Tensor]  # sequence index -> [nb, Hkv, bs, W] on the device
    done: Optional[torch.cuda.Event]  # recorded on the read stream after the copies (None: copied at once)


class PrefillHostReads:
    """Reads of the earlier positions' host rows of a step's prefill chunks, per sparse layer:
    `start` queues a layer's copies, `take` returns its rows (starting them first if no `start`
    came for this step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, _LayerReads] = {}

    def start(self, sparse: int, host_rows: torch.Tensor, ctx: ForwardContext,
              host_writes_done: Optional[torch.cuda.Event]) -> None:
        """Queue the copies of sparse layer `sparse`'s blocks that hold the earlier positions of
        ctx's prefill chunks, from host_rows [NB, Hkv, bs, W] (the layer's host pool), after
        `host_writes_done` (the layer's last host write; None: nothing to wait for). No-op when
        the step has no such chunk."""
        lengths = earlier_lengths(ctx)
        if not lengths:
            self._pending.pop(sparse, None)
            return
        tables = ctx.block_tables_host if ctx.block_tables_host is not None else ctx.block_tables.cpu().numpy()
        bs = host_rows.shape[2]
        blocks = {i: torch.empty((-(-n // bs), *host_rows.shape[1:]), dtype=host_rows.dtype, device=self.device)
                  for i, n in lengths.items()}
        done = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # `blocks` is free from here on
            if host_writes_done is not None:
                self.stream.wait_event(host_writes_done)
            done = torch.cuda.Event()
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for i, out in blocks.items():
                for first, block_id, n in block_runs(tables[i, : out.shape[0]]):
                    out[first:first + n].copy_(host_rows[block_id:block_id + n], non_blocking=True)
            if done is not None:
                done.record(self.stream)
        self._pending[sparse] = _LayerReads(ctx, lengths, blocks, done)

    def take(self, sparse: int, host_rows: torch.Tensor, ctx: ForwardContext,
             host_writes_done: Optional[torch.cuda.Event]) -> dict[int, torch.Tensor]:
        """{sequence index: its earlier positions' rows [Hkv, L, W] on the device} for sparse layer
        `sparse` of ctx's prefill chunks (`start`'s arguments); the current stream waits for them."""
        reads = self._pending.pop(sparse, None)
        if reads is None or reads.ctx is not ctx:
            self.start(sparse, host_rows, ctx, host_writes_done)
            reads = self._pending.pop(sparse, None)
            if reads is None:
                return {}
        if reads.done is not None:
            torch.cuda.current_stream(self.device).wait_event(reads.done)
        return {i: out.transpose(0, 1).flatten(1, 2)[:, :reads.lengths[i]] for i, out in reads.blocks.items()}
