"""Collectives over real process groups (gloo on 127.0.0.1, forkserver ranks), compared with the
same computation done in one process; plus the single-process fast paths."""

from __future__ import annotations

import pytest
import torch

from dist_scripts.multiprocess import run_ranks


def _collectives_on_rank(inputs: list[dict]) -> dict:
    from kcache_dist.parallel import (all_reduce_min, barrier, current_state, dp_gather_objects, tp_all_reduce,
                                      tp_broadcast_object, tp_gather_last_dim, tp_gather_objects)

    state = current_state()
    mine = inputs[state.rank]
    reduced = tp_all_reduce(mine["reduce"].clone())
    reduced_transposed = tp_all_reduce(mine["reduce"].clone().t())  # not contiguous
    gathered = tp_gather_last_dim(mine["gather"])
    plan = tp_broadcast_object({"from_rank": state.rank, "plan": mine["plan"]})
    group_blocks = tp_gather_objects({"from_rank": state.rank, "blocks": mine["blocks"]})
    replicas = dp_gather_objects({"from_rank": state.rank, "blocks": mine["blocks"]})
    smallest = all_reduce_min(mine["blocks"])
    barrier()
    return {"state": state, "reduced": reduced, "reduced_transposed": reduced_transposed, "gathered": gathered,
            "plan": plan, "group_blocks": group_blocks, "replicas": replicas, "min": smallest}


def _random_inputs(world: int) -> list[dict]:
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh each run
    return [{"reduce": torch.randn(3, 5, generator=generator),
             "gather": torch.randn(2, 3, 4, generator=generator),
             "plan": {"seq_ids": torch.randint(0, 1000, (6,), generator=generator).tolist(),
                      "positions": torch.randn(3, generator=generator)},
             "blocks": int(torch.randint(100, 10_000, (), generator=generator))} for _ in range(world)]


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 2), (4, 4), (2, 1)])
def test_collectives_match_single_process(world, tp):
    inputs = _random_inputs(world)
    results = run_ranks(_collectives_on_rank, world, tp, args=(inputs,))
    dp = world // tp
    leaders = list(range(0, world, tp))
    for rank, out in enumerate(results):
        state = out["state"]
        group = list(range(rank // tp * tp, rank // tp * tp + tp))
        assert (state.rank, state.world_size, state.tp_rank, state.tp_size, state.dp_rank, state.dp_size) == \
               (rank, world, rank % tp, tp, rank // tp, dp)
        assert list(state.tp_group_ranks) == group
        assert (state.backend, state.launcher, state.local_rank, state.local_world_size) == ("gloo", "env", rank, world)
        expected_sum = torch.stack([inputs[r]["reduce"] for r in group]).sum(0)
        torch.testing.assert_close(out["reduced"], expected_sum)
        torch.testing.assert_close(out["reduced_transposed"], expected_sum.t())
        torch.testing.assert_close(out["gathered"], torch.cat([inputs[r]["gather"] for r in group], dim=-1))
        assert out["plan"]["from_rank"] == group[0]
        assert out["plan"]["plan"]["seq_ids"] == inputs[group[0]]["plan"]["seq_ids"]
        torch.testing.assert_close(out["plan"]["plan"]["positions"], inputs[group[0]]["plan"]["positions"])
        assert out["group_blocks"] == [{"from_rank": r, "blocks": inputs[r]["blocks"]} for r in group]
        if rank == 0:
            assert out["replicas"] == [{"from_rank": r, "blocks": inputs[r]["blocks"]} for r in leaders]
        else:
            assert out["replicas"] is None
        assert out["min"] == min(i["blocks"] for i in inputs)


def test_single_process_collectives_do_not_touch_torch_distributed(monkeypatch):
    import torch.distributed as dist

    from kcache_dist import parallel

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called in a single-process job")

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast_object_list", "gather_object", "barrier",
                 "new_group", "init_process_group"):
        monkeypatch.setattr(dist, name, forbidden)
    state = parallel.init_parallel(1)
    try:
        assert state == parallel.ParallelState(launcher="single")
        assert (parallel.tp_rank(), parallel.tp_size(), parallel.world_size()) == (0, 1, 1)
        x = torch.randn(4, 6)
        assert parallel.tp_all_reduce(x) is x
        assert parallel.tp_gather_last_dim(x) is x
        plan = {"ids": torch.randint(0, 99, (3,)).tolist()}
        assert parallel.tp_broadcast_object(plan) is plan
        assert parallel.dp_gather_objects(plan) == [plan]
        assert parallel.tp_gather_objects(plan) == [plan]
        assert parallel.all_reduce_min(17) == 17
        parallel.barrier()
        with pytest.raises(ValueError, match=r"tensor_parallel_size 2 needs 2 processes.*world size 1"):
            parallel.init_parallel(2)
    finally:
        parallel.shutdown_parallel()
        parallel.shutdown_parallel()  # idempotent
    assert parallel.current_state() == parallel.ParallelState()


def _reinitialise_on_rank() -> list:
    from kcache_dist.parallel import all_reduce_min, current_state, init_parallel, shutdown_parallel, tp_all_reduce

    seen = [(current_state().tp_size, all_reduce_min(current_state().rank))]
    assert init_parallel(2, timeout_s=20) is current_state()  # same arguments: nothing to do
    with pytest.raises(RuntimeError, match="already called"):
        init_parallel(1)
    shutdown_parallel()
    state = init_parallel(1, timeout_s=20)  # same job, new groups: 2 replicas of TP 1
    seen.append((state.tp_size, state.dp_size, tp_all_reduce(torch.ones(2)).tolist(), all_reduce_min(5 + state.rank)))
    return seen


def test_shutdown_then_initialise_again():
    assert run_ranks(_reinitialise_on_rank, 2, 2) == [[(2, 0), (1, 2, [1.0, 1.0], 5)]] * 2


def _two_shot_refusals_and_deadline_on_rank() -> dict:
    from kcache_dist.parallel import (RankLostError, all_reduce_slot, enable_two_shot_all_reduce, rank_was_lost,
                                      tp_all_reduce, two_shot_all_reduce_enabled)
    from kcache_dist.parallel.collectives import wait_until
    from kcache_dist.parallel.state import current_groups

    errors = []
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(ValueError) as caught:
            enable_two_shot_all_reduce(64, dtype, torch.device("cpu"))
        errors.append(str(caught.value))
    with all_reduce_slot(1):  # no buffers here: the process group sums, whatever the slot
        summed = tp_all_reduce(torch.ones(3)).tolist()
    lost_before = rank_was_lost()
    with pytest.raises(RankLostError) as lost:
        wait_until(lambda: False, 0.05, "a step's forward")
    lost_after = rank_was_lost()  # so the device is not waited on at exit
    current_groups().lost_rank = False  # (this test's ranks are all there: let them tear down cleanly)
    polls = []
    wait_until(lambda: polls.append(1) or len(polls) == 3, 5.0, "never")  # true on the third poll
    return {"errors": errors, "summed": summed, "lost": str(lost.value), "group": lost.value.group_ranks,
            "polls": len(polls), "enabled": two_shot_all_reduce_enabled(torch.device("cpu")),
            "lost_before_after": (lost_before, lost_after)}


def test_two_shot_all_reduce_refusals_and_the_step_deadline():
    """parallel.all_reduce='two_shot' is refused with a reason off CUDA and for float16; the wait
    that bounds a step whose two-shot kernels spin on a lost peer raises RankLostError naming it, and
    records the loss (so that the engine's release does not wait on the device)."""
    results = run_ranks(_two_shot_refusals_and_deadline_on_rank, 2, 2)
    for out in results:
        assert out["errors"] == [
            "parallel.all_reduce='two_shot' sums bfloat16 or float32 activations, not float16: use "
            "parallel.all_reduce='nccl'",
            "parallel.all_reduce='two_shot' needs CUDA devices (symmetric memory); this rank runs on cpu: use "
            "parallel.all_reduce='nccl'"]
        assert out["summed"] == [2.0, 2.0, 2.0]
        assert out["lost"] == ("a step's forward did not finish within the collective timeout of 0.05 s; a rank of "
                               "the tensor-parallel group (ranks [0, 1]) may be lost")
        assert out["group"] == (0, 1) and out["polls"] == 3 and out["enabled"] is False
        assert out["lost_before_after"] == (False, True)
