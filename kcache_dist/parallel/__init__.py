"""Process groups and collectives: the only code that reads launcher environment or touches
torch.distributed / deepspeed.comm / mpi4py. Model layers call `tp_rank()`, `tp_size()` and the
collectives below; the engine calls `init_parallel` once, before building the model.

    from kcache_dist.parallel import exit_on_lost_rank, init_parallel

    with exit_on_lost_rank():               # a dead peer: message on stderr, exit status 1
        state = init_parallel(tensor_parallel_size=2, device_type="cuda")
        ...                                 # build the model, serve

Works under `deepspeed --num_gpus N script.py`, torchrun, `mpirun -np N python script.py` and as
a plain single process (rank 0 of 1, no process group).
"""

from .collectives import (ReplicaProgress, all_reduce_min, all_reduce_slot, barrier, disable_two_shot_all_reduce,
                          dp_gather_objects, enable_two_shot_all_reduce, tp_all_reduce, tp_broadcast_object,
                          tp_gather_last_dim, tp_gather_objects, two_shot_all_reduce_enabled, wait_for_device)
from .errors import RankLostError, exit_for_lost_rank, exit_on_lost_rank, rank_was_lost
from .kv_head_replicas import KVHeadReplicas
from .launcher import strip_local_rank_arg
from .process_group import init_parallel, launched_world_size, shutdown_parallel
from .state import ParallelState, current_state, tp_rank, tp_size, world_size

__all__ = [
    "init_parallel", "launched_world_size", "shutdown_parallel", "ParallelState", "current_state", "tp_rank",
    "tp_size", "world_size",
    "tp_all_reduce", "tp_gather_last_dim", "tp_broadcast_object", "tp_gather_objects", "dp_gather_objects",
    "enable_two_shot_all_reduce", "disable_two_shot_all_reduce", "two_shot_all_reduce_enabled", "wait_for_device",
    "all_reduce_slot",
    "all_reduce_min", "barrier", "ReplicaProgress", "KVHeadReplicas",
    "RankLostError", "exit_for_lost_rank", "exit_on_lost_rank", "rank_was_lost", "strip_local_rank_arg",
]
