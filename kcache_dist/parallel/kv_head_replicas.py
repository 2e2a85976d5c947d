"""A KV head's whole query group when tensor parallelism replicates KV heads.

With more ranks than KV heads (tp = r x num_kv_heads), each KV head lives on r consecutive ranks
(`layers/linear.QKVParallelLinear`), and each of them holds 1/r of the query heads of its group.
KCache picks its far positions per KV head from the scores of the whole group (max or sum over
its query heads, `KCacheConfig.group_reduce`), so a rank that picked from its own query heads
alone would pick otherwise than one process does. `KVHeadReplicas` gathers the group's queries
before the pick (one all-gather over the TP group of [T, Hq_local * D], small beside the K pass)
and keeps this rank's own heads of the output afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collectives import tp_gather_last_dim
from .state import current_state


@dataclass(frozen=True)
class KVHeadReplicas:
    """replicas: ranks that hold each KV head (1: no replication); index: this rank's place among them."""

    replicas: int = 1
    index: int = 0

    @classmethod
    def of_this_rank(cls, total_num_kv_heads: int) -> "KVHeadReplicas":
        state = current_state()
        if state.tp_size <= total_num_kv_heads:
            return cls()
        replicas = state.tp_size // total_num_kv_heads
        return cls(replicas, state.tp_rank % replicas)

    def whole_groups(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, Hq_local, D] on each rank -> [T, replicas * Hq_local, D]: the query heads of this
        rank's KV head(s) on every rank that holds them, in the model's head order."""
        if self.replicas == 1:
            return q
        t, heads, d = q.shape
        everyone = tp_gather_last_dim(q.reshape(t, heads * d)).view(t, -1, heads, d)  # [T, tp, Hq_local, D]
        first = current_state().tp_rank - self.index
        return everyone[:, first:first + self.replicas].reshape(t, self.replicas * heads, d)

    def own_heads(self, out: torch.Tensor) -> torch.Tensor:
        """out [T, replicas * Hq_local, D] of `whole_groups`' queries -> this rank's [T, Hq_local, D]."""
        if self.replicas == 1:
            return out
        heads = out.shape[1] // self.replicas
        return out[:, self.index * heads:(self.index + 1) * heads]
