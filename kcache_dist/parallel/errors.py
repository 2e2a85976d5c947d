"""A lost rank: a peer process died or stopped answering in the middle of a job.

gloo reports it as a plain RuntimeError ("Connection closed by peer", "Connection reset by peer",
"Timed out waiting 10000ms for recv operation") — at once when the peer's sockets close, at the
latest after the process group's timeout. The collectives turn those into `RankLostError`, naming
the lost rank when it can be known: every rank's host name and process id are exchanged at init,
so a peer on this host whose process is gone is named; otherwise the message names the group and
the timeout. `exit_on_lost_rank` turns the error into one line on stderr and exit status 1, so a
dead rank ends the whole job instead of leaving the others hung.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from .state import current_groups, current_state

# Messages of gloo / NCCL / c10d store failures that mean "a peer is gone or not answering".
_PEER_FAILURE = re.compile(r"connection (closed|reset|refused)|broken pipe|timed out|timeout|by peer|"
                           r"NCCL communicator was aborted|remote process exited", re.IGNORECASE)

# The generic advice gloo appends to its socket errors ("This is typically caused by ... GLHF!").
_GLOO_ADVICE = re.compile(r"\s*This is typically caused by.*$")

# How long to wait for a dead peer's process to finish exiting before naming it (seconds).
_PEER_EXIT_GRACE_S = 1.0


class RankLostError(RuntimeError):
    """A collective failed because a peer rank died or stopped answering.

    lost_ranks: global ranks known to be gone (empty when it cannot be known, e.g. peer on another
    host); group_ranks: the global ranks of the group whose collective failed.
    """

    def __init__(self, message: str, lost_ranks: Sequence[int] = (), group_ranks: Sequence[int] = ()):
        super().__init__(message)
        self.lost_ranks = tuple(lost_ranks)
        self.group_ranks = tuple(group_ranks)


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer dies or times out."""
    try:
        from torch.distributed import DistError
    except ImportError:  # very old torch
        DistError = ()  # type: ignore[assignment]
    if DistError and isinstance(error, DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_PEER_FAILURE.search(str(error)))


def _process_gone(pid: int) -> bool:
    """True when process `pid` (on this host) has exited or is a zombie."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class PeerDirectory:
    """Who is who in the job: this rank, every rank's host name and pid, the collective timeout, and
    where each pid means something (`process_group.pid_space`; empty: on the same host name, here)."""

    rank: int
    hostnames: tuple[str, ...]
    pids: tuple[int, ...]
    timeout_s: float
    pid_spaces: tuple[str, ...] = ()

    def pid_visible(self, rank: int) -> bool:
        """Whether `rank`'s pid names a process this one can look up: same host, same pid space."""
        return (self.hostnames[rank] == socket.gethostname()
                and (not self.pid_spaces or self.pid_spaces[rank] == self.pid_spaces[self.rank]))


def current_peers() -> Optional[PeerDirectory]:
    """The directory of the running job (None before init_parallel or in a single process)."""
    groups = current_groups()
    if groups is None or not groups.pids:
        return None
    return PeerDirectory(current_state().rank, groups.hostnames, groups.pids, groups.timeout_s, groups.pid_spaces)


def find_lost_ranks(group_ranks: Sequence[int], peers: Optional[PeerDirectory],
                    grace_s: float = _PEER_EXIT_GRACE_S) -> list[int]:
    """Ranks of `group_ranks` (other than this one) on this host whose process is gone, waiting up to
    `grace_s` for a dying peer to finish exiting. Ranks on other hosts, or in another pid namespace
    (a container of their own), cannot be checked."""
    if peers is None:
        return []
    local_peers = [r for r in group_ranks if r != peers.rank and peers.pid_visible(r)]
    deadline = time.monotonic() + grace_s
    while True:
        lost = [r for r in local_peers if _process_gone(peers.pids[r])]
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.05)


def describe_group(group_ranks: Sequence[int], group_name: str) -> str:
    ranks = list(group_ranks)
    if len(ranks) > 8:
        return f"{group_name} (global ranks {ranks[0]}..{ranks[-1]})"
    return f"{group_name} (global ranks {ranks})"


def rank_lost_error(operation: str, group_ranks: Sequence[int], group_name: str, cause: BaseException,
                    peers: Optional[PeerDirectory] = None) -> RankLostError:
    """The RankLostError for `cause`, a failure of `operation` over `group_ranks`. `peers`: the
    job's directory (default: the running job's)."""
    peers = peers or current_peers()
    me = peers.rank if peers is not None else current_state().rank
    timeout_s = peers.timeout_s if peers is not None else float("nan")
    group_ranks = list(group_ranks)
    lost = find_lost_ranks(group_ranks, peers)
    cause_text = _GLOO_ADVICE.sub("", " ".join(str(cause).split()))
    where = describe_group(group_ranks, group_name)
    if lost:
        gone = ", ".join(f"rank {r}: process {peers.pids[r]} on host {peers.hostnames[r]!r}" for r in lost)
        message = (f"rank {me}: lost rank(s) {lost} of {where} during {operation} "
                   f"({gone} has exited); cause: {cause_text}")
    else:
        others = [r for r in group_ranks if r != me]
        message = (f"rank {me}: {operation} over {where} failed: a peer rank died or did not answer within "
                   f"the collective timeout of {timeout_s:g} s; rank(s) that may be lost: {others}; "
                   f"cause: {cause_text}")
    mark_rank_lost()
    return RankLostError(message, lost, group_ranks)


def mark_rank_lost() -> None:
    """Record that a collective of this job failed: from then on the process groups are dropped,
    not torn down, at shutdown, and nothing waits on the device without a deadline (a kernel of the
    two-shot all-reduce may spin on the lost peer for ever)."""
    groups = current_groups()
    if groups is not None:
        groups.lost_rank = True


def rank_was_lost() -> bool:
    """Whether a collective of this job has failed (`mark_rank_lost`)."""
    groups = current_groups()
    return groups is not None and groups.lost_rank


@contextlib.contextmanager
def peer_failures_as_rank_lost(operation: str, group_ranks: Sequence[int], group_name: str) -> Iterator[None]:
    """Re-raise a peer failure inside the block as RankLostError; other errors pass unchanged."""
    try:
        yield
    except RankLostError:
        raise
    except Exception as error:
        if not is_peer_failure(error):
            raise
        raise rank_lost_error(operation, group_ranks, group_name, error) from error


def exit_for_lost_rank(error: RankLostError, exit_code: int = 1) -> None:
    """Write `error` as one line on stderr and end the process with `exit_code` at once, from any
    thread. No atexit handlers run: tearing down a process group whose peer is gone can block."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, f"kcache_dist: {error}; exiting with status {exit_code}\n".encode())
    os._exit(exit_code)


class _ExitOnLostRank(contextlib.ContextDecorator):
    def __init__(self, exit_code: int):
        self.exit_code = exit_code

    def __enter__(self) -> "_ExitOnLostRank":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, RankLostError):
            exit_for_lost_rank(exc, self.exit_code)
        return False


def exit_on_lost_rank(func: Optional[Callable] = None, *, exit_code: int = 1):
    """Turn a RankLostError into a message on stderr and `os._exit(exit_code)`.

    Use as a context manager (`with exit_on_lost_rank(): ...`) or a decorator (`@exit_on_lost_rank`
    or `@exit_on_lost_rank(exit_code=3)`). Other exceptions pass through unchanged.
    """
    guard = _ExitOnLostRank(exit_code)
    if func is None:
        return guard
    return functools.wraps(func)(guard(func))
