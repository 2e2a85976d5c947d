"""`launch/serve.py`: parse flags, build the engine, then serve until a signal.

Every rank of the job builds the engine (joining the job's ranks first). Rank 0, the scheduling
rank, runs the engine driver thread and the HTTP app; the other ranks of the tensor-parallel group
run the worker loop (worker_rank.py). At shutdown rank 0 drains the requests in flight, then stops
the workers, and every process exits with status 0. Works as one process, under
`deepspeed --num_gpus N` and under `mpirun -np N` (one tensor-parallel group of N ranks).

A lost rank (a worker died): the engine driver fails the requests in flight (a stream ends with an
error event, a plain request gets 503); for LOST_RANK_EXIT_GRACE_S rank 0 answers every new
request and /health with 503 naming the lost rank (a signal from the launcher meanwhile is logged,
not obeyed), then writes that message on stderr and exits with status 1; the other workers, whose
rank 0 is then gone, exit 1 too (worker_rank.py). mpirun (MPICH) kills rank 0 as soon as a rank
dies, so there the job ends at once, without the 503s.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Optional

from ..parallel import (RankLostError, exit_for_lost_rank, exit_on_lost_rank, launched_world_size,
                        strip_local_rank_arg)
from .cli_args import ServerSettings, build_parser, engine_config_from_args, server_settings_from_args
from .rank_logging import configure_logging

logger = logging.getLogger("kcache_dist.server")

LOST_RANK_EXIT_GRACE_S = 5.0  # after a lost rank, answer 503 this long (clients learn why), then exit 1


HTTP_PACKAGES = ("fastapi", "uvicorn")  # rank 0's HTTP app (setup.py's install_requires)


def missing_http_packages() -> list[str]:
    """The HTTP server's packages this Python cannot import."""
    import importlib.util

    return [name for name in HTTP_PACKAGES if importlib.util.find_spec(name) is None]


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # The DeepSpeed launcher appends --local_rank=N to each rank's arguments.
    args = parser.parse_args(strip_local_rank_arg(sys.argv[1:] if argv is None else argv))
    missing = missing_http_packages()
    if missing:  # every rank stops here, before any joins the job's collectives
        parser.error(f"the server needs the package(s) {', '.join(missing)}, which this Python cannot import; "
                     "install kcache_dist with its dependencies (pip install -e .)")
    try:
        config = engine_config_from_args(args, num_processes=launched_world_size())
        settings = server_settings_from_args(args, config)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    configure_logging()

    from ..engine.llm_engine import LLMEngine
    from .worker_rank import serve_as_worker

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logger.error("cannot start the engine: %s", e)
        return 1
    if not engine.is_scheduler:
        return serve_as_worker(engine)
    return serve_as_scheduler(engine, settings)


def exit_if_rank_lost(error: BaseException, grace_s: float = LOST_RANK_EXIT_GRACE_S,
                      exiting: Optional[threading.Event] = None) -> None:
    """The engine driver's crash hook (on its thread): a lost rank ends this process, and so the
    job, with status 1 after `grace_s`, while the HTTP app answers 503. Sets `exiting` first."""
    if not isinstance(error, RankLostError):
        return
    if exiting is not None:
        exiting.set()
    logger.error("%s; answering 503 for %g s, then exiting with status 1", error, grace_s)
    threading.Event().wait(grace_s)
    exit_for_lost_rank(error)


def serve_as_scheduler(engine, settings: ServerSettings) -> int:
    """Rank 0: the engine driver and the HTTP app until a signal; then drain, stop the workers."""
    from .app import build_app
    from .chat_prompt import ChatPromptBuilder
    from .engine_driver import EngineDriver
    from .http_server import serve_http

    config = engine.config
    exiting = threading.Event()  # set once a lost rank has doomed this process
    driver = EngineDriver(engine, on_crash=functools.partial(exit_if_rank_lost, exiting=exiting),
                          max_queued_requests=settings.max_queued_requests).start()
    chat_prompts = ChatPromptBuilder(config.tokenizer or engine.model_dir)
    app = build_app(driver, chat_prompts, settings)
    logger.info("serving %s (%s mode, max_model_len %d, tensor parallel size %d) on http://%s:%d",
                settings.served_model_names[0], config.kcache.mode, engine.max_model_len,
                engine.parallel.tp_size, settings.host, settings.port)
    server = None
    try:
        server = serve_http(app, settings, on_exit_signal=driver.stop_accepting, exiting_anyway=exiting.is_set)
    finally:
        forced = server is None or server.force_exit  # a failed start, or a second Ctrl-C: abort what runs
        all_finished = driver.shutdown(timeout_s=0 if forced else settings.shutdown_timeout_s)
        chat_prompts.close()
        workers_stopped = _stop_workers(engine, driver)
    if driver.crash is not None:
        logger.error("the engine driver crashed: %s", driver.crash)
        return 1
    if not workers_stopped:
        return 1
    logger.info("stopped (%s)", "every request finished" if all_finished else "some requests were aborted")
    return 0


def _stop_workers(engine, driver) -> bool:
    """Release the other ranks from their worker loop, once the driver thread (the engine's only
    user until now) has ended. Returns False if it could not."""
    if driver.alive:
        logger.error("the engine driver did not stop; the worker ranks are left to the collective timeout")
        return False
    if engine.parallel.tp_size > 1:
        with exit_on_lost_rank():
            engine.stop_workers()
        logger.info("stopped the %d worker rank(s)", engine.parallel.tp_size - 1)
    return True


if __name__ == "__main__":
    sys.exit(main())
