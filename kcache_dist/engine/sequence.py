"""One request as the engine tracks it: its tokens, how many are in the cache, its blocks."""

from __future__ import annotations

import enum
from typing import Optional

import torch

from ..sampling_params import SamplingParams
from .detokenizer import StreamedText


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams):
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self._prompt_token_ids = list(prompt_token_ids)  # every output of the request shares it (no copy a step)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.hot_slot: Optional[int] = None  # row in per-sequence device buffers while running
        self.num_slot_blocks = 0  # leading blocks of block_table that the runners' row for hot_slot holds
        self.status = SequenceStatus.WAITING
        self.num_preemptions = 0
        self.output_text = ""
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[object] = None
        # what the request's DELTA outputs carried so far
        self.num_output_tokens_sent = 0
        self.streamed_text = StreamedText(params.stop)
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens  # without output_token_ids' copy

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
