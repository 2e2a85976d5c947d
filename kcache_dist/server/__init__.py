"""OpenAI-compatible HTTP serving (rank 0 only; never touches CUDA).

    engine_driver   the thread that owns the engine; requests queue in, outputs stream out
    app             the FastAPI routes over the driver
    http_server     uvicorn with a graceful drain on SIGINT/SIGTERM
    entrypoint      flags (cli_args) -> engine + driver + app; `main` is launch/serve.py
"""

from .entrypoint import main

__all__ = ["main"]
