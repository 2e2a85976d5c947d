"""Teacher-forced emulation of KCache decoding: a block of known tokens run as decode steps in one forward.

The engine prefills a prompt with dense attention and then decodes one token per step; at a sparse
layer the step at position t attends (see `reference.py`) to the sink, the recent window and the
top_n far positions of its own context 0..t. Because a decode step's output depends only on the
tokens before it, feeding the tokens t0 .. t0+M-1 of a known text through one forward in which
*every* position attends exactly like that step gives, at every position, the logits the engine
would produce had it generated those tokens one by one. That costs one forward of M tokens instead
of M forwards of one, and it lets the dense prefix (identical for every KCache setting, since
prefill is always dense) be computed once and shared by all the settings compared on it.

    model = load_model(model_dir, torch.device("cpu"), torch.float32, max_len=8192)
    lm = TeacherForcedLM(model, capacity=8192)
    lm.prefill(prompt_ids)                            # dense, like the engine's prefill
    logits = lm.decode(block_ids, kcache_config)      # [M, vocab]: decode step at every position
    lm.truncate(len(prompt_ids))                      # drop the block, try another setting

`ScaledTopN` is a budget that grows with context (the design asks whether one is needed); it
replaces `top_n` wherever the emulation takes a KCacheConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..config import KCacheConfig
from ..forward_context import ForwardContext
from .fp8_keys import fp8_rounded

TopNAt = Callable[[int], int]
# on_select(first position, top [Hkv, t, most], counts [t]): the far positions picked for the t query
# positions from `first` on, per KV head, best score first; row i's picks are top[:, i, :counts[i]]
SelectionObserver = Callable[[int, torch.Tensor, list], None]
# keep_picks(first position, top, counts) -> bool [Hkv, t, most]: which of those picks the step attends
# to (the others are left out, as if their rows had not arrived yet); called after on_select
PickFilter = Callable[[int, torch.Tensor, list], torch.Tensor]


@dataclass(frozen=True)
class ScaledTopN:
    """A far-position budget that scales with context: top_n(L) = min(cap, max(floor, ceil(fraction * L)))
    for a decode step whose context (including the new token) is L tokens."""

    fraction: float
    floor: int
    cap: int

    def __call__(self, seq_len: int) -> int:
        return min(self.cap, max(self.floor, math.ceil(self.fraction * seq_len)))

    @property
    def label(self) -> str:
        return f"top_n=clamp({self.fraction:g}*L,{self.floor},{self.cap})"


Budget = Union[int, ScaledTopN]


def top_n_rule(kcache: KCacheConfig, budget: Optional[Budget] = None) -> TopNAt:
    """top_n as a function of context length: `budget` when given, else the config's fixed top_n."""
    if budget is None:
        budget = kcache.top_n
    if isinstance(budget, int):
        return lambda seq_len: budget
    return budget


def far_positions(seq_len: int, sink_tokens: int, recent_window: int) -> int:
    """Positions of a decode step's context (seq_len tokens) outside the sink and the recent window."""
    sink_end = min(sink_tokens, seq_len)
    return max(0, seq_len - recent_window - sink_end)


def far_rows_per_token(seq_len: int, num_layers: int, num_kv_heads: int, kcache: KCacheConfig,
                       budget: Optional[Budget] = None) -> int:
    """V rows one decode step reads from host memory: sparse layers x KV heads x min(top_n, far).
    Full mode reads none (all V stays in device memory)."""
    if kcache.mode == "full":
        return 0
    far = far_positions(seq_len, kcache.sink_tokens, kcache.recent_window)
    return max(0, num_layers - kcache.dense_layers) * num_kv_heads * min(top_n_rule(kcache, budget)(seq_len), far)


def dense_causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                           scale: float) -> torch.Tensor:
    """Dense attention of positions start .. start+T-1 over their causal contexts: the engine's
    `prefill_attention` (and dense decode) math, with K/V repeated per query head so that CPU torch
    takes its fused attention kernel. q [T, Hq, D]; keys, values [Hkv, >= start+T, D] -> [T, Hq, D]."""
    num_tokens, num_heads = q.shape[:2]
    end = start + num_tokens
    group = num_heads // keys.shape[0]
    keys = keys[:, :end].repeat_interleave(group, 0)
    values = values[:, :end].repeat_interleave(group, 0)
    mask = torch.arange(end, device=q.device)[None, :] < torch.arange(start + 1, end + 1, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                         scale=scale)
    return out[0].transpose(0, 1)


def sparse_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                            kcache: KCacheConfig, top_n_at: TopNAt, scale: float,
                            max_scores_per_chunk: int = 1 << 23,
                            on_select: Optional[SelectionObserver] = None,
                            selection_keys: Optional[torch.Tensor] = None,
                            selection_queries: Optional[torch.Tensor] = None,
                            keep_picks: Optional[PickFilter] = None,
                            far_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KCache decode attention of T consecutive positions start .. start+T-1, each over its own context.

    q [T, Hq, D]; keys, values [Hkv, L, D] with L >= start + T (entries past a position are masked).
    Query position t sees context 0..t (seq_len t+1): sink [0, min(S, t+1)), recent window
    [max(sink_end, t+1-W), t+1), and among the far positions in between the min(top_n(t+1), far)
    with the largest group score (max or sum of the softmax probabilities over the query heads of a
    KV head). Probabilities use the exact softmax over 0..t; the output is the probability-weighted
    sum of the selected V rows, divided by their mass when `renormalize`. Returns [T, Hq, D].
    Query rows are processed in chunks of about `max_scores_per_chunk` scores. `on_select`, when
    given, sees each chunk's far picks (`SelectionObserver`). `selection_keys` [Hkv, >= start + T, D],
    when given, are the K the selection scores (a compressed copy of K, say); the weights of what
    it picks still come from `keys`. `selection_queries` [T, Hq, D], when given, are the q the
    selection scores with (q rounded as a low-precision dot would take it); the weights use `q`.
    `keep_picks`, when given, says which far picks each step attends to (`PickFilter`).
    `far_values` [Hkv, >= start + T, D], when given, are the V the far picks are weighed with (the
    host pool's copy of V, say, when it is stored rounded); sink and window rows use `values`.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[0]
    group = num_heads // num_kv_heads
    end = start + num_tokens
    keys_t = keys[:, :end].float().transpose(1, 2)  # [Hkv, D, L]
    selection_keys_t = None if selection_keys is None else selection_keys[:, :end].float().transpose(1, 2)
    values = values[:, :end].float()
    far_values = None if far_values is None else far_values[:, :end].float()
    out = torch.empty_like(q)
    rows_per_chunk = max(1, max_scores_per_chunk // (num_heads * end))
    key_pos = torch.arange(end, device=q.device)
    for lo in range(0, num_tokens, rows_per_chunk):
        hi = min(num_tokens, lo + rows_per_chunk)
        t = hi - lo
        seq_len = torch.arange(start + lo + 1, start + hi + 1, device=q.device)  # [t] context of each row
        sink_end = seq_len.clamp(max=kcache.sink_tokens)
        window_start = torch.maximum(sink_end, seq_len - kcache.recent_window)
        # Row-dependent masks only touch columns from `tail` on (sink, window and the causal edge);
        # columns [sink_cols, tail) are far for every row of the chunk.
        tail = int(window_start.min())
        sink_cols = int(sink_end.max())
        tail_pos = key_pos[tail:]
        future = tail_pos[None, :] >= seq_len[:, None]  # [t, L - tail]
        def grouped(queries: torch.Tensor) -> torch.Tensor:
            return (queries[lo:hi].float() * scale).view(t, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)

        qg = grouped(q)

        def probabilities(k_t: torch.Tensor, q_g: torch.Tensor = qg) -> torch.Tensor:
            """scores -> probabilities in place: [Hkv, G, t, L]"""
            p = torch.bmm(q_g.reshape(num_kv_heads, group * t, head_dim), k_t).view(num_kv_heads, group, t, end)
            p[..., tail:].masked_fill_(future, float("-inf"))
            p.sub_(p.amax(-1, keepdim=True)).exp_()
            return p.div_(p.sum(-1, keepdim=True))

        probs = probabilities(keys_t)
        if selection_keys_t is None and selection_queries is None:
            selection_probs = probs
        else:
            selection_probs = probabilities(keys_t if selection_keys_t is None else selection_keys_t,
                                            qg if selection_queries is None else grouped(selection_queries))
        # selection: sink + window always, top-n of the far positions by group score
        selected = torch.zeros(num_kv_heads, t, end, dtype=torch.bool, device=q.device)
        num_far = (window_start - sink_end).tolist()
        counts = [min(top_n_at(n), f) for n, f in zip(seq_len.tolist(), num_far)]
        most = max(counts, default=0)
        if most > 0:
            group_score = (selection_probs.amax(1) if kcache.group_reduce == "max"
                           else selection_probs.sum(1))  # [Hkv, t, L]
            group_score[..., :sink_cols] = -1.0
            group_score[..., tail:].masked_fill_(tail_pos[None, :] >= window_start[:, None], -1.0)
            top = torch.topk(group_score, most, dim=-1).indices  # [Hkv, t, most], best first
            if on_select is not None:
                on_select(start + lo, top, counts)
            # rows keep their first counts[row] picks
            keep = (torch.arange(most, device=q.device)[None, :] < torch.tensor(counts, device=q.device)[:, None]
                    ).expand(num_kv_heads, t, most)
            if keep_picks is not None:
                keep = keep & keep_picks(start + lo, top, counts)
            selected.scatter_(-1, top, keep)
        far_picks = selected.clone() if far_values is not None else None
        selected[..., :sink_cols] |= key_pos[None, :sink_cols] < sink_end[:, None]
        selected[..., tail:] |= (tail_pos[None, :] >= window_start[:, None]) & ~future
        probs.mul_(selected[:, None])
        if far_values is None:
            attended = torch.bmm(probs.view(num_kv_heads, group * t, end), values)  # [Hkv, G * t, D]
        else:  # sink and window rows with values, far picks with far_values
            far_probs = probs * far_picks[:, None]
            attended = (torch.bmm((probs - far_probs).view(num_kv_heads, group * t, end), values)
                        + torch.bmm(far_probs.view(num_kv_heads, group * t, end), far_values))
        if kcache.renormalize:
            attended.div_(probs.sum(-1).view(num_kv_heads, group * t, 1))
        out[lo:hi] = attended.view(num_kv_heads, group, t, head_dim).permute(2, 0, 1, 3).reshape(
            t, num_heads, head_dim).to(q.dtype)
    return out


class _EmulatedCache:
    """Stands in for the engine's KV cache under the model's forward (the model calls `attend`):
    one sequence's K and V per layer, contiguous [Hkv, capacity, D], and the attention of the
    current forward: dense causal (prefill, full mode, dense layers) or the KCache decode step."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens whose K/V are stored; the forward's new tokens start here
        self.kcache: Optional[KCacheConfig] = None  # None: dense attention for every new token
        self.top_n_at: TopNAt = lambda seq_len: 0
        # on_select(layer_idx, ...) sees every sparse layer's far picks (SelectionObserver's arguments);
        # keep_picks(layer_idx, ...) says which of them its steps attend to (PickFilter's arguments)
        self.on_select: Optional[Callable[..., None]] = None
        self.keep_picks: Optional[Callable[..., torch.Tensor]] = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               ctx: ForwardContext) -> torch.Tensor:
        start, end = self.length, self.length + q.shape[0]
        self.keys[layer_idx][:, start:end] = k.transpose(0, 1)
        self.values[layer_idx][:, start:end] = v.transpose(0, 1)
        keys, values = self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]
        kc = self.kcache
        if kc is None or kc.mode == "full" or layer_idx < kc.dense_layers:
            return dense_causal_attention(q, keys, values, start, scale)
        observe = None if self.on_select is None else (lambda *picks: self.on_select(layer_idx, *picks))
        keep = None if self.keep_picks is None else (lambda *picks: self.keep_picks(layer_idx, *picks))
        selection_keys = fp8_rounded(keys) if kc.fp8_scoring_keys else None
        far_values = fp8_rounded(values) if kc.fp8_host_values else None
        return sparse_decode_attention(q, keys, values, start, kc, self.top_n_at, scale, on_select=observe,
                                       selection_keys=selection_keys, keep_picks=keep, far_values=far_values)


def load_model(model_dir: str, device: torch.device, dtype: torch.dtype, max_len: int) -> torch.nn.Module:
    """The engine's model class for the checkpoint at model_dir, weights loaded, in eval mode."""
    from ..models.loader import iterate_checkpoint, load_weights
    from ..models.model_config import load_model_config
    from ..models.registry import model_class

    config = load_model_config(model_dir)
    with torch.device(device):
        model = model_class(config.architecture)(config, max_len, dtype)
    load_weights(model, iterate_checkpoint(model_dir), f"checkpoint in '{model_dir}'")
    return model.eval()


class TeacherForcedLM:
    """One sequence through the engine's model with emulated caches.

    `prefill` appends tokens with dense attention (chunked like the engine's chunked prefill);
    `decode` appends tokens each attending as a decode step (KCache or full); `truncate` forgets
    the tail, e.g. to run the same block under another setting. `dense_length` is how many leading
    positions hold K/V from dense prefill: `prefill` may only extend a sequence that is all dense,
    and `prefill_shared` reuses the longest dense prefix a new prompt has in common with it.
    """

    def __init__(self, model: torch.nn.Module, capacity: int, prefill_chunk: int = 1024):
        self.model = model
        layer = model.model.layers[0].self_attn
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        self.num_layers = len(model.model.layers)
        self.num_kv_heads, self.head_dim = layer.num_kv_heads, layer.attn.head_dim
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.cache = _EmulatedCache(self.num_layers, self.num_kv_heads, self.head_dim, capacity, self.dtype,
                                    self.device)
        self.token_ids: list[int] = []
        self.dense_length = 0

    @property
    def length(self) -> int:
        return self.cache.length

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a {self.cache.length}-token sequence to {length}")
        self.cache.length = length
        del self.token_ids[length:]
        self.dense_length = min(self.dense_length, length)

    @torch.inference_mode()
    def _forward(self, token_ids: list[int]) -> torch.Tensor:
        start, n = self.cache.length, len(token_ids)
        if start + n > self.capacity:
            raise ValueError(f"{start + n} tokens exceed the emulated cache's capacity {self.capacity}")
        dev = self.device
        positions = torch.arange(start, start + n, device=dev)
        ctx = ForwardContext(positions=positions, slot_mapping=positions,
                             block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor([start + n], device=dev), seq_lens_list=[start + n],
                             max_seq_len=start + n,
                             query_start_loc=[0, n], num_decodes=0,
                             hot_slots=torch.zeros(1, dtype=torch.long, device=dev), hot_slots_list=[0],
                             kv_cache=self.cache)
        hidden = self.model(torch.tensor(token_ids, dtype=torch.long, device=dev), positions, ctx)
        self.cache.length = start + n
        self.token_ids.extend(token_ids)
        return hidden

    def prefill(self, token_ids: list[int]) -> torch.Tensor:
        """Append token_ids with dense causal attention, in chunks of `prefill_chunk` tokens.
        Returns their final hidden states [n, hidden] (`logits` turns rows into logits)."""
        if self.dense_length != self.length:
            raise ValueError("prefill extends only an all-dense sequence: truncate the decoded tail first")
        self.cache.kcache = None
        hidden = torch.cat([self._forward(token_ids[i:i + self.prefill_chunk])
                            for i in range(0, len(token_ids), self.prefill_chunk)])
        self.dense_length = self.length
        return hidden

    def prefill_shared(self, token_ids: list[int]) -> torch.Tensor:
        """Make the sequence the dense prefill of token_ids, recomputing only past the longest dense
        prefix it shares with what is cached. Returns the final hidden state of the last token [hidden]."""
        shared = 0
        limit = min(self.dense_length, len(token_ids) - 1)  # recompute at least the last token
        while shared < limit and self.token_ids[shared] == token_ids[shared]:
            shared += 1
        self.truncate(shared)
        return self.prefill(token_ids[shared:])[-1]

    def decode(self, token_ids: list[int], kcache: KCacheConfig, budget: Optional[Budget] = None) -> torch.Tensor:
        """Append token_ids, each position attending as the engine's decode step under `kcache`
        (mode "full": dense); `budget` overrides kcache.top_n. Returns logits [n, vocab] float32."""
        self.cache.kcache, self.cache.top_n_at = kcache, top_n_rule(kcache, budget)
        try:
            return self.logits(self._forward(token_ids))
        finally:
            self.cache.kcache = None

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def greedy(self, first_token: int, max_tokens: int, kcache: KCacheConfig, budget: Optional[Budget] = None,
               stop_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy continuation, one decode step at a time: decode first_token (the token the engine
        samples from the prefill logits), then each argmax in turn. Returns at most max_tokens ids
        starting with first_token, ending early after a stop token (included)."""
        out = [first_token]
        while len(out) < max_tokens and out[-1] not in stop_token_ids:
            out.append(int(self.decode([out[-1]], kcache, budget)[-1].argmax()))
        return out

    def reproduces(self, reference: list[int], kcache: KCacheConfig, budget: Optional[Budget] = None) -> bool:
        """Whether greedy decoding under `kcache`, started by decoding reference[0], yields exactly
        `reference`: one teacher-forced decode forward, every argmax compared with the next token."""
        if len(reference) < 2:
            return True
        predicted = self.decode(reference[:-1], kcache, budget).argmax(-1)
        return bool(torch.equal(predicted.cpu(), torch.tensor(reference[1:])))

    def greedy_like(self, reference: list[int], max_tokens: int, kcache: KCacheConfig,
                    budget: Optional[Budget] = None, stop_token_ids: tuple[int, ...] = ()) -> list[int]:
        """The same result as `greedy(reference[0], ...)`, cheaper when it mostly agrees with
        `reference` (e.g. the full-attention continuation): the reference is teacher-forced in one
        decode forward; up to the first position whose argmax differs, the greedy continuation *is*
        the reference (each step sees the same tokens), and from there on it is decoded step by step."""
        start = self.length
        forced = reference[:-1]
        if not forced:
            return self.greedy(reference[0], max_tokens, kcache, budget, stop_token_ids)
        predicted = self.decode(forced, kcache, budget).argmax(-1).tolist()
        for i, token in enumerate(predicted):
            if token != reference[i + 1]:
                self.truncate(start + i + 1)
                out = reference[:i + 1] + [token]
                while len(out) < max_tokens and out[-1] not in stop_token_ids:
                    out.append(int(self.decode([out[-1]], kcache, budget)[-1].argmax()))
                return out
        return list(reference)
