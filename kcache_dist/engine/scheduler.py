"""Continuous batching: which sequences run each step, under a token budget and the cache blocks.

Each step, running sequences (oldest first) get their next tokens — one for a decode, up to the
remaining budget for a prompt being prefilled in chunks. When a running sequence needs a block and
none is free, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed from its prompt and the tokens it already produced. With
`replay_outputs` (KCache mode, where a decode attends sparsely and a prefill densely) the produced
tokens are recomputed as decodes, one a step, as they were computed first, so that the sequence
continues as it would have without the preemption; otherwise they are prefilled with the prompt.
Waiting sequences are admitted, oldest first, while the budget, `max_num_seqs` and free blocks
allow (a sequence is admitted only when blocks for all its known tokens are free). A sequence
holds a hot slot from admission until it finishes or is preempted, and its block table only grows
meanwhile, so a plan carries only the blocks added since its previous plan (`block_table_rows.py`).
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from ..cache.block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .step_plan import StepPlan


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 replay_outputs: bool = False):
        self.block_manager = block_manager
        self.replay_outputs = replay_outputs
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._free_hot_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Optional[StepPlan]:
        """The next step's plan, or None when nothing is waiting or running."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.block_manager.can_grow(seq.block_table, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.block_manager.grow(seq.block_table, seq.num_computed_tokens + n)
            scheduled.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_grow(seq.block_table, seq.num_tokens):
                break
            self.block_manager.grow(seq.block_table, seq.num_tokens)
            self.waiting.popleft()
            seq.hot_slot = self._free_hot_slots.pop()
            seq.num_slot_blocks = 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled:
            return None
        # A decode: one new token, an output token (the sequence's last known one, or with
        # replay_outputs any). The last token of a prompt (a one-token chunk) is prefilled densely,
        # as the rest of the prompt is.
        decode = {s.seq_id: n == 1 and s.num_computed_tokens >= s.num_prompt_tokens
                  and (self.replay_outputs or s.num_computed_tokens == s.num_tokens - 1) for s, n in scheduled}
        scheduled.sort(key=lambda item: not decode[item[0].seq_id])  # stable: the decodes first
        kept_blocks, new_blocks = [], []
        for s, _ in scheduled:  # the runners write the plan's blocks into the sequences' hot slot rows
            kept_blocks.append(s.num_slot_blocks)
            new_blocks.append(s.block_table[s.num_slot_blocks:])
            s.num_slot_blocks = len(s.block_table)
        return StepPlan(
            seq_ids=[s.seq_id for s, _ in scheduled],
            num_new_tokens=[n for _, n in scheduled],
            num_computed_tokens=[s.num_computed_tokens for s, _ in scheduled],
            token_ids=[t for s, n in scheduled for t in s.token_ids[s.num_computed_tokens:s.num_computed_tokens + n]],
            kept_blocks=kept_blocks,
            new_blocks=new_blocks,
            hot_slots=[s.hot_slot for s, _ in scheduled],
            sample=[s.num_computed_tokens + n == s.num_tokens for s, n in scheduled],
            decode=[decode[s.seq_id] for s, _ in scheduled],
        )

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's uncomputed tokens run this step: as many as the budget allows,
        but with replay_outputs a prompt's prefill stops at the end of the prompt, and the tokens
        after it run one a step."""
        n = min(seq.num_uncomputed_tokens, budget)
        if self.replay_outputs:
            prompt_left = seq.num_prompt_tokens - seq.num_computed_tokens
            n = min(n, prompt_left if prompt_left > 0 else 1)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_resources(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_resources(seq)
        seq.status = SequenceStatus.FINISHED

    def _release_resources(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        if seq.hot_slot is not None:
            self._free_hot_slots.append(seq.hot_slot)
            seq.hot_slot = None
