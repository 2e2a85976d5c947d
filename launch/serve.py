"""Entry point of the main job: the OpenAI-compatible HTTP server.

    python launch/serve.py                          # the embedded default model on 127.0.0.1:8000
    python launch/serve.py --model PATH --port 8000 --api-key KEY
    python launch/serve.py --help                   # every flag
    deepspeed --num_gpus 4 launch/serve.py --model PATH    # one tensor-parallel group of 4 ranks
    mpirun -np 4 python launch/serve.py --model PATH        # the same under MPI

The server lives in kcache_dist/server/: rank 0 serves HTTP, the other ranks run the worker loop.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcache_dist.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
