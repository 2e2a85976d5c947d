"""Which launcher started this process, read from its environment (and nothing else).

Three kinds of start are recognised, in this order:

1. An env launcher — the DeepSpeed launcher (`deepspeed --num_gpus N script.py`), torchrun, or a
   job script — that sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (and usually
   `LOCAL_RANK`). The DeepSpeed launcher also appends `--local_rank=N` to the script's arguments;
   `strip_local_rank_arg` removes it for scripts that parse their arguments with argparse.
2. `mpirun` / `mpiexec`: recognised by the variables MPI process managers set (MPICH/Hydra
   `PMI_RANK`, Open MPI `OMPI_COMM_WORLD_SIZE`, PMIx `PMIX_RANK`, ...). Ranks then come from mpi4py
   (`mpi.py`); the rendezvous address is chosen there.
3. Nothing: a single process, rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

ENV_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Variables set by MPI process managers for each rank (any one of them means "started by mpirun").
MPI_RANK_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                      "MV2_COMM_WORLD_RANK", "MPI_LOCALRANKID")

_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(=(?P<value>-?\d+))?$")


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process.

    launcher: "deepspeed", "torchrun", "env" (RANK/WORLD_SIZE set by something else), "mpirun" or
    "single". For "mpirun", rank and world size are filled in by `mpi.py`, not from here.
    local_rank / local_world_size: None when the launcher does not say.
    """

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: Optional[int] = None
    local_world_size: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def strip_local_rank_arg(argv: Sequence[str]) -> list[str]:
    """`argv` without the `--local_rank=N` (or `--local_rank N`, `--local-rank=N`) that the DeepSpeed
    launcher appends. Use as `parser.parse_args(strip_local_rank_arg(sys.argv[1:]))`."""
    out: list[str] = []
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        match = _LOCAL_RANK_ARG.match(arg)
        if match is None:
            out.append(arg)
        elif match.group("value") is None and i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit():
            skip_next = True
    return out


def local_rank_from_argv(argv: Sequence[str]) -> Optional[int]:
    """The N of a `--local_rank=N` / `--local_rank N` argument, or None."""
    for i, arg in enumerate(argv):
        match = _LOCAL_RANK_ARG.match(arg)
        if match is None:
            continue
        if match.group("value") is not None:
            return int(match.group("value"))
        if i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return None


def _int_var(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def started_by_mpirun(env: Mapping[str, str]) -> bool:
    return any(name in env for name in MPI_RANK_VARIABLES)


def detect_launcher(env: Optional[Mapping[str, str]] = None, argv: Optional[Sequence[str]] = None) -> LaunchInfo:
    """Read the launcher's variables from `env` (default os.environ) and `argv` (default sys.argv)."""
    env = os.environ if env is None else env
    argv = sys.argv if argv is None else argv
    # DeepSpeed's MPICH runner sets WORLD_SIZE but not RANK: the ranks then come from MPI.
    if "RANK" in env or ("WORLD_SIZE" in env and not started_by_mpirun(env)):
        missing = [name for name in ENV_LAUNCHER_VARIABLES if not env.get(name)]
        if missing:
            raise ValueError(f"the launcher set {', '.join(n for n in ENV_LAUNCHER_VARIABLES if n not in missing)} "
                             f"but not {', '.join(missing)}; a distributed start needs all of "
                             f"{', '.join(ENV_LAUNCHER_VARIABLES)}")
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        local_rank = _int_var(env, "LOCAL_RANK")
        if local_rank is None:
            local_rank = local_rank_from_argv(argv)
        if "CROSS_RANK" in env or "LOCAL_SIZE" in env or local_rank_from_argv(argv) is not None:
            launcher = "deepspeed"
        elif "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env:
            launcher = "torchrun"
        else:
            launcher = "env"
        local_world = _int_var(env, "LOCAL_WORLD_SIZE")
        if local_world is None:
            local_world = _int_var(env, "LOCAL_SIZE")
        return LaunchInfo(launcher, rank, world, local_rank, local_world, env["MASTER_ADDR"],
                          _int_var(env, "MASTER_PORT"))
    if started_by_mpirun(env):
        return LaunchInfo("mpirun", master_addr=env.get("MASTER_ADDR") or None)
    return LaunchInfo("single", local_rank=0, local_world_size=1)


def mpirun_flags(mpirun: str = "mpirun") -> list[str]:
    """Flags for starting `mpirun` on this machine: Open MPI refuses root and more ranks than cores
    without them, and Open MPI 4 fails to start even a one-machine job when neither ssh nor rsh is
    installed (as in many containers) unless its rsh launcher is left out; MPICH needs none."""
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" not in version:
        return []
    flags = ["--allow-run-as-root", "--oversubscribe"]
    if re.search(r"Open MPI\)? 4\.", version) and shutil.which("ssh") is None and shutil.which("rsh") is None:
        flags += ["--mca", "plm", "^rsh"]
    return flags
