"""OpenAI-compatible HTTP serving (HTTP on rank 0 only; never touches CUDA).

    engine_driver   the thread that owns the engine on rank 0; requests queue in, outputs stream out
    app             the FastAPI routes over the driver
    http_server     uvicorn with a graceful drain on SIGINT/SIGTERM
    worker_rank     the other ranks: the engine's worker loop until rank 0 stops it
    rank_logging    log lines that name their rank
    entrypoint      flags (cli_args) -> engine, then rank 0: driver + app; others: worker loop.
                    `main` is launch/serve.py
"""

from .entrypoint import main

__all__ = ["main"]
