"""What the scheduling rank sends its tensor-parallel workers, in plain data: each step's plan
(`StepPlan`), a `KeepAlive` while there is no work, or None to stop them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepPlan:
    """Sequences to run this step, those with one new token first.

    For sequence i: `num_new_tokens[i]` tokens starting at position `num_computed_tokens[i]`, whose
    ids are its slice of `token_ids` (flat, in sequence order); its cache blocks are
    `block_tables[i]` and its row in per-sequence buffers `hot_slots[i]`; `sample[i]` says whether the step ends its known tokens, so a next token is
    sampled from the logits of its last new token.
    """

    seq_ids: list[int]
    num_new_tokens: list[int]
    num_computed_tokens: list[int]
    token_ids: list[int]
    block_tables: list[list[int]]
    hot_slots: list[int]
    sample: list[bool]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.num_new_tokens if n == 1)


@dataclass(frozen=True)
class KeepAlive:
    """A no-op message from the scheduling rank while it has no work, so that a worker waiting for
    the next plan does not run into the collective timeout."""
