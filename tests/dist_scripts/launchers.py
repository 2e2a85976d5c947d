"""Finding the real launchers (mpirun, deepspeed) and the environment to start them in, for the
tests that launch real jobs on CPU (tests/test_parallel_launchers.py, tests/test_server_multi_rank.py)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

# Launcher variables of an enclosing job must not leak into the launches.
_LAUNCHER_VARIABLES = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|"
                                 r"CROSS_RANK|CROSS_SIZE|TORCHELASTIC_.*|PMI_.*|PMIX_.*|OMPI_.*|MPI_LOCAL.*|"
                                 r"MV2_.*|GLOO_SOCKET_IFNAME)$")


def launcher_tool(name: str) -> Optional[str]:
    """`name` next to this Python (where pip puts mpich's and deepspeed's commands), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def clean_launch_env(**extra: str) -> dict:
    """This environment without launcher variables, the repository on PYTHONPATH, one OpenMP
    thread per rank, and `extra` (tests set MASTER_ADDR=127.0.0.1: DeepSpeed's own discovery
    would pick a non-loopback address)."""
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARIABLES.match(k)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", **extra)
    return env

