"""`teacher_forced.sparse_decode_attention` with `selection_keys` (and `selection_queries`): another
copy of K (of q) (fp8 ones in benchmarks/fp8_keys_accuracy.py) picks the far positions, the model's
K and q weigh what is picked; with `keep_picks`, which leaves some picks out of a step; and with
`far_values`, the V the far picks are weighed with (sink and window keep the model's V).
Checked against a per-position, per-head loop written from the definition, on fresh random inputs
made so that the two copies of K pick differently."""

from __future__ import annotations

import torch

from kcache_dist.config import KCacheConfig
from kcache_dist.kcache.teacher_forced import sparse_decode_attention
from helpers import fresh_seed

NUM_KV_HEADS, GROUP, HEAD_DIM, START, NUM_TOKENS = 2, 3, 16, 30, 8
SCALE = HEAD_DIM ** -0.5
KCACHE = KCacheConfig(mode="kcache", top_n=5, dense_layers=0, sink_tokens=2, recent_window=4)


def by_definition(q, keys, values, selection_keys, scale, selection_queries=None, kept=lambda pick: True,
                  far_values=None) -> torch.Tensor:
    """Per query position and KV head: the far positions with the top_n largest max-over-group
    softmax probabilities of the selection K, with the sink and window; their exact-K softmax
    (renormalised over them) times V. q [T, Hq, D]; keys, values, selection_keys [Hkv, L, D];
    selection_queries [T, Hq, D], the q of the selection (default q); kept(position): whether a
    pick is attended; far_values [Hkv, L, D], the V of the far picks (default values)."""
    selection_queries = q if selection_queries is None else selection_queries
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(NUM_TOKENS):
        seq_len = START + i + 1
        sink_end = min(KCACHE.sink_tokens, seq_len)
        window_start = max(sink_end, seq_len - KCACHE.recent_window)
        for h in range(NUM_KV_HEADS):
            heads = slice(h * GROUP, (h + 1) * GROUP)
            qh = q[i, heads].double() * scale  # [G, D]
            sel_qh = selection_queries[i, heads].double() * scale
            selection_probs = torch.softmax(sel_qh @ selection_keys[h, :seq_len].double().T, -1)  # [G, seq_len]
            far_score = selection_probs.amax(0)[sink_end:window_start]
            picks = torch.topk(far_score, min(KCACHE.top_n, window_start - sink_end)).indices + sink_end
            picks = picks[[kept(int(p)) for p in picks]]
            chosen = torch.cat([torch.arange(sink_end), picks, torch.arange(window_start, seq_len)])
            weights = torch.softmax(qh @ keys[h, chosen].double().T, -1)  # [G, chosen]
            chosen_values = values[h, chosen].double()
            if far_values is not None:
                chosen_values[sink_end:sink_end + len(picks)] = far_values[h, picks].double()
            out[i, heads] = weights @ chosen_values
    return out


def random_inputs():
    """(seed, its generator, q [T, Hq, D], keys and values [Hkv, L, D]) drawn fresh each run."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    length = START + NUM_TOKENS
    q = torch.randn(NUM_TOKENS, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=g)
    keys = torch.randn(NUM_KV_HEADS, length, HEAD_DIM, generator=g)
    values = torch.randn(NUM_KV_HEADS, length, HEAD_DIM, generator=g)
    return seed, g, q, keys, values


def top_n_at(seq_len: int) -> int:
    return KCACHE.top_n


def test_selection_keys_pick_and_model_keys_weigh():
    seed, g, q, keys, values = random_inputs()
    selection_keys = keys + 0.7 * torch.randn(keys.shape, generator=g)  # a coarse copy: other picks

    out = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE, selection_keys=selection_keys)
    torch.testing.assert_close(out.double(), by_definition(q, keys, values, selection_keys, SCALE),
                               rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")

    own = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE)
    assert torch.equal(own, sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE,
                                                    selection_keys=keys))
    torch.testing.assert_close(own.double(), by_definition(q, keys, values, keys, SCALE), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, own, atol=1e-3), f"seed {seed}: the coarse copy picked what the model's K picked"


def test_selection_queries_pick_and_model_queries_weigh():
    seed, g, q, keys, values = random_inputs()
    selection_queries = q + 0.7 * torch.randn(q.shape, generator=g)  # a coarse copy of q: other picks

    out = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE, selection_keys=keys,
                                  selection_queries=selection_queries)
    torch.testing.assert_close(out.double(), by_definition(q, keys, values, keys, SCALE, selection_queries),
                               rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    alone = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE,
                                    selection_queries=selection_queries)
    assert torch.equal(out, alone)
    own = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE)
    assert not torch.allclose(out, own, atol=1e-3), f"seed {seed}: the coarse q picked what the model's q picked"


def test_keep_picks_leaves_picks_out_of_the_step():
    """keep_picks (benchmarks/deferred_misses_accuracy.py): the step attends to the sink, the window
    and only the picks it keeps; it sees every chunk's picks after the selection."""
    seed, g, q, keys, values = random_inputs()
    seen = []

    def even_only(first, top, counts):
        seen.append((first, tuple(top.shape), list(counts)))
        return top % 2 == 0

    out = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE, keep_picks=even_only)
    torch.testing.assert_close(out.double(), by_definition(q, keys, values, keys, SCALE, kept=lambda p: p % 2 == 0),
                               rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert seen == [(START, (NUM_KV_HEADS, NUM_TOKENS, KCACHE.top_n), [KCACHE.top_n] * NUM_TOKENS)]
    everything = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE,
                                         keep_picks=lambda first, top, counts: torch.ones_like(top, dtype=torch.bool))
    assert torch.equal(everything, sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE))
    assert not torch.allclose(out, everything, atol=1e-3), f"seed {seed}: leaving odd picks out changed nothing"


def test_far_values_weigh_only_the_far_picks():
    seed, g, q, keys, values = random_inputs()
    far_values = values + 0.5 * torch.randn(values.shape, generator=g)  # e.g. V as a rounded host copy holds it

    out = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE, far_values=far_values)
    torch.testing.assert_close(out.double(), by_definition(q, keys, values, keys, SCALE, far_values=far_values),
                               rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    own = sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE)
    torch.testing.assert_close(sparse_decode_attention(q, keys, values, START, KCACHE, top_n_at, SCALE,
                                                       far_values=values), own, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, own, atol=1e-3), f"seed {seed}: the far values changed nothing"
