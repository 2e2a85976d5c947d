"""Micro-batched decode: a decode step's sequences split into contiguous groups that run block by
block in turn (each layer's attention block, then its MLP block, each ending in the tensor-parallel
all-reduce), each group on its own CUDA stream, so that one group's V fetch from host memory or its
all-reduce runs while another group's kernels run. The model runner runs it op by op
(`ModelRunner._execute_micro_batches`) and `DecodeGraphs` captures it into a decode graph: the
streams' fork and join are then part of the graph, and so are the launch gaps that op-by-op
micro-batches add (twice the launches of a whole step)."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..forward_context import ForwardContext
from ..parallel import all_reduce_slot

def part_bounds(num_rows: int, parts: int) -> list[int]:
    """Bounds [0, ..., num_rows] of `parts` contiguous groups of near-equal size (at most num_rows
    groups, at least one)."""
    parts = max(1, min(parts, num_rows))
    return [num_rows * i // parts for i in range(parts + 1)]


class MicroBatchStreams:
    """The streams micro-batch i runs on: the current stream for i = 0, side streams made once per
    device for the rest (None on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._side: list = []

    def get(self, count: int) -> list[Optional[torch.cuda.Stream]]:
        if self.device.type != "cuda":
            return [None] * count
        while len(self._side) < count - 1:
            self._side.append(torch.cuda.Stream(self.device))
        return [torch.cuda.current_stream(self.device)] + self._side[: count - 1]


def run_interleaved(model, inputs: Sequence[tuple[torch.Tensor, ForwardContext]],
                    streams: Sequence[Optional[torch.cuda.Stream]]) -> list[torch.Tensor]:
    """The final hidden states [T_i, hidden] of each micro-batch i, given its (input ids [T_i],
    context), run through `model.blocks` one block of each in turn, micro-batch i on streams[i]
    (streams[0] is the current stream). The side streams start after the work already issued on the
    current stream (the inputs were made there) and the current stream continues after theirs, so
    later work on any stream follows this step; the same holds inside a CUDA-graph capture, and
    also when a block raises (the side streams rejoin before the error goes on, so that nothing
    freed on the current stream is reused while a side stream still reads it)."""
    main, side = streams[0], [s for s in streams[1:] if s is not None]
    for stream in side:
        stream.wait_stream(main)
    steps = [model.blocks(ids, ctx.positions, ctx) for ids, ctx in inputs]
    last: list = [None] * len(inputs)
    try:
        running = True
        while running:
            running = False
            for i, blocks in enumerate(steps):
                with _on_stream(streams[i]), all_reduce_slot(i):
                    hidden = next(blocks, None)
                if hidden is not None:
                    last[i], running = hidden, True
    finally:
        for blocks in steps:
            blocks.close()
        for stream in side:
            main.wait_stream(stream)
    return last


def _on_stream(stream):
    """`torch.cuda.stream(stream)`, or nothing for None (CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
