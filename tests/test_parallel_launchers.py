"""`init_parallel` under real launchers — mpirun, the DeepSpeed launcher, a plain process — plus
launcher detection from the environment. Each launch costs seconds, so there are few of them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_scripts.launchers import REPO_ROOT, clean_launch_env, launcher_tool
from dist_scripts.multiprocess import free_port
from kcache_dist.parallel.launcher import detect_launcher, local_rank_from_argv, mpirun_flags, strip_local_rank_arg

PROBE_SCRIPT = str(Path(__file__).resolve().parent / "dist_scripts" / "launch_probe.py")
LAUNCH_TIMEOUT_S = 120.0


def _launch(cmd: list[str], env: dict, timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds); the whole process tree is killed past `timeout_s`."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout_s:g} s; output:\n{output[-5000:]}")
    return proc.returncode, output, time.monotonic() - start


def _probes(output: str) -> list[dict]:
    """The launch_probe facts of every rank, in rank order (lines of ranks may interleave)."""
    return sorted((json.loads(m.group(1)) for m in re.finditer(r"PROBE (\{[^{}]*\})", output)),
                  key=lambda facts: facts["rank"])


def _check_two_rank_tp_job(probes: list[dict], launcher: str, output: str) -> None:
    assert [p["rank"] for p in probes] == [0, 1], output
    for p in probes:
        assert (p["world_size"], p["tp_size"], p["tp_rank"], p["local_rank"]) == (2, 2, p["rank"], p["rank"]), p
        assert (p["launcher"], p["backend"], p["tp_group_ranks"]) == (launcher, "gloo", [0, 1]), p
        assert p["sum"] == [3.0] * 4 and p["min"] == 100, p  # ranks contribute 1 and 2; min of 100, 101
        assert p["gathered"] == [[0.0, 0.0, 1.0, 1.0]] and p["plan_from"] == 0, p
        assert p["rendezvous_host"] == "127.0.0.1", p
    assert probes[0]["replicas"] == [0] and probes[1]["replicas"] is None


def test_plain_single_process():
    status, output, _ = _launch([sys.executable, PROBE_SCRIPT], clean_launch_env())
    assert status == 0, output
    [probe] = _probes(output)
    assert (probe["launcher"], probe["world_size"], probe["tp_size"], probe["backend"]) == ("single", 1, 1, None)
    assert probe["sum"] == [1.0] * 4 and probe["replicas"] == [0]


def test_mpirun_two_ranks():
    mpirun = launcher_tool("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun: install an MPI runtime matching mpi4py (e.g. `pip install mpich`)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    status, output, _ = _launch([mpirun, *mpirun_flags(mpirun), "-np", "2", sys.executable, PROBE_SCRIPT, "--tp", "2"],
                                clean_launch_env())
    assert status == 0, output
    _check_two_rank_tp_job(_probes(output), "mpirun", output)


def test_deepspeed_launcher_two_cpu_ranks():
    deepspeed = launcher_tool("deepspeed")
    if deepspeed is None:
        pytest.skip("no `deepspeed` launcher: `pip install deepspeed`")
    port = str(free_port())
    cmd = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", port, PROBE_SCRIPT,
           "--tp", "2"]
    status, output, _ = _launch(cmd, clean_launch_env(MASTER_ADDR="127.0.0.1"))
    assert status == 0, output
    probes = _probes(output)
    _check_two_rank_tp_job(probes, "deepspeed", output)
    for p in probes:
        # deepspeed.comm never loaded, so its CPU shared-memory op was never built (45-95 s cold, ~3 s cached)
        assert not p["deepspeed_imported"] and p["init_s"] < 2.5, p


def test_detect_env_launchers():
    ds = detect_launcher({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": "29500", "CROSS_RANK": "1", "LOCAL_SIZE": "2"}, ["s.py", "--local_rank=1"])
    assert (ds.launcher, ds.rank, ds.world_size, ds.local_rank, ds.local_world_size) == ("deepspeed", 3, 4, 1, 2)
    assert (ds.master_addr, ds.master_port) == ("127.0.0.1", 29500)
    torchrun = detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, ["s.py"])
    assert (torchrun.launcher, torchrun.local_world_size) == ("torchrun", 2)
    no_local_rank_var = detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
                                        ["s.py", "--local_rank", "1"])
    assert (no_local_rank_var.launcher, no_local_rank_var.local_rank) == ("deepspeed", 1)
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}, ["s.py"]).launcher == "mpirun"
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "2", "WORLD_SIZE": "2"}, ["s.py"]).launcher == "mpirun"
    assert detect_launcher({}, ["s.py"]).launcher == "single"
    with pytest.raises(ValueError, match="not MASTER_ADDR, MASTER_PORT"):
        detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}, ["s.py"])
    with pytest.raises(ValueError, match="RANK=2 is outside WORLD_SIZE=2"):
        detect_launcher({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["s.py"])


def test_strip_local_rank_arg():
    assert strip_local_rank_arg(["--local_rank=3", "--tp", "2"]) == ["--tp", "2"]
    assert strip_local_rank_arg(["--tp", "2", "--local_rank", "0", "x"]) == ["--tp", "2", "x"]
    assert strip_local_rank_arg(["--local-rank=1", "--model", "m"]) == ["--model", "m"]
    assert strip_local_rank_arg(["--model", "m"]) == ["--model", "m"]
    assert local_rank_from_argv(["s.py", "--local_rank=3"]) == 3
    assert local_rank_from_argv(["s.py"]) is None


def test_cuda_device_of_each_rank():
    """Local rank r drives GPU r of the host; a rank that was given one GPU of its own
    (CUDA_VISIBLE_DEVICES naming one device, as Slurm and some mpirun set-ups do) drives device 0;
    too few GPUs is refused on every such rank with a reason."""
    from kcache_dist.parallel.process_group import cuda_device_of_rank

    assert [cuda_device_of_rank(r, r, 4, None) for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_device_of_rank(r, r, 4, "0,1,2,3") for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_device_of_rank(r, r, 1, str(r)) for r in range(4)] == [0, 0, 0, 0]
    assert cuda_device_of_rank(0, 0, 1, None) == 0
    with pytest.raises(ValueError, match=r"^rank 5 has local rank 1 but this host shows 1 GPU\(s\); start at most "
                                         r"that many ranks per node, or give each rank its own GPU with "
                                         r"CUDA_VISIBLE_DEVICES$"):
        cuda_device_of_rank(5, 1, 1, None)
    with pytest.raises(ValueError, match="local rank 2 but this host shows 2 GPU"):
        cuda_device_of_rank(2, 2, 2, "0,1")


@pytest.mark.parametrize("version, tools, flags", [
    ("HYDRA build details:\n    Version:                                 5.0.2", [], []),
    ("mpirun (Open MPI) 4.1.2\n\nReport bugs to http://www.open-mpi.org/community/help/", ["ssh"],
     ["--allow-run-as-root", "--oversubscribe"]),
    ("mpirun (Open MPI) 4.1.2\n", [], ["--allow-run-as-root", "--oversubscribe", "--mca", "plm", "^rsh"]),
    ("mpirun (Open MPI) 4.1.2\n", ["rsh"], ["--allow-run-as-root", "--oversubscribe"]),
    ("mpirun (Open MPI) 5.0.3\n", [], ["--allow-run-as-root", "--oversubscribe"]),
])
def test_mpirun_flags_by_mpi_and_remote_shell(tmp_path, monkeypatch, version, tools, flags):
    """MPICH needs no flags; Open MPI may run as root with more ranks than cores, and Open MPI 4
    leaves out its rsh launcher when neither ssh nor rsh is installed (a one-machine job needs
    neither, but it refuses to start without them)."""
    for name, text in [("mpirun", f"#!/bin/sh\necho '{version}'\n"), *[(t, "#!/bin/sh\n") for t in tools]]:
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert mpirun_flags(str(tmp_path / "mpirun")) == flags
