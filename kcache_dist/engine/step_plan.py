"""What the scheduling rank sends its tensor-parallel workers, in plain data: each step's plan
(`StepPlan`, whose block tables come as what changed since the runners last had them:
`block_table_rows.py`), a `KeepAlive` while there is no work, or None to stop them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .micro_batches import part_bounds


@dataclass
class StepPlan:
    """Sequences to run this step, the decodes first.

    For sequence i: `num_new_tokens[i]` tokens starting at position `num_computed_tokens[i]`, whose
    ids are its slice of `token_ids` (flat, in sequence order); its row in per-sequence buffers is
    `hot_slots[i]`; its cache blocks are the `kept_blocks[i]` first that its hot slot's row of the
    runner's block tables holds from earlier plans (0: its table starts anew) followed by
    `new_blocks[i]` (`block_table_rows.py`); `sample[i]` says whether the step ends its known
    tokens, so a next token is sampled from the logits of its last new token. `decode[i]` says
    whether its one new token is a decode (its last known token, an output token: attended as a
    decode, sparse in KCache mode) rather than a one-token prefill chunk (dense, as the rest of its
    prompt); None: every sequence with one new token is a decode.
    A decode-only step runs as `micro_batches` micro-batches on as many CUDA streams, op by op or
    from its CUDA graph (`engine/micro_batches.py`), the same on every rank.
    """

    seq_ids: list[int]
    num_new_tokens: list[int]
    num_computed_tokens: list[int]
    token_ids: list[int]
    kept_blocks: list[int]
    new_blocks: list[list[int]]
    hot_slots: list[int]
    sample: list[bool]
    micro_batches: int = 1
    decode: Optional[list[bool]] = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_decodes(self) -> int:
        if self.decode is None:
            return sum(1 for n in self.num_new_tokens if n == 1)
        return sum(self.decode)

    @property
    def decode_only(self) -> bool:
        return 0 < self.num_seqs == self.num_decodes

    def split(self, parts: int) -> list["StepPlan"]:
        """The sequences in `parts` contiguous groups of near-equal size (at most num_seqs groups),
        each a plan of its own (micro_batches 1); the runner writes the whole plan's block tables
        (`BlockTableRows.write`) before it runs the parts."""
        bounds = part_bounds(self.num_seqs, parts)
        token_starts = [0]
        for n in self.num_new_tokens:
            token_starts.append(token_starts[-1] + n)
        return [StepPlan(self.seq_ids[a:b], self.num_new_tokens[a:b], self.num_computed_tokens[a:b],
                         self.token_ids[token_starts[a]:token_starts[b]], self.kept_blocks[a:b],
                         self.new_blocks[a:b], self.hot_slots[a:b], self.sample[a:b],
                         decode=None if self.decode is None else self.decode[a:b])
                for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class KeepAlive:
    """A no-op message from the scheduling rank while it has no work, so that a worker waiting for
    the next plan does not run into the collective timeout."""
