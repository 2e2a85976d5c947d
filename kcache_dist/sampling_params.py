"""Per-request sampling parameters, in vLLM's spelling."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import as_int as _as_int, is_int as _is_int, is_number as _is_number


# Temperatures below this sample greedily: dividing float32 logits by them overflows (and one below
# float32's smallest number becomes 0), while the distribution they describe is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """Which outputs the engine's `step` returns for a request, as in vLLM."""

    CUMULATIVE = 0  # one every step: all the text and token ids so far
    DELTA = 1  # one every step: only the text and token ids new since the request's previous output
    FINAL_ONLY = 2  # one, when the request finishes: all its text and token ids


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    temperature 0 (or below GREEDY_TEMPERATURE, as in vLLM) means greedy. top_k <= 0 and top_p == 1 disable those filters. `stop` strings
    end the output and are cut from its text (the token that completed one stays in token_ids);
    `stop_token_ids` and the model's EOS (unless `ignore_eos`) end it too. `stop` is a string or an
    iterable of strings; `stop_token_ids` an iterable of integers (a numpy array if 1-D; numpy's
    integers kept as Python ints). `seed` makes sampling reproducible whatever else runs in the same
    batch. `output_kind` says which outputs the engine returns (`RequestOutputKind`; `LLM.generate`
    asks for FINAL_ONLY).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    max_tokens: int = 16
    stop: Union[str, Sequence[str], None] = ()
    stop_token_ids: Optional[Sequence[int]] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stop_tuple(self.stop))
        given_stop_token_ids = _stop_token_ids_tuple(self.stop_token_ids)  # set once its ids are checked, below
        if not (_is_int(self.n) and self.n == 1):
            raise ValueError(f"n must be 1 (one completion per request), got {self.n!r}")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0 disable it), got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        stop_token_ids = []
        for t in given_stop_token_ids:
            value = _as_int(t)
            if value is None or value < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {t!r}")
            stop_token_ids.append(value)
        object.__setattr__(self, "stop_token_ids", tuple(stop_token_ids))  # numpy's integers as Python ints
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError("output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY), "
                             f"got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _stop_tuple(stop: Any) -> tuple:
    """`SamplingParams.stop` as a tuple (its strings are checked after): a string, or any iterable
    of them as vLLM takes; ValueError for anything else (e.g. 5 or b"end")."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, Iterable) and not isinstance(stop, (bytes, bytearray)):
        return tuple(stop)
    raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")


def _stop_token_ids_tuple(stop_token_ids: Any) -> tuple:
    """`SamplingParams.stop_token_ids` as a tuple (its ids are checked after): any iterable of
    integers as vLLM takes, a numpy array if 1-D; ValueError for anything else (e.g. 5 or "12")."""
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, np.ndarray):
        if stop_token_ids.ndim == 1:
            return tuple(stop_token_ids.tolist())
    elif isinstance(stop_token_ids, Iterable) and not isinstance(stop_token_ids, (str, bytes, bytearray)):
        return tuple(stop_token_ids)
    raise ValueError(f"stop_token_ids must be a list of integers, got {type(stop_token_ids).__name__}")
