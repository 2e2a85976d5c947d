"""How the world's ranks split into tensor-parallel (TP) and data-parallel (DP) groups. Pure
arithmetic, no communication.

world_size = dp_size x tp_size. A TP group is `tp_size` consecutive global ranks:
TP group d = ranks [d * tp_size, (d + 1) * tp_size), so rank r has tp_rank = r % tp_size and
dp_rank = r // tp_size. Launchers number ranks node by node, so a TP group (whose all-reduces run
every layer) stays inside one node unless tp_size exceeds the ranks per node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    def tp_group_ranks(self, dp_rank: int) -> tuple[int, ...]:
        """Global ranks of the TP group `dp_rank`, in TP rank order."""
        return tuple(range(dp_rank * self.tp_size, (dp_rank + 1) * self.tp_size))

    def all_tp_groups(self) -> list[tuple[int, ...]]:
        return [self.tp_group_ranks(d) for d in range(self.dp_size)]

    def dp_leaders(self) -> tuple[int, ...]:
        """The first rank of each TP group, in DP rank order (they speak for their group)."""
        return tuple(range(0, self.world_size, self.tp_size))


def _describe_hosts(hostnames: Sequence[str]) -> str:
    ranks_by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hostnames):
        ranks_by_host.setdefault(host, []).append(rank)
    return "; ".join(f"host {host!r} has ranks {ranks}" for host, ranks in ranks_by_host.items())


def local_position(hostnames: Sequence[str], rank: int) -> tuple[int, int]:
    """(local rank, ranks on this host) of `rank`, counting the ranks that share its host name."""
    host = hostnames[rank]
    return list(hostnames[:rank]).count(host), list(hostnames).count(host)


def plan_layout(world_size: int, tp_size: int, hostnames: Optional[Sequence[str]] = None,
                allow_cross_node_tp: bool = False) -> Layout:
    """Check `tp_size` against the job and return the layout; ValueError naming the numbers if not.

    hostnames[r]: rank r's host name, when known. Unless `allow_cross_node_tp`, every TP group must
    lie on one host (so tp_size <= ranks per node, with ranks laid out node by node).
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp_size!r}")
    if world_size == 1 and tp_size > 1:
        raise ValueError(f"tensor_parallel_size {tp_size} needs {tp_size} processes, but this process was "
                         f"started alone (world size 1); start it with e.g. `deepspeed --num_gpus {tp_size} "
                         f"script.py` or `mpirun -np {tp_size} python script.py`")
    if world_size % tp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the world size {world_size} "
                         f"(processes in the job): with {world_size} processes it must be one of {divisors}")
    layout = Layout(world_size, tp_size)
    if hostnames is None or allow_cross_node_tp:
        return layout
    if len(hostnames) != world_size:
        raise ValueError(f"got {len(hostnames)} host names for a world of {world_size} ranks")
    ranks_per_host = Counter(hostnames)
    fewest_per_host = min(ranks_per_host.values())
    for group in layout.all_tp_groups():
        hosts = sorted({hostnames[r] for r in group})
        if len(hosts) == 1:
            continue
        if tp_size > fewest_per_host:
            raise ValueError(f"tensor_parallel_size {tp_size} is larger than the {fewest_per_host} ranks per node "
                             f"({_describe_hosts(hostnames)}), so the TP group of ranks {list(group)} would "
                             f"span hosts {hosts}; use tensor_parallel_size <= {fewest_per_host} or pass "
                             "allow_cross_node_tp=True")
        raise ValueError(f"the TP group of ranks {list(group)} spans hosts {hosts} because ranks are not laid out "
                         f"node by node ({_describe_hosts(hostnames)}); start consecutive ranks on the same node "
                         "or pass allow_cross_node_tp=True")
    return layout
