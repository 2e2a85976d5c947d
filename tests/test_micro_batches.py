"""Micro-batched decode (EngineConfig.decode_micro_batches, engine/micro_batches.py): a decode step
split into micro-batches run block by block in turn (each on its own CUDA stream on a GPU) gives
the tokens of the whole step, in full and KCache modes, on CPU and on a GPU; a decode graph's
micro-batches are the right slices of its static rows (graphs themselves: test_cuda_graphs.py);
tensor parallel runs are in test_tp_engine.py."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, KCacheConfig, SamplingParams
from kcache_dist.engine.cuda_graphs import PAD_SLOT, DecodeGraphs
from kcache_dist.engine.micro_batches import part_bounds, run_interleaved
from kcache_dist.engine.step_plan import StepPlan

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]
MODES = {
    "full": KCacheConfig(mode="full"),
    "kcache": KCacheConfig(mode="kcache", top_n=8, dense_layers=1, sink_tokens=2, recent_window=8),
    "kcache-fp8": KCacheConfig(mode="kcache", top_n=8, dense_layers=1, sink_tokens=2, recent_window=8,
                               scoring_keys="fp8"),
}
# different lengths: the batch shrinks from 7 (parts of 2, 2, 3) to 1 (no split)
LENGTHS = [40, 6, 25, 12, 33, 3, 18]
PROMPT_LIST = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(len(LENGTHS))]


def test_split_keeps_every_sequence_and_token_in_order():
    plan = StepPlan(seq_ids=[5, 6, 7, 8, 9], num_new_tokens=[1, 1, 1, 3, 2], num_computed_tokens=[9, 8, 7, 0, 4],
                    token_ids=list(range(100, 108)), kept_blocks=[0, 0, 0, 0, 1],
                    new_blocks=[[1], [2], [3], [4, 5], []], hot_slots=[0, 1, 2, 3, 4],
                    sample=[True, True, True, False, True], micro_batches=2)
    parts = plan.split(2)
    assert [p.seq_ids for p in parts] == [[5, 6], [7, 8, 9]]
    assert [p.token_ids for p in parts] == [[100, 101], [102, 103, 104, 105, 106, 107]]
    assert [(p.kept_blocks, p.new_blocks) for p in parts] == [([0, 0], [[1], [2]]), ([0, 0, 1], [[3], [4, 5], []])]
    assert all(p.micro_batches == 1 for p in parts)
    assert [p.seq_ids for p in plan.split(9)] == [[5], [6], [7], [8], [9]]
    whole = plan.split(1)[0]
    assert (whole.seq_ids, whole.token_ids, whole.sample) == (plan.seq_ids, plan.token_ids, plan.sample)


def test_part_bounds():
    assert part_bounds(7, 3) == [0, 2, 4, 7]
    assert part_bounds(2, 5) == [0, 1, 2]
    assert part_bounds(4, 1) == [0, 4]
    assert part_bounds(0, 2) == [0, 0]


class RowEcho(torch.nn.Module):
    """A stand-in model whose hidden state of a row is that row's inputs: id, position, slot, length,
    hot slot, first block; it counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, ids, positions, ctx):
        self.calls += 1
        assert ctx.num_decodes == len(ids) == len(ctx.seq_lens_list) == len(ctx.query_start_loc) - 1
        return torch.stack([ids, positions, ctx.slot_mapping, ctx.seq_lens, ctx.hot_slots,
                            ctx.block_tables[:, 0].long()], 1)

    def blocks(self, ids, positions, ctx):
        yield ids[:, None]
        yield self(ids, positions, ctx)


def test_interleaved_blocks_run_in_turn_and_rejoin_the_streams_on_an_error(monkeypatch):
    """run_interleaved runs block 1 of every micro-batch, then block 2 of every one, ...; the side
    streams start after the current one and it continues after them, also when a block raises (else
    the next step could reuse memory that a side stream still reads)."""
    from kcache_dist.engine import micro_batches

    order = []

    class Ctx(str):  # a micro-batch's name, standing in for its ForwardContext
        positions = None

    class Model:
        def blocks(self, ids, positions, ctx):
            for block in range(3):
                if ctx == "fails" and block == 1:
                    raise RuntimeError("out of memory in block 1")
                order.append((ctx, block))
                yield ids + block

    class Stream:  # records the streams it was told to wait for
        def __init__(self, name):
            self.name, self.waited_for = name, []

        def wait_stream(self, other):
            self.waited_for.append(other.name)

    monkeypatch.setattr(micro_batches, "_on_stream", lambda stream: contextlib.nullcontext())
    ids = torch.zeros(2)
    main, side = Stream("main"), Stream("side")
    out = run_interleaved(Model(), [(ids, Ctx("a")), (ids, Ctx("b"))], [main, side])
    assert [o.tolist() for o in out] == [[2.0, 2.0], [2.0, 2.0]]
    assert order == [(c, b) for b in range(3) for c in ("a", "b")]
    assert (main.waited_for, side.waited_for) == (["side"], ["main"])
    order.clear()
    main, side = Stream("main"), Stream("side")
    with pytest.raises(RuntimeError, match="out of memory in block 1"):
        run_interleaved(Model(), [(ids, Ctx("a")), (ids, Ctx("fails"))], [main, side])
    assert order == [("a", 0), ("fails", 0), ("a", 1)]
    assert (main.waited_for, side.waited_for) == (["side"], ["main"])


def test_graph_micro_batches_are_slices_of_the_static_rows():
    class Cache:
        spare_hot_slot = 99

    model = RowEcho()
    graphs = DecodeGraphs(model, Cache(), max_num_seqs=8, max_model_len=64, block_size=4, device=torch.device("cpu"))
    n = 7  # batch bucket 8: one padding row
    tables = [[20 + i, 30 + i, 40 + i, 50 + i, 60 + i] for i in range(n)]
    plan = StepPlan(seq_ids=list(range(n)), num_new_tokens=[1] * n, num_computed_tokens=[10 + i for i in range(n)],
                    token_ids=[100 + i for i in range(n)], kept_blocks=[0] * n, new_blocks=tables,
                    hot_slots=[n - i for i in range(n)], sample=[True] * n)
    graphs._fill_inputs(plan, np.array(tables, dtype=np.int32), [11 + i for i in range(n)], 8)
    want = torch.tensor([[100 + i, 10 + i, tables[i][(10 + i) // 4] * 4 + (10 + i) % 4, 11 + i, n - i, 20 + i]
                         for i in range(n)]
                        + [[0, 0, PAD_SLOT, 1, 99, 0]])
    assert torch.equal(graphs.forward_static(8, 64, 1), want)
    assert model.calls == 1
    for parts in (2, 3, 8):
        model.calls = 0
        assert torch.equal(graphs.forward_static(8, 64, parts), want)
        assert model.calls == parts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(MODES))
def test_micro_batched_decode_equals_whole_decode(tiny_llama_dir, mode, device):
    results = {}
    for micro_batches in (1, 3):
        llm = LLM(model=tiny_llama_dir, dtype="float32", device=device, kcache=MODES[mode], enforce_eager=True,
                  max_num_seqs=8, decode_micro_batches=micro_batches)
        split_steps = []
        execute = llm.engine.runner._execute_micro_batches

        def counting(parts, execute=execute, split_steps=split_steps):
            split_steps.append(len(parts))
            return execute(parts)
        llm.engine.runner._execute_micro_batches = counting
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in LENGTHS]
        outputs = llm.generate(PROMPT_LIST, params)
        results[micro_batches] = (token_ids(outputs), getattr(llm.engine.runner.kv_cache, "v_rows_fetched", 0),
                                  split_steps)
    (whole, whole_rows, whole_splits), (split, split_rows, splits) = results[1], results[3]
    assert whole_splits == [] and set(splits) == {2, 3} and len(splits) > 10
    assert split == whole
    assert split_rows == whole_rows
    if mode != "full":
        assert whole_rows > 0


def test_micro_batches_must_be_a_positive_integer():
    from kcache_dist.config import EngineConfig

    with pytest.raises(ValueError, match="decode_micro_batches"):
        EngineConfig(decode_micro_batches=0)
