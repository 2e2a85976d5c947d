"""benchmarks/throughput.py: the decode-step byte accounting against hand-computed numbers, and a
CPU run of the whole script on a tiny named shape whose JSON fields exist and agree."""

from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from kcache_dist.cache.decode_traffic import DecodeStepBytes, decode_step_bytes
from kcache_dist.cache.planner import CacheGeometry
from kcache_dist.cache.store_rows import store_rows
from kcache_dist.kcache.selection import SelectionSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def geometry(mode: str, **changes) -> CacheGeometry:
    fields = dict(mode=mode, num_layers=4, dense_layers=1, num_kv_heads=2, head_dim=8, dtype_bytes=2, block_size=16)
    fields.update(changes)
    return CacheGeometry(**fields)


SPEC = SelectionSpec(top_n=5, sink_tokens=2, recent_window=3, renormalize=True, group_reduce="max")


def test_decode_step_bytes_by_hand():
    # A row is 2 KV heads x 8 x 2 bytes = 32 bytes. Sequences of 20, 6 and 1 positions (27 in all):
    #   20: sink [0, 2), window [17, 20): 5 hot rows; 15 far, top 5 fetched
    #    6: sink [0, 2), window [3, 6):   5 hot rows;  1 far, fetched
    #    1: sink [0, 1), no window:       1 hot row;   0 far
    kc = decode_step_bytes(geometry("kcache"), 1000, [20, 6, 1], SPEC)
    assert kc == DecodeStepBytes(weight_bytes=1000, k_bytes=4 * 27 * 32, dense_v_bytes=1 * 27 * 32,
                                 hot_v_bytes=3 * 11 * 32, far_v_bytes=3 * 6 * 32)
    assert (kc.hbm_bytes, kc.pcie_bytes) == (1000 + 3456 + 864 + 1056, 576)
    full = decode_step_bytes(geometry("full"), 1000, [20, 6, 1], SPEC)
    assert full == DecodeStepBytes(1000, 3456, 3456, 0, 0)
    assert (full.hbm_bytes, full.pcie_bytes) == (7912, 0)
    # roofline = max(6376 B / 1000 B/s, 576 B / pcie rate)
    assert kc.roofline_s(1000, 100) == pytest.approx(6.376) and kc.bound_by(1000, 100) == "hbm"
    assert kc.roofline_s(1000, 50) == pytest.approx(11.52) and kc.bound_by(1000, 50) == "pcie"
    assert full.roofline_s(1000, 1) == pytest.approx(7.912) and full.bound_by(1000, 1) == "hbm"


def test_decode_step_bytes_llama3_8b_shape():
    # One sequence of 8192 positions, bf16, 8 KV heads x 128: a row is 2048 bytes per layer.
    shape = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2, block_size=256, dense_layers=2)
    full = decode_step_bytes(CacheGeometry(mode="full", **shape), 0, [8192], SPEC)
    assert full.hbm_bytes == 1 << 30  # K and V of 32 layers x 8192 tokens x 2048 bytes = 1 GiB
    spec = SelectionSpec(top_n=256, sink_tokens=4, recent_window=128, renormalize=True, group_reduce="max")
    kc = decode_step_bytes(CacheGeometry(mode="kcache", **shape), 0, [8192], spec)
    assert kc.k_bytes == 512 << 20 and kc.dense_v_bytes == 32 << 20
    assert kc.hot_v_bytes == 30 * 132 * 2048 and kc.far_v_bytes == 30 * 256 * 2048  # 15 MiB over PCIe
    # fp8 scoring keys: a sparse layer's K is 8 heads x (128 fp8 bytes + a 4-byte scale) a token, and
    # the hot and far rows carry K and V
    fp8 = decode_step_bytes(CacheGeometry(mode="kcache", fp8_scoring_keys=True, **shape), 0, [8192], spec)
    assert fp8.k_bytes == 8192 * (2 * 2048 + 30 * 8 * 132) and fp8.dense_v_bytes == kc.dense_v_bytes
    assert fp8.hot_v_bytes == 2 * kc.hot_v_bytes and fp8.far_v_bytes == 2 * kc.far_v_bytes


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    out = str(tmp_path_factory.mktemp("throughput") / "throughput_tiny.json")
    # A cache of 2.5 MiB: 6 sequences of 128 tokens in full mode (3 KiB a token); 5 in KCache mode.
    argv = ["--model", "tiny-llama", "--device", "cpu", "--contexts", "128,256", "--batches", "auto",
            "--decode-tokens", "4", "--warmup-steps", "1", "--cpu-kv-cache-gb", "0.0025", "--host-memory-gb", "0.004",
            "--top-n", "16", "--dense-layers", "1", "--sink-tokens", "4", "--recent-window", "16", "--out", out]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and does not fight other processes for cores
    try:
        returned = throughput.main(argv)
    finally:
        torch.set_num_threads(threads)
    with open(out, encoding="utf-8") as f:
        written = json.load(f)
    return returned, written, out


def test_cpu_run_writes_consistent_points(cpu_run):
    returned, result, out = cpu_run
    assert result["errors"] == [] and result["points"]
    assert json.loads(json.dumps(returned)) == result
    assert {p["mode"] for p in result["points"]} == {"full", "kcache"}
    plans = {(p["mode"], p["context"]): p for p in result["plans"]}
    assert plans[("full", 128)]["max_batch"] == 6 and plans[("full", 256)]["max_batch"] == 3
    bw = result["bandwidth"]
    for p in result["points"]:
        plan = plans[(p["mode"], p["context"])]
        same = [q for q in result["points"] if (q["mode"], q["context"]) == (p["mode"], p["context"])]
        batches = sorted({q["batch"] for q in same})
        assert batches[-1] == plan["max_batch"] == p["plan_max_batch"]  # auto: powers of two, then the plan's max
        assert batches[:-1] == [2 ** i for i in range(len(batches) - 1)]
        # every batch timed whole and as 2 micro-batches (the default --micro-batches 1,2; no graphs on CPU)
        assert sorted((q["batch"], q["micro_batches"]) for q in same) == [(b, m) for b in batches for m in (1, 2)]
        assert p["decode_tokens_per_s"] == pytest.approx(p["batch"] * p["num_steps"] / p["window_s"])
        assert p["decode_tokens_per_s"] == pytest.approx(p["batch"] / p["step_s_mean"])
        assert p["step_s_min"] <= p["step_s_median"] <= p["step_s_max"]
        assert p["prompt_tokens"] < p["mean_seq_len"] <= p["context"]
        hbm_s = p["hbm_bytes_per_step"] / (bw["hbm_copy_GBps"] * 1e9)
        pcie_s = p["pcie_bytes_per_step"] / (bw["h2d_GBps"] * 1e9)
        assert p["roofline_step_s"] == pytest.approx(max(hbm_s, pcie_s), rel=1e-3)
        assert p["roofline_fraction"] == pytest.approx(p["roofline_step_s"] / p["step_s_mean"])
        assert p["step_over_roofline"] == pytest.approx(1 / p["roofline_fraction"])
        b = p["bytes_per_step"]
        assert p["hbm_bytes_per_step"] == b["weight_bytes"] + b["k_bytes"] + b["dense_v_bytes"] + b["hot_v_bytes"]
        assert b["weight_bytes"] == plan["weight_bytes_per_decode_step"]
        # the engine's own count of far V rows read from host memory equals the model's PCIe bytes
        assert p["v_bytes_fetched_per_step"] == pytest.approx(p["pcie_bytes_per_step"], abs=1)
        assert p["v_GBps"] == pytest.approx(p["v_bytes_fetched_per_step"] / p["step_s_mean"] / 1e9)
        assert p["preemptions"] == 0 and p["prefill_tokens_per_s"] > 0 and p["ttft_s"] > 0
        if p["mode"] == "full":
            assert p["pcie_bytes_per_step"] == 0 and p["host_v_pool_bytes"] == 0 and b["dense_v_bytes"] == b["k_bytes"]
        else:
            assert p["pcie_bytes_per_step"] > 0 and b["hot_v_bytes"] > 0
            assert 0 < p["host_v_bytes_in_use"] <= p["host_v_pool_bytes"] == plan["host_v_pool_bytes"]
    for pre in result["prefill"]:
        assert pre["prefill_tokens_per_s"] == pytest.approx(pre["prefill_seqs"] * pre["prompt_tokens"]
                                                            / pre["prefill_wall_s"])
    hf = result["hf_baseline"]["points"]
    assert [h["context"] for h in hf] == [128, 256] and [h["batch"] for h in hf] == [6, 3]  # full mode's batch
    for h in hf:
        assert h["decode_tokens_per_s"] == pytest.approx(h["batch"] * 3 / h["decode_s"])
        assert h["prefill_tokens_per_s"] == pytest.approx(h["batch"] * h["prompt_tokens"] / h["first_token_s"])
    for context, row in result["summary"].items():
        assert row["kcache_over_full_decode"] == pytest.approx(row["kcache_decode_tokens_per_s"]
                                                               / row["full_decode_tokens_per_s"])
        assert set(row["targets"]) == {"kcache_over_full_decode", "kcache_step_over_roofline",
                                       "kcache_over_hf_decode", "prefill_kcache_over_full"}
    prefix = out.removesuffix(".json")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(prefix + "_decode.png") > 0 and os.path.getsize(prefix + "_roofline.png") > 0


def test_reserve_keeps_every_sequence_within_the_context():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    # 90 prompts of up to 8192 tokens, 8192-token steps: each step prefills >= 8102 tokens, so the
    # prompts are in after at most ceil(90 * 8192 / 8102) + 1 = 92 steps; then 8 points x 36 steps.
    assert throughput.decode_reserve_tokens(90, 8192, 8192, 8, 36) == 92 + 288 + 1
    assert throughput.batch_sizes("auto", 90) == ([1, 2, 4, 8, 16, 32, 64, 90], [])
    assert throughput.batch_sizes("auto", 64) == ([1, 2, 4, 8, 16, 32, 64], [])
    assert throughput.batch_sizes("max", 7) == ([7], [])
    assert throughput.batch_sizes([1, 4, 16], 8) == ([1, 4], [16])
    assert math.isfinite(throughput.GB)


def test_profile_all_reduce_overlap_from_timings():
    """benchmarks/profile_decode.py: the all-reduce cost of a path is its time with minus without
    them; the hidden fraction compares the overlapped path's cost (micro-batches), or the two-shot
    all-reduce's, with the whole one's."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_decode import all_reduce_overlap, all_reduce_overlaps

    ms = {"cuda_graph": 30.0, "cuda_graph_no_all_reduce": 20.0, "cuda_graph_2_micro_batches": 26.0,
          "cuda_graph_2_micro_batches_no_all_reduce": 24.0, "cuda_graph_two_shot": 23.5,
          "cuda_graph_two_shot_no_all_reduce": 21.0, "eager": 50.0}
    # the split's own work is slower (24 vs 20 ms without all-reduces): overall it pays 6 of the 10 ms
    split = {"all_reduce_ms_cuda_graph": 10.0, "all_reduce_ms_cuda_graph_2_micro_batches": 2.0,
             "all_reduce_hidden_fraction_cuda_graph_2_micro_batches": 0.8,
             "all_reduce_ms_cuda_graph_2_micro_batches_overall": 6.0,
             "all_reduce_hidden_fraction_cuda_graph_2_micro_batches_overall": 0.4}
    assert all_reduce_overlap(ms, "cuda_graph", "cuda_graph_2_micro_batches") == pytest.approx(split)
    # the two-shot step's own work is slower too (21 ms): 2.5 ms against 3.5 overall
    two_shot = {"all_reduce_ms_cuda_graph": 10.0, "all_reduce_ms_cuda_graph_two_shot": 2.5,
                "all_reduce_hidden_fraction_cuda_graph_two_shot": 0.75,
                "all_reduce_ms_cuda_graph_two_shot_overall": 3.5,
                "all_reduce_hidden_fraction_cuda_graph_two_shot_overall": 0.65}
    assert all_reduce_overlap(ms, "cuda_graph", "cuda_graph_two_shot") == pytest.approx(two_shot)
    # a split whose own work is faster (18 ms) is measured from there, not from the whole step's 20
    faster = all_reduce_overlap({**ms, "cuda_graph_2_micro_batches_no_all_reduce": 18.0}, "cuda_graph",
                                "cuda_graph_2_micro_batches")
    assert faster["all_reduce_ms_cuda_graph_2_micro_batches"] == pytest.approx(8.0)
    assert faster["all_reduce_ms_cuda_graph_2_micro_batches_overall"] == pytest.approx(8.0)
    assert all_reduce_overlap(ms, "eager", "eager_2_micro_batches") == {}  # one GPU: no "no all-reduce" runs
    assert all_reduce_overlaps(ms, 2) == pytest.approx({**split, **two_shot})
    # with one-element all-reduces instead (the ranks meet, no bytes move): 10 ms = 7 meeting + 3 bytes
    meeting = {**ms, "cuda_graph_meeting_only": 27.0, "cuda_graph_2_micro_batches_meeting_only": 25.0}
    assert all_reduce_overlaps(meeting, 2) == pytest.approx({
        **split, **two_shot, "all_reduce_meeting_ms_cuda_graph": 7.0, "all_reduce_bytes_ms_cuda_graph": 3.0,
        "all_reduce_meeting_ms_cuda_graph_2_micro_batches": 1.0, "all_reduce_bytes_ms_cuda_graph_2_micro_batches": 1.0})


def test_profile_steps_without_collectives(monkeypatch):
    """benchmarks/profile_decode.py: the steps "without all-reduces" run no collective at all (the
    logits' gather becomes copies of the rank's own part), so that each rank's time is its own; the
    layers' collectives are back afterwards, also when the step raises."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode
    from kcache_dist.layers import embedding, linear
    from kcache_dist.parallel import ParallelState

    monkeypatch.setattr(profile_decode, "current_state", lambda: ParallelState(tp_size=2))
    originals = (linear.tp_all_reduce, embedding.tp_all_reduce, embedding.tp_gather_last_dim)
    x = torch.randn(3, 5)

    def step(plan):
        assert linear.tp_all_reduce(x) is x and embedding.tp_all_reduce(x) is x
        torch.testing.assert_close(embedding.tp_gather_last_dim(x), torch.cat([x, x], dim=-1))
        if plan == "fail":
            raise RuntimeError("step failed")
        return plan

    assert profile_decode._without_all_reduce(step)("plan") == "plan"
    with pytest.raises(RuntimeError, match="step failed"):
        profile_decode._without_all_reduce(step)("fail")
    assert (linear.tp_all_reduce, embedding.tp_all_reduce, embedding.tp_gather_last_dim) == originals


def test_profile_steps_meeting_only(monkeypatch):
    """benchmarks/profile_decode.py: in the steps "meeting only" each of the layers' all-reduces is
    replaced by an all-reduce of one zero element (the ranks meet as often, no activations move) and
    the activations pass unchanged; the layers' all-reduces are back afterwards, also when the step
    raises."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode
    from kcache_dist.layers import embedding, linear

    summed = []
    monkeypatch.setattr(linear, "tp_all_reduce", lambda t: summed.append(t.clone()) or t)
    monkeypatch.setattr(embedding, "tp_all_reduce", linear.tp_all_reduce)
    originals = (linear.tp_all_reduce, embedding.tp_all_reduce)
    x = torch.randn(3, 5, dtype=torch.bfloat16)

    def step(plan):
        assert linear.tp_all_reduce(x) is x and embedding.tp_all_reduce(x) is x
        if plan == "fail":
            raise RuntimeError("step failed")
        return plan

    assert profile_decode._meeting_only(step)("plan") == "plan"
    assert [(t.shape, t.dtype, t.item()) for t in summed] == [(torch.Size([1]), torch.bfloat16, 0.0)] * 2
    with pytest.raises(RuntimeError, match="step failed"):
        profile_decode._meeting_only(step)("fail")
    assert (linear.tp_all_reduce, embedding.tp_all_reduce) == originals


def test_kernel_gaps_idle_time_before_all_reduce_kernels(tmp_path, capsys):
    """benchmarks/kernel_gaps.py: the GPU's idle time in a timeline (work on two streams overlaps)
    and before each all-reduce kernel: from the end of all work started before it, 0 where that
    work still ran; read back from a trace file as profile_decode.py --trace-graphs writes it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from kernel_gaps import idle_before, main, timeline_summary

    ar = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL"
    kernels = [("gemm", 0.0, 10.0), ("side_store", 5.0, 20.0),  # a side stream's kernel runs until 25
               (ar, 30.0, 5.0),  # 5 us idle before it
               ("rms_norm", 35.0, 2.0), ("attention", 37.0, 100.0), ("gemm", 137.0, 8.0),
               (ar, 845.0, 30.0),  # 700 us idle before it
               (ar, 880.0, 4.0)]  # 5 us after the last one
    assert idle_before(kernels, "ncclDevKernel_AllReduce") == [5.0, 700.0, 5.0]
    assert idle_before(list(reversed(kernels)), "ncclDevKernel_AllReduce") == [5.0, 700.0, 5.0]
    assert idle_before([("gemm", 0.0, 10.0), (ar, 4.0, 30.0)], "ncclDevKernel") == [0.0]  # overlapped
    summary = timeline_summary(kernels)
    assert summary == pytest.approx({"span_ms": 0.884, "busy_ms": 0.174, "idle_ms": 0.71, "kernels": 8,
                                     "matched": 3, "matched_ms": 0.039, "idle_before_matched_ms": 0.71,
                                     "idle_before_matched_us": [5.0, 700.0, 5.0]})
    assert timeline_summary([])["span_ms"] == 0.0
    trace = tmp_path / "out.json.kcache.rank0.trace.json"
    trace.write_text(json.dumps({"cuda_graph": [list(k) for k in kernels]}))
    main([str(trace)])
    assert capsys.readouterr().out.strip() == (
        f"{trace} cuda_graph: span 0.88 ms, busy 0.17, idle 0.71; 3 x ncclDevKernel_AllReduce: own 0.04 ms, "
        "idle before them 0.71 ms")


def test_profile_traces_each_graph_path_once(tmp_path, monkeypatch):
    """benchmarks/profile_decode.py --trace-graphs: one traced replay of each CUDA-graph path (not
    the eager ones), after the step's before_step; rank 0's summaries, every rank's idle time before
    its all-reduce kernels, and the rank's kernels written beside --out."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode
    from kcache_dist.parallel import ParallelState

    calls = []
    ar = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL"
    timelines = {"cuda_graph": [("gemm", 0.0, 10.0), (ar, 710.0, 30.0)],
                 "cuda_graph_no_all_reduce": [("gemm", 0.0, 10.0)]}

    def trace(run, device):
        return timelines[run()]
    monkeypatch.setattr(profile_decode, "trace_kernels", trace)
    monkeypatch.setattr(profile_decode, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(profile_decode, "tp_gather_objects", lambda obj: [obj, {k: v + 1 for k, v in obj.items()}])
    monkeypatch.setattr(profile_decode, "current_state", lambda: ParallelState(tp_size=2))
    paths = {name: (lambda plan, name=name: calls.append(plan) or name) for name in ["eager", *timelines]}
    args = SimpleNamespace(out=str(tmp_path / "p.json"))
    out = profile_decode.trace_graph_paths(paths, "plan", torch.device("cpu"), lambda: calls.append("forget"),
                                           args, "kcache")
    assert calls == ["forget", "barrier", "plan"] * 2
    assert out["graph_timelines"]["cuda_graph"]["idle_before_matched_us"] == [700.0]
    assert out["graph_timelines"]["cuda_graph_no_all_reduce"]["matched"] == 0
    assert out["per_rank_idle_before_all_reduce_ms"] == [{"cuda_graph": 0.7, "cuda_graph_no_all_reduce": 0.0},
                                                         {"cuda_graph": 1.7, "cuda_graph_no_all_reduce": 1.0}]
    written = json.loads((tmp_path / "p.json.kcache.rank0.trace.json").read_text())
    assert written == {name: [list(k) for k in kernels] for name, kernels in timelines.items()}


def test_profile_steps_with_host_writes_to_device(monkeypatch):
    """benchmarks/profile_decode.py --host-writes-to-device: inside the step the KCache cache's
    own offload writes the new rows to a device pool of one block per sparse layer (slots wrapped
    into the block, skipped rows still skipped), never to the host pool; the cache's method and
    host pools are back afterwards, also when the step raises."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode

    stores = []

    class Cache:
        device = torch.device("cpu")
        host_rows = [torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8)]
        decode_stage = "stage"

        def _offload(self, sparse, rows, slot_mapping):
            assert self.decode_stage is None  # the decode stores its rows in each layer meanwhile
            stores.append(self.host_rows[sparse])
            store_rows(self.host_rows[sparse], rows, slot_mapping)

    cache = Cache()
    host_pools = list(cache.host_rows)

    def same_pools(pools, expected):
        return len(pools) == len(expected) and all(a is b for a, b in zip(pools, expected))
    rows = torch.arange(3 * 2 * 8, dtype=torch.float32).view(3, 2, 8)

    def step(plan):
        cache._offload(1, rows, torch.tensor([9, -1, 2]))  # block 2 slot 1; skipped; block 0 slot 2
        if plan == "fail":
            raise RuntimeError("step failed")
        return plan

    run = profile_decode._host_writes_to_device(step, cache)
    assert run("plan") == "plan"
    assert all(not pool.any() for pool in host_pools) and same_pools(cache.host_rows, host_pools)
    (pool,) = stores
    assert pool.shape == (1, 2, 4, 8) and torch.equal(pool[0, :, 1], rows[0]) and torch.equal(pool[0, :, 2], rows[2])
    assert not pool[0, :, [0, 3]].any()  # the skipped row is not stored
    with pytest.raises(RuntimeError, match="step failed"):
        run("fail")
    assert "_offload" not in vars(cache) and same_pools(cache.host_rows, host_pools)
    assert cache.decode_stage == "stage"
    cache.decode_stage = None
    step("plan")
    assert stores[-1] is host_pools[1] and host_pools[1].any()  # the cache's own offload writes the host pool again


def test_profile_steps_with_direct_host_writes():
    """benchmarks/profile_decode.py --direct-host-writes: the cache's decode stores its new rows in
    each layer (no stage) for the step (and the capture it makes) only; the stage is back
    afterwards, also when the step raises."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode

    cache = SimpleNamespace(decode_stage="stage")
    seen = []

    def step(plan):
        seen.append(cache.decode_stage)
        if plan == "fail":
            raise RuntimeError("step failed")
        return plan

    run = profile_decode._with_direct_host_writes(step, cache)
    assert run("plan") == "plan" and seen == [None] and cache.decode_stage == "stage"
    with pytest.raises(RuntimeError, match="step failed"):
        run("fail")
    assert seen == [None, None] and cache.decode_stage == "stage"


def test_profile_steps_join_the_copies_of_one_chunk_in_c():
    """benchmarks/profile_decode.py: after each step, the copies of the staged rows of the
    sequences whose turn it is (every sequence at position 63, chunks of 4: sequence i at steps
    t with (i + t) % 4 == 0, rows 60-63 of its block 3), issued and joined into the step; none
    without a stage."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_decode

    calls = []
    stage = SimpleNamespace(chunk_rows=4, block_size=16,
                            copies=lambda slot, block, first, rows: [(slot, block, first, rows)])
    cache = SimpleNamespace(decode_stage=stage, issue_staged_copies=lambda copies: calls.append(("issue", copies)),
                            join_offload=lambda: calls.append("join"))
    runner = SimpleNamespace(kv_cache=cache, block_table_rows=SimpleNamespace(block=lambda slot, i: 100 * slot + i))
    plan = SimpleNamespace(num_decodes=8, hot_slots=[10, 11, 12, 13, 14, 15, 16, 17], num_computed_tokens=[63] * 8)
    run = profile_decode._with_staged_row_copies(lambda p: calls.append("step") or "logits", runner)
    assert [run(plan) for _ in range(2)] == ["logits", "logits"]
    assert calls == ["step", ("issue", [(10, 1003, 60, 4), (14, 1403, 60, 4)]), "join",
                     "step", ("issue", [(13, 1303, 60, 4), (17, 1703, 60, 4)]), "join"]
    cache.decode_stage = None
    calls.clear()
    assert run(plan) == "logits" and calls == ["step"]


def test_profile_fills_float8_key_pools():
    """benchmarks/profile_decode.py: the pools of fp8 scoring keys (float8 K, which has no normal_,
    and its float32 scales) get random keys and unit scales like the 16-bit pools."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from profile_decode import fill_device_pools

    cache = SimpleNamespace(k_caches=[torch.zeros(130, 2, 4, 8, dtype=torch.float8_e4m3fn),
                                      torch.zeros(130, 2, 4, 8, dtype=torch.bfloat16)],
                            k_scales=[torch.zeros(130, 2, 4)], v_hot=[torch.zeros(3, 8)], k_hot=[torch.zeros(3, 8)])
    fill_device_pools(cache)
    for t in cache.k_caches + cache.v_hot + cache.k_hot:
        values = t.float()
        assert values.isfinite().all() and 0.5 < values.std() < 2.0
    assert torch.equal(cache.k_scales[0], torch.ones(130, 2, 4))


def test_multi_gpu_tp_scaling_from_result_files(tmp_path):
    """benchmarks/multi_gpu.py: per TP size and mode, the fastest point at the largest batch, per GPU,
    against TP=1 and KCache over full, from the throughput JSONs found in the directory."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from multi_gpu import tp_scaling

    def point(mode, batch, micro_batches, tok_s):
        return {"mode": mode, "batch": batch, "micro_batches": micro_batches, "decode_tokens_per_s": tok_s}
    runs = {1: [point("full", 109, 1, 2000.0), point("full", 64, 1, 1500.0), point("kcache", 128, 1, 600.0),
                point("kcache", 128, 2, 700.0)],
            2: [point("full", 235, 1, 2500.0), point("kcache", 256, 1, 1050.0)],
            4: [point("kcache", 512, 1, 1750.0)]}
    for tp, points in runs.items():
        (tmp_path / f"throughput_tp{tp}_8192.json").write_text(json.dumps({"points": points}))
    (tmp_path / "throughput_tp2_32768.json").write_text(json.dumps({"points": [point("full", 9, 1, 1.0)]}))
    rows = {(r["tp"], r["mode"]): r for r in tp_scaling(str(tmp_path), [8192])}
    assert sorted(rows) == [(1, "full"), (1, "kcache"), (2, "full"), (2, "kcache"), (4, "kcache")]
    assert rows[1, "kcache"]["micro_batches"] == 2 and rows[1, "kcache"]["kcache_over_full"] == pytest.approx(0.35)
    assert rows[2, "kcache"]["per_gpu_decode_tokens_per_s"] == 525.0
    assert rows[2, "kcache"]["over_tp1"] == pytest.approx(1.5)
    assert rows[2, "full"]["over_tp1"] == pytest.approx(1.25) and rows[2, "full"]["kcache_over_full"] is None
    assert rows[4, "kcache"]["over_tp1"] == pytest.approx(2.5) and rows[4, "kcache"]["kcache_over_full"] is None
    assert all(r["setup_differs_from_tp1"] == [] for r in rows.values())
    # a TP=4 file left from a run with other settings on another card is not divided by TP=1
    setup = {"device": {"name": "NVIDIA H200"}, "args": {"model": "llama3-8b", "host_values": "model"}}
    for tp, points in runs.items():
        other = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "args": {**setup["args"], "host_values": "fp8"}}
        (tmp_path / f"throughput_tp{tp}_8192.json").write_text(json.dumps({"points": points,
                                                                          **(other if tp == 4 else setup)}))
    rows = {(r["tp"], r["mode"]): r for r in tp_scaling(str(tmp_path), [8192])}
    assert rows[2, "kcache"]["over_tp1"] == pytest.approx(1.5) and rows[2, "kcache"]["setup_differs_from_tp1"] == []
    assert rows[4, "kcache"]["over_tp1"] is None
    assert rows[4, "kcache"]["setup_differs_from_tp1"] == ["device", "host_values"]


def test_multi_gpu_keeps_commands_without_machine_paths(tmp_path):
    """benchmarks/multi_gpu.py records each command it ran with the interpreter as `python`, paths
    in the results folder and the repository relative to them, and a temporary model directory by
    its name."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from multi_gpu import shown_command

    out_dir = tmp_path / "results"
    script = os.path.join(ROOT, "benchmarks", "throughput.py")
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", sys.executable, script, "--model", "/tmp/abc123/model",
           "--contexts", "8192", "--out", str(out_dir / "throughput_tp2_8192.json")]
    assert shown_command(cmd, str(out_dir)) == ("mpirun --allow-run-as-root -np 2 python benchmarks/throughput.py "
                                                "--model model --contexts 8192 --out throughput_tp2_8192.json")
