"""A rank that dies or hangs makes the others exit non-zero with a message naming it — never hang."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from dist_scripts.multiprocess import describe, run_rank_outcomes

COLLECTIVE_TIMEOUT_S = 10.0


def _die_between_collectives(dying_rank: int) -> str:
    from kcache_dist.parallel import all_reduce_min, current_state, exit_on_lost_rank, tp_all_reduce

    state = current_state()
    with exit_on_lost_rank():
        tp_all_reduce(torch.randn(16))
        all_reduce_min(state.rank)
        if state.rank == dying_rank:
            os._exit(9)
        for _ in range(200):
            tp_all_reduce(torch.randn(16))
            all_reduce_min(state.rank)
            time.sleep(0.01)
    return "every collective succeeded although a rank had died"


@pytest.mark.parametrize("world, tp, dying_rank", [(2, 2, 1), (4, 2, 3)])
def test_dead_rank_makes_the_others_exit_with_a_message(world, tp, dying_rank):
    outcomes = run_rank_outcomes(_die_between_collectives, world, tp, args=(dying_rank,), timeout_s=30,
                                 pg_timeout_s=COLLECTIVE_TIMEOUT_S, stop_on_first_error=False)
    report = describe(outcomes)
    assert outcomes[dying_rank].exitcode == 9, report
    survivors = [o for o in outcomes if o.rank != dying_rank]
    assert all(o.exitcode == 1 for o in survivors), report
    # counted from the death, not the start: starting the ranks may take long on a loaded machine
    after_death_s = max(o.seconds for o in survivors) - outcomes[dying_rank].seconds
    assert after_death_s < COLLECTIVE_TIMEOUT_S, f"the survivors exited {after_death_s:.1f} s after the death\n{report}"
    tp_peer = outcomes[dying_rank // tp * tp + (1 - dying_rank % tp)]  # the dying rank's TP partner
    assert f"lost rank(s) [{dying_rank}] of the tensor-parallel group" in tp_peer.output, report
    for o in survivors:
        assert "kcache_dist: rank" in o.output and "exiting with status 1" in o.output, report


def _hang_between_collectives() -> str:
    from kcache_dist.parallel import current_state, exit_on_lost_rank, tp_all_reduce

    @exit_on_lost_rank  # the decorator form
    def two_all_reduces() -> None:
        tp_all_reduce(torch.randn(16))
        print(f"second all-reduce at {time.monotonic():.3f}", flush=True)
        if current_state().rank == 1:
            time.sleep(60)  # alive but silent: only the collective timeout can tell
        tp_all_reduce(torch.randn(16))

    two_all_reduces()
    return "the second all-reduce returned without rank 1"


def test_silent_rank_makes_the_other_exit_after_the_timeout():
    timeout_s = 2.0
    outcomes = run_rank_outcomes(_hang_between_collectives, 2, 2, timeout_s=30, pg_timeout_s=timeout_s)
    report = describe(outcomes)
    assert outcomes[0].exitcode == 1, report
    # counted from rank 0's entry into the all-reduce that times out, not from the start
    waited_s = outcomes[0].ended_monotonic - float(re.search(r"second all-reduce at (\S+)", outcomes[0].output)[1])
    assert timeout_s <= waited_s < timeout_s + 10, f"waited {waited_s:.1f} s\n{report}"
    assert "rank 0: tp_all_reduce over the tensor-parallel group (global ranks [0, 1]) failed" in outcomes[0].output
    assert "collective timeout of 2 s; rank(s) that may be lost: [1]" in outcomes[0].output, report


def _die_while_rank0_waits_on_the_device() -> str:
    from kcache_dist.parallel import all_reduce_min, current_state, exit_on_lost_rank
    from kcache_dist.parallel.collectives import wait_until

    with exit_on_lost_rank():
        all_reduce_min(current_state().rank)  # both ranks are up
        if current_state().rank == 1:
            os._exit(9)
        # rank 0 stands in for a GPU step whose all-reduce spins on the lost peer: done never comes
        wait_until(lambda: False, 60.0, "a step's forward")
    return "the wait ended without the device's work"


def test_peer_that_exits_during_a_device_wait_is_named_before_the_collective_timeout():
    """NCCL's (and the two-shot all-reduce's) kernels spin on a lost peer: the scheduling rank's wait
    for a step's device work names a peer on its host whose process has exited, long before the
    collective timeout."""
    outcomes = run_rank_outcomes(_die_while_rank0_waits_on_the_device, 2, 2, timeout_s=30,
                                 pg_timeout_s=COLLECTIVE_TIMEOUT_S, stop_on_first_error=False)
    report = describe(outcomes)
    assert outcomes[1].exitcode == 9, report
    assert outcomes[0].exitcode == 1, report
    assert outcomes[0].seconds - outcomes[1].seconds < COLLECTIVE_TIMEOUT_S, report  # from rank 1's death
    assert re.search(r"kcache_dist: rank 0: lost rank\(s\) \[1\] of the tensor-parallel group \(global ranks "
                     r"\[0, 1\]\) during a step's forward \(rank 1: process \d+ on host .* has exited\); cause: the "
                     r"peer's process exited while this rank waited \d+\.\d s for the device; exiting with status 1",
                     outcomes[0].output), report


def _miss_the_rendezvous() -> str:
    from kcache_dist.parallel import exit_on_lost_rank, init_parallel

    if int(os.environ["RANK"]) == 1:
        os._exit(9)
    with exit_on_lost_rank():
        init_parallel(2, timeout_s=2.0)
    return "init_parallel returned without rank 1"


def test_rank_that_never_joins_is_named():
    outcomes = run_rank_outcomes(_miss_the_rendezvous, 2, None, timeout_s=30, stop_on_first_error=False)
    report = describe(outcomes)
    assert outcomes[0].exitcode == 1, report
    assert "rank 0: rank(s) [1] of 2 did not join the job within 2 s" in outcomes[0].output, report


def test_only_peers_whose_pids_this_process_sees_are_looked_up():
    """A rank in another pid namespace (a container of its own, sharing the host name under host
    networking) is not looked up by pid: its pid here may be no process, or another one."""
    import socket
    import subprocess

    from kcache_dist.parallel.errors import PeerDirectory, find_lost_ranks
    from kcache_dist.parallel.process_group import pid_space

    gone = subprocess.Popen(["true"])
    gone.wait()
    here = socket.gethostname()
    for spaces, lost in [((pid_space(), pid_space()), [1]), ((pid_space(), "another/1"), []), ((), [1])]:
        peers = PeerDirectory(0, (here, here), (os.getpid(), gone.pid), 10.0, spaces)
        assert find_lost_ranks([0, 1], peers, grace_s=0.0) == lost, spaces
    other_host = PeerDirectory(0, (here, here + "-other"), (os.getpid(), gone.pid), 10.0)
    assert find_lost_ranks([0, 1], other_host, grace_s=0.0) == []
    assert pid_space().count("/") == 1  # this machine's /proc tells both parts


def test_peer_failure_classification():
    from kcache_dist.parallel.errors import is_peer_failure

    assert is_peer_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:21214"))
    assert is_peer_failure(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:51336: Connection reset by peer"))
    assert is_peer_failure(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_peer_failure(ValueError("connection reset"))


def test_release_after_a_lost_rank_does_not_wait_on_the_device(monkeypatch):
    """After a lost rank (a two-shot all-reduce may spin on it for ever) the model runner's release
    drops its graphs without waiting on the device; otherwise it waits first."""
    from types import SimpleNamespace

    from kcache_dist.engine import model_runner

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    for lost in (True, False):
        monkeypatch.setattr(model_runner, "rank_was_lost", lambda: lost)
        runner = SimpleNamespace(decode_graphs=object(), kv_cache=object(), model=object(),
                                 device=torch.device("cpu"))
        model_runner.ModelRunner.release(runner)
        assert (runner.decode_graphs, runner.kv_cache, runner.model) == (None, None, None)
    assert waited == [torch.device("cpu")]  # only the release without a lost rank waited
