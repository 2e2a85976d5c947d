"""Join the job through `init_parallel`, run a few collectives, print this rank's facts as one JSON
line prefixed "PROBE ". Started by tests/test_parallel_launchers.py under `mpirun`, `deepspeed` and
as a plain process:

    mpirun -np 2 python tests/dist_scripts/launch_probe.py --tp 2
    deepspeed --num_gpus 2 tests/dist_scripts/launch_probe.py --tp 2     (appends --local_rank=N)
    torchrun --nproc_per_node 2 tests/dist_scripts/launch_probe.py --tp 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kcache_dist.parallel import (all_reduce_min, barrier, dp_gather_objects, exit_on_lost_rank, init_parallel,
                                  shutdown_parallel, strip_local_rank_arg, tp_all_reduce, tp_broadcast_object,
                                  tp_gather_last_dim)
from kcache_dist.parallel.state import current_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--timeout", type=float, default=30.0, help="collective timeout, seconds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live")
    args = parser.parse_args(strip_local_rank_arg(sys.argv[1:]))

    torch.set_num_threads(1)
    with exit_on_lost_rank():
        start = time.monotonic()
        state = init_parallel(args.tp, device_type=args.device, timeout_s=args.timeout)
        init_s = time.monotonic() - start
        device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        summed = tp_all_reduce(torch.full((4,), float(state.rank + 1), device=device))
        gathered = tp_gather_last_dim(torch.full((1, 2), float(state.rank), device=device))
        plan = tp_broadcast_object({"from_rank": state.rank})
        smallest = all_reduce_min(100 + state.rank)
        replicas = dp_gather_objects(state.dp_rank)
        barrier()
    groups = current_groups()
    store = groups.store if groups is not None else None
    facts = {"rank": state.rank, "local_rank": state.local_rank, "world_size": state.world_size,
             "local_world_size": state.local_world_size, "tp_rank": state.tp_rank, "tp_size": state.tp_size,
             "dp_rank": state.dp_rank, "tp_group_ranks": list(state.tp_group_ranks), "backend": state.backend,
             "launcher": state.launcher, "device": str(summed.device), "sum": summed.tolist(),
             "gathered": gathered.tolist(), "plan_from": plan["from_rank"], "min": smallest, "replicas": replicas,
             "rendezvous_host": store.host if store is not None else None, "init_s": round(init_s, 3),
             "deepspeed_imported": "deepspeed" in sys.modules}
    print("PROBE " + json.dumps(facts), flush=True)
    shutdown_parallel()


if __name__ == "__main__":
    main()
