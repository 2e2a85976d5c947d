"""The server's log format: every line of a multi-rank job names the rank that wrote it (all ranks
usually share the launcher's output)."""

from __future__ import annotations

import logging

from ..parallel import current_state

LOG_FORMAT = "%(asctime)s %(rank_tag)s%(levelname)s %(name)s: %(message)s"


class RankTag(logging.Filter):
    """Sets `record.rank_tag` to "[rank R] " once this process has joined a job of more than one
    rank, else to "" (a single process, or before `init_parallel`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        state = current_state()
        record.rank_tag = f"[rank {state.rank}] " if state.world_size > 1 else ""
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """INFO and above to stderr, in LOG_FORMAT (nothing changes if logging was set up already)."""
    handler = logging.StreamHandler()
    handler.addFilter(RankTag())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
