"""`launch/serve.py`: parse flags, build the engine and its driver, serve HTTP until a signal.

Single process (tensor parallel size 1) for now. The pieces are kept apart for the multi-rank
version: the engine and its driver thread run on rank 0 next to the HTTP app, while the other
ranks will run a worker loop that executes the broadcast step plans.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from .cli_args import build_parser, engine_config_from_args, server_settings_from_args

logger = logging.getLogger("kcache_dist.server")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        settings = server_settings_from_args(args, config)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from ..engine.llm_engine import LLMEngine
    from .app import build_app
    from .chat_prompt import ChatPromptBuilder
    from .engine_driver import EngineDriver
    from .http_server import serve_http

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logger.error("cannot start the engine: %s", e)
        return 1
    driver = EngineDriver(engine).start()
    chat_prompts = ChatPromptBuilder(config.tokenizer or engine.model_dir)
    app = build_app(driver, chat_prompts, settings)
    logger.info("serving %s (%s mode, max_model_len %d) on http://%s:%d", settings.served_model_names[0],
                config.kcache.mode, engine.max_model_len, settings.host, settings.port)
    server = None
    try:
        server = serve_http(app, settings, on_exit_signal=driver.stop_accepting)
    finally:
        forced = server is None or server.force_exit  # a failed start, or a second Ctrl-C: abort what runs
        all_finished = driver.shutdown(timeout_s=0 if forced else settings.shutdown_timeout_s)
        chat_prompts.close()
    if driver.crash is not None:
        logger.error("the engine driver crashed: %s", driver.crash)
        return 1
    logger.info("stopped (%s)", "every request finished" if all_finished else "some requests were aborted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
