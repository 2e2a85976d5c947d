"""The server as one tensor-parallel group of two CPU ranks (one case also on two GPUs, where a
machine has them).

Real launches (`launch/serve.py` under `deepspeed --num_gpus 2` and `mpirun -np 2`, a free
127.0.0.1 port, the official `openai` client): greedy chat equals the one-process answer, a
request in flight when SIGTERM lands runs to its end, and every process exits 0; a worker killed
mid-stream ends that stream with an error, new requests and /health get 503 naming the lost rank,
and every process exits non-zero within 30 s. On forkserver
ranks (tests/dist_scripts/multiprocess.py): idle workers outlive the collective timeout through
rank 0's keepalives, a worker whose rank 0 died exits with a message (and rank 0 whose worker
died), a step that fails on every rank fails its requests while the server serves on, one that
fails on a worker only ends the job within the collective timeout, and a job of more processes
than the tensor parallel size is refused. Every wait is bounded."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import sys
import time
from typing import Optional

import httpx
import openai
import psutil
import pytest
import torch

from conftest import PROMPTS
from dist_scripts.launchers import clean_launch_env, launcher_tool
from dist_scripts.multiprocess import describe, free_port, run_rank_outcomes
from kcache_dist import LLM, SamplingParams
from kcache_dist.parallel.launcher import mpirun_flags
from kcache_dist.server.cli_args import build_parser, engine_config_from_args, serving_tensor_parallel_size
from kcache_dist.server.entrypoint import LOST_RANK_EXIT_GRACE_S
from test_server import SERVE_SCRIPT, ServerProcess

START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
STREAM_TOKENS = 200  # decoding still runs when the signal lands
LONG_STREAM_TOKENS = 480  # decoding still runs when the worker is killed (the tiny model has 512 positions)
LOST_RANK_EXIT_S = 30.0  # from a worker's death to the exit of every process of the job


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(device="cpu", model=tiny_llama_dir)


def ranks_of(server: ServerProcess) -> list[psutil.Process]:
    """The processes running launch/serve.py under the server's launcher, in rank order."""
    found = {}
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            cmdline, env = process.cmdline(), process.environ()
        except psutil.NoSuchProcess:
            continue
        rank = env.get("RANK") or env.get("PMI_RANK") or env.get("OMPI_COMM_WORLD_RANK")
        if SERVE_SCRIPT in cmdline and rank is not None:  # not DeepSpeed's launch.py, which names the script too
            found[int(rank)] = process
    assert sorted(found) == [0, 1], f"ranks found: {found}\n{server.log()[-3000:]}"
    return [found[0], found[1]]


def chat_then_sigterm_mid_stream(server: ServerProcess, offline: LLM, model: str, target: psutil.Process):
    """A greedy chat reply equal to the one-process reply; then a stream that SIGTERM to `target`
    interrupts runs to its end, and the launcher with every rank exits within EXIT_TIMEOUT_S.
    Returns the launcher's exit status."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)
    want = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10))[0]
    got = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)

    job = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    stream = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=STREAM_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    target.send_signal(signal.SIGTERM)
    chunks.extend(stream)  # the request in flight runs to its end
    assert chunks[-1].usage.completion_tokens == STREAM_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    status = server.process.wait(timeout=EXIT_TIMEOUT_S)
    _, alive = psutil.wait_procs(job, timeout=10)
    assert not alive, f"still running after the launcher exited: {alive}"
    return status


def deepspeed_tp2_server(model_dir: str, tmp_path, device: str = "cpu") -> ServerProcess:
    """A (not yet ready) server of `model_dir` on `device` under `deepspeed --num_gpus 2` on
    loopback; skips the test without the launcher (or, for "cuda", without two GPUs)."""
    deepspeed = launcher_tool("deepspeed")
    if deepspeed is None:
        pytest.skip("no `deepspeed` launcher: `pip install deepspeed`")
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, this machine has {torch.cuda.device_count()}")
    launcher = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return ServerProcess(["--model", model_dir, "--device", device], str(tmp_path / "server.log"),
                         launcher=launcher, env=clean_launch_env(MASTER_ADDR="127.0.0.1"))


def assert_clean_stop(log: str) -> None:
    assert "[rank 0] INFO kcache_dist.server.http_server: received SIGTERM: draining" in log, log[-3000:]
    assert "[rank 0] INFO kcache_dist.server: stopped the 1 worker rank(s)" in log, log[-3000:]
    assert "[rank 0] INFO kcache_dist.server: stopped (every request finished)" in log, log[-3000:]
    assert "[rank 1] INFO kcache_dist.server.worker_rank: stopped by rank 0" in log, log[-3000:]


# ---- real launchers -------------------------------------------------------------------------------
def test_deepspeed_tp2_server_answers_chat_and_every_rank_exits_0_after_sigterm(tiny_llama_dir, offline, tmp_path):
    """The DeepSpeed launcher does not pass SIGTERM on from the `deepspeed` command, and its
    launch.py terminates rank 0 before the others: SIGTERM goes to rank 0, which drains and stops
    the worker; the launcher then reports both ranks' clean exits and exits 0 itself."""
    server = deepspeed_tp2_server(tiny_llama_dir, tmp_path)
    try:
        server.wait_ready(START_TIMEOUT_S)
        rank0, rank1 = ranks_of(server)
        assert chat_then_sigterm_mid_stream(server, offline, tiny_llama_dir, rank0) == 0, server.log()[-3000:]
        log = server.log()
        assert "tensor parallel size 2) on http://127.0.0.1:" in log
        assert_clean_stop(log)
        for rank in (rank0, rank1):
            assert f"Process {rank.pid} exits successfully." in log, log[-3000:]
    finally:
        server.stop()


def test_mpirun_tp2_server_answers_chat_and_every_rank_exits_0_after_sigterm(tiny_llama_dir, offline, tmp_path):
    """mpirun passes SIGTERM to every rank: the worker logs it and keeps computing until rank 0
    has drained and stops it; mpirun exits 0 only if every rank did."""
    mpirun = launcher_tool("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun: install an MPI runtime matching mpi4py (e.g. `pip install mpich`)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    server = ServerProcess(["--model", tiny_llama_dir, "--device", "cpu"], str(tmp_path / "server.log"),
                           launcher=[mpirun, *mpirun_flags(mpirun), "-np", "2", sys.executable],
                           env=clean_launch_env())
    try:
        server.wait_ready(START_TIMEOUT_S)
        ranks_of(server)
        launcher = psutil.Process(server.process.pid)
        assert chat_then_sigterm_mid_stream(server, offline, tiny_llama_dir, launcher) == 0, server.log()[-3000:]
        log = server.log()
        assert_clean_stop(log)
        assert ("[rank 1] INFO kcache_dist.server.worker_rank: received SIGTERM: rank 0 finishes the requests in "
                "flight, then stops this worker") in log, log[-3000:]
    finally:
        server.stop()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deepspeed_tp2_worker_killed_mid_stream_gives_503_then_every_process_exits_nonzero(tiny_llama_dir,
                                                                                          tmp_path, device):
    """SIGKILL to the worker while a stream runs: the stream ends with an error event naming the lost
    rank; new requests and /health get 503 naming it while rank 0 waits out its grace period (the
    launcher's SIGTERM meanwhile is only logged; if it reaches rank 0 before rank 0 has seen the
    lost rank, rank 0 drains instead, as its log must then show); then rank 0 exits 1 with the
    message and the launcher exits non-zero, all within LOST_RANK_EXIT_S of the kill. (mpirun kills
    rank 0 as soon as a rank dies: under it there are no 503s to see.) On two GPUs rank 0 is then
    mostly inside a step whose NCCL all-reduce spins on the lost worker: its wait for the step's
    device work names the lost rank."""
    server = deepspeed_tp2_server(tiny_llama_dir, tmp_path, device)
    lost = r"lost rank\(s\) \[1\] of the tensor-parallel group"
    try:
        server.wait_ready(START_TIMEOUT_S)
        rank0, rank1 = ranks_of(server)
        job = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                               timeout=REQUEST_TIMEOUT_S)
        stream = client.completions.create(model=tiny_llama_dir, prompt=PROMPTS[1], max_tokens=LONG_STREAM_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        next(stream)
        rank1.kill()
        killed_at = time.monotonic()
        with pytest.raises(openai.APIError, match="^the engine failed: rank 0: " + lost):
            for _ in stream:  # bounded by the client's read timeout
                pass
        assert time.monotonic() - killed_at < LOST_RANK_EXIT_GRACE_S, "the stream ended after rank 0 had exited"

        try:
            refused = httpx.post(server.base_url + "/v1/completions", timeout=10.0,
                                 json={"model": tiny_llama_dir, "prompt": "Hello", "max_tokens": 4})
        except httpx.ConnectError:  # rank 0 drained: the launcher's SIGTERM came first (the log must show it)
            refused = None
        if refused is not None:
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["type"] == "server_error" and re.search("^the engine failed: rank 0: " + lost,
                                                                 error["message"])
            health = httpx.get(server.base_url + "/health", timeout=10.0)
            assert health.status_code == 503 and re.search(lost, health.json()["error"]["message"]), health.text

        status = server.process.wait(timeout=LOST_RANK_EXIT_S - (time.monotonic() - killed_at))
        _, alive = psutil.wait_procs(job, timeout=max(0.1, LOST_RANK_EXIT_S - (time.monotonic() - killed_at)))
        assert not alive, f"still running {LOST_RANK_EXIT_S} s after the kill: {alive}"
        log = server.log()
        assert status != 0, log[-3000:]
        answering_503 = re.search(r"\[rank 0\] ERROR kcache_dist.server: rank 0: " + lost + r".*; answering 503 "
                                  f"for {LOST_RANK_EXIT_GRACE_S:g} s, then exiting with status 1", log)
        assert answering_503, log[-3000:]
        # DeepSpeed's launch.py terminates rank 0 once it sees rank 1 dead (it polls every second):
        # mostly after rank 0 has seen the lost rank, so the signal is only logged, the 503s above
        # were answered and rank 0 exits by itself (on a loaded machine the launcher may notice only
        # after that exit: then no signal reaches rank 0 at all); or the signal comes first: rank 0
        # drains (no 503s to see), and the launcher's kill may end it before its last line.
        if refused is not None:
            assert "received SIGTERM: draining" not in log, log[-3000:]
            assert ("received SIGTERM" not in log or "[rank 0] WARNING kcache_dist.server.http_server: received "
                    "SIGTERM: the server is exiting by itself" in log), log[-3000:]
            assert re.search(r"kcache_dist: rank 0: " + lost + r".*; exiting with status 1", log), log[-3000:]
        else:
            drained = log.find("[rank 0] INFO kcache_dist.server.http_server: received SIGTERM: draining")
            assert 0 <= drained < answering_503.start(), log[-3000:]
        assert f"Process {rank0.pid} exits successfully." not in log, log[-3000:]
    finally:
        server.stop()


# ---- forkserver ranks -----------------------------------------------------------------------------
def _engine(model_dir: str, collective_timeout_s: float):
    from kcache_dist.config import EngineConfig, ParallelConfig
    from kcache_dist.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=model_dir, device="cpu", parallel=ParallelConfig(
        tensor_parallel_size=2, collective_timeout_s=collective_timeout_s)))


def _generate_through_driver(driver, prompt: str, max_tokens: int) -> list[int]:
    async def one() -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        stream = await driver.submit(prompt, params, "r")
        return (await stream.final_output()).outputs[0].token_ids
    return asyncio.run(asyncio.wait_for(one(), REQUEST_TIMEOUT_S))


def _idle_then_generate(model_dir: str, collective_timeout_s: float, idle_s: float):
    """Rank 0: the engine driver idles for `idle_s`, then serves one request; rank 1: the worker."""
    from kcache_dist.server.engine_driver import EngineDriver
    from kcache_dist.server.worker_rank import serve_as_worker

    engine = _engine(model_dir, collective_timeout_s)
    if not engine.is_scheduler:
        return serve_as_worker(engine)
    keepalives_sent = []

    def counting_keepalive(keepalive=engine.keepalive) -> bool:
        keepalives_sent.append(keepalive())
        return keepalives_sent[-1]
    engine.keepalive = counting_keepalive
    driver = EngineDriver(engine).start()
    time.sleep(idle_s)  # the point of the test: no work for longer than the collective timeout
    tokens = _generate_through_driver(driver, PROMPTS[0], 8)
    assert driver.shutdown(timeout_s=REQUEST_TIMEOUT_S)
    engine.stop_workers()
    return tokens, sum(keepalives_sent), engine.keepalive_interval_s


def test_idle_workers_outlive_the_collective_timeout(tiny_llama_dir, offline):
    timeout_s = 3.0
    idle_s = 2.5 * timeout_s
    outcomes = run_rank_outcomes(_idle_then_generate, 2, None, args=(tiny_llama_dir, timeout_s, idle_s),
                                 timeout_s=120)
    report = describe(outcomes)
    assert [o.exitcode for o in outcomes] == [0, 0] and not any(o.error for o in outcomes), report
    tokens, num_keepalives, interval_s = outcomes[0].result
    assert outcomes[1].result == 0  # serve_as_worker's exit status
    assert interval_s == 0.25 * timeout_s
    assert num_keepalives >= idle_s / (2 * interval_s), report  # one per interval, give or take a slow wake-up
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert tokens == want.outputs[0].token_ids


def _fail_third_forward(engine, message: str) -> None:
    """Make this rank's third forward raise RuntimeError(message)."""
    forwards = itertools.count(1)

    def execute_failing_third(plan, execute=engine.runner.execute):
        if next(forwards) == 3:
            raise RuntimeError(message)
        return execute(plan)
    engine.runner.execute = execute_failing_third


def _error_of_a_request(driver) -> Optional[str]:
    """Serve one request through `driver`: None if it succeeds, else its EngineFailure's message."""
    from kcache_dist.server.engine_driver import EngineFailure

    try:
        _generate_through_driver(driver, PROMPTS[0], 8)
    except EngineFailure as e:
        return str(e)
    return None


def _a_step_fails_on_every_rank(model_dir: str):
    """Both ranks' third forward raises (as an out-of-memory error of one batch would on every
    rank); rank 0 serves a request that step breaks, then another one."""
    from kcache_dist.server.engine_driver import EngineDriver
    from kcache_dist.server.worker_rank import serve_as_worker

    engine = _engine(model_dir, 60.0)
    _fail_third_forward(engine, "injected fault in the third forward")
    if not engine.is_scheduler:
        return serve_as_worker(engine)
    driver = EngineDriver(engine).start()
    error = _error_of_a_request(driver)
    tokens = _generate_through_driver(driver, PROMPTS[0], 8)
    assert driver.shutdown(timeout_s=REQUEST_TIMEOUT_S)
    engine.stop_workers()
    return error, tokens


def test_a_step_that_fails_on_every_rank_fails_its_requests_and_the_server_serves_on(tiny_llama_dir, offline):
    outcomes = run_rank_outcomes(_a_step_fails_on_every_rank, 2, None, args=(tiny_llama_dir,), timeout_s=120,
                                 stop_on_first_error=False)
    report = describe(outcomes)
    assert [o.exitcode for o in outcomes] == [0, 0] and not any(o.error for o in outcomes), report
    error, tokens = outcomes[0].result
    assert error == "engine step failed: injected fault in the third forward", report
    assert outcomes[1].result == 0  # serve_as_worker's exit status
    assert "step failed on this rank; the scheduling rank drops its requests" in outcomes[1].output, report
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert tokens == want.outputs[0].token_ids


def _a_step_fails_on_the_worker_only(model_dir: str, collective_timeout_s: float):
    """Rank 1's third forward raises before its first collective; rank 0's does not (it waits in
    that collective): rank 0 serves one request, then tries another."""
    from kcache_dist.server.engine_driver import EngineDriver
    from kcache_dist.server.worker_rank import serve_as_worker

    engine = _engine(model_dir, collective_timeout_s)
    if not engine.is_scheduler:
        _fail_third_forward(engine, "injected fault in this rank's third forward")
        return serve_as_worker(engine)
    driver = EngineDriver(engine).start()
    start = time.monotonic()
    errors = [_error_of_a_request(driver) for _ in range(2)]
    return errors, time.monotonic() - start


def test_a_step_that_fails_on_one_worker_ends_the_job_within_the_collective_timeout(tiny_llama_dir):
    timeout_s = 4.0
    outcomes = run_rank_outcomes(_a_step_fails_on_the_worker_only, 2, None, args=(tiny_llama_dir, timeout_s),
                                 timeout_s=120, stop_on_first_error=False)
    report = describe(outcomes)
    assert [o.exitcode for o in outcomes] == [0, 1], report
    errors, elapsed_s = outcomes[0].result
    # both ranks wait 4 s (rank 0 in the all-reduce, rank 1 for the next plan); rank 0 names rank 1
    # as timed out, or as exited when rank 1's own timeout came first
    lost = re.compile(r"the engine failed: rank 0: (tp_all_reduce over the tensor-parallel group \(global ranks "
                      r"\[0, 1\]\) failed: .*rank\(s\) that may be lost: \[1\]|lost rank\(s\) \[1\] of the "
                      r"tensor-parallel group \(global ranks \[0, 1\]\) during tp_all_reduce)")  # rank 1 named
    assert len(errors) == 2 and all(e is not None and lost.match(e) for e in errors), report
    assert elapsed_s < 3 * timeout_s, report
    assert "step failed on this rank; the scheduling rank drops its requests" in outcomes[1].output, report
    assert re.search(r"kcache_dist: rank 1: (tp_broadcast_object over the tensor-parallel group .*|lost rank\(s\) "
                     r"\[0\] .* during tp_broadcast_object.*); exiting with status 1", outcomes[1].output), report


def _rank0_dies_after_a_request(model_dir: str):
    from kcache_dist.server.engine_driver import EngineDriver
    from kcache_dist.server.worker_rank import serve_as_worker

    engine = _engine(model_dir, 60.0)
    if not engine.is_scheduler:
        return serve_as_worker(engine)
    _generate_through_driver(EngineDriver(engine).start(), PROMPTS[0], 4)
    os._exit(9)


def test_worker_exits_with_a_message_when_rank0_dies(tiny_llama_dir):
    start = time.monotonic()
    outcomes = run_rank_outcomes(_rank0_dies_after_a_request, 2, None, args=(tiny_llama_dir,), timeout_s=90,
                                 stop_on_first_error=False)
    report = describe(outcomes)
    assert time.monotonic() - start < 60, report  # well inside the 60 s collective timeout: the socket closed
    assert [o.exitcode for o in outcomes] == [9, 1], report
    assert ("kcache_dist: rank 1: lost rank(s) [0] of the tensor-parallel group (global ranks [0, 1]) during "
            "tp_broadcast_object") in outcomes[1].output, report
    assert "exiting with status 1" in outcomes[1].output, report


def _worker_dies_while_rank0_idles(model_dir: str, collective_timeout_s: float) -> str:
    import threading

    from kcache_dist.server.engine_driver import EngineDriver
    from kcache_dist.server.entrypoint import exit_if_rank_lost

    engine = _engine(model_dir, collective_timeout_s)
    if not engine.is_scheduler:
        os._exit(9)
    EngineDriver(engine, on_crash=exit_if_rank_lost).start()
    # the driver's next keepalive finds rank 1 gone; rank 0 exits after its grace period
    threading.Event().wait(3 * collective_timeout_s + LOST_RANK_EXIT_GRACE_S)
    return "rank 0 did not notice that rank 1 had died"


def test_rank0_exits_with_a_message_when_a_worker_dies_while_idle(tiny_llama_dir):
    timeout_s = 4.0
    outcomes = run_rank_outcomes(_worker_dies_while_rank0_idles, 2, None, args=(tiny_llama_dir, timeout_s),
                                 timeout_s=90, stop_on_first_error=False)
    report = describe(outcomes)
    assert [o.exitcode for o in outcomes] == [1, 9], report  # rank 0 exited before its wait ran out
    assert ("kcache_dist: rank 0: lost rank(s) [1] of the tensor-parallel group (global ranks [0, 1]) during "
            "tp_broadcast_object") in outcomes[0].output, report
    assert "exiting with status 1" in outcomes[0].output, report


def _serve_with_args(argv: list[str]) -> int:
    from kcache_dist.server import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_data_parallel_serving_is_refused_on_every_rank(tiny_llama_dir):
    argv = ["--model", tiny_llama_dir, "--device", "cpu", "--tensor-parallel-size", "1"]
    outcomes = run_rank_outcomes(_serve_with_args, 2, None, args=(argv,), timeout_s=60, stop_on_first_error=False)
    report = describe(outcomes)
    for o in outcomes:
        assert o.result == 2, report  # argparse's usage error, before any rank joins the job
        assert ("launch/serve.py: error: tensor parallel size 1 does not fit this job of 2 processes (2 "
                "data-parallel replicas): the server runs one tensor-parallel group behind one HTTP front end "
                "(data parallel size 1), so the tensor parallel size must be 2; leave out --tensor-parallel-size "
                "(it defaults to the number of processes) or start 1 process") in o.output, report


# ---- flags ----------------------------------------------------------------------------------------
def test_tensor_parallel_size_defaults_to_the_launched_processes(tmp_path):
    assert serving_tensor_parallel_size(None, 1, 1) == 1
    assert serving_tensor_parallel_size(None, 1, 4) == 4  # under a launcher, also over a file's 1
    assert serving_tensor_parallel_size(None, 2, 1) == 2  # one process: the file's value (the engine refuses it)
    assert serving_tensor_parallel_size(4, 1, 4) == 4
    with pytest.raises(ValueError, match=r"^tensor parallel size 3 does not fit this job of 4 processes: the server"):
        serving_tensor_parallel_size(3, 1, 4)
    with pytest.raises(ValueError, match=r"^--tensor-parallel-size must be >= 1, got 0$"):
        serving_tensor_parallel_size(0, 1, 1)

    config_path = tmp_path / "tp1.json"
    config_path.write_text('{"device": "cpu", "parallel": {"tensor_parallel_size": 1, "collective_timeout_s": 5}}')
    args = build_parser().parse_args(["--config", str(config_path)])
    config = engine_config_from_args(args, num_processes=2)
    assert (config.parallel.tensor_parallel_size, config.parallel.collective_timeout_s) == (2, 5)
    args = build_parser().parse_args(["-tp", "2"])
    assert engine_config_from_args(args, num_processes=2).parallel.tensor_parallel_size == 2
