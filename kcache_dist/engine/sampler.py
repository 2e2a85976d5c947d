"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling.

A request with a seed samples from its own generator, so its tokens do not depend on what else
runs in the batch; the others share the engine's generator.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with tokens outside top-k / top-p at -inf.

    The maximum is subtracted before scaling, so a tiny temperature sends the others to -inf
    (the argmax keeps probability 1) instead of overflowing to inf - inf = NaN."""
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:  # exactly top_k tokens survive, ties included
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, torch.topk(logits, params.top_k).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= params.top_p  # keeps the smallest set reaching top_p (never empty)
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[Optional[torch.Generator]], default_generator: torch.Generator,
           wait_for_device: Optional[Callable[[], None]] = None) -> list[int]:
    """logits [S, V] float32 (any device) -> one token id per row.

    Greedy rows take their argmax where the logits are (only S ids cross to the host); only the
    rows that sample move to the host, where the generators live. `wait_for_device`, if given, is
    called once the argmax is queued and before anything is read back (a wait with a deadline)."""
    greedy_ids = logits.argmax(-1)
    if wait_for_device is not None:
        wait_for_device()
    tokens = greedy_ids.tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    rows = logits[torch.tensor(sampled, device=logits.device)].float().cpu()
    for row, i in zip(rows, sampled):
        probs = filter_logits(row, params[i]).softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i] or default_generator))
    return tokens
