"""benchmarks/selection_reuse.py: the row-cache hit count by hand, and the picks the teacher-forced
decode reports (`TeacherForcedLM.cache.on_select`) on the default model: the same whether a block
runs in one forward or token by token, min(top_n, far) distinct far positions each."""

from __future__ import annotations

import os
import sys

import numpy as np
import pydoc_data.topics
import torch

from kcache_dist import KCacheConfig
from kcache_dist.kcache.teacher_forced import TeacherForcedLM, load_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from selection_reuse import (PickLog, cache_hits, decayed_frequency_hits, engine_cache_hits,  # noqa: E402
                             farthest_next_use_hits, prefetch_coverage)


def test_cache_hits_by_hand():
    steps = [np.array([1, 2]), np.array([2, 3]), np.array([1, 4]), np.array([3, 4])]
    # capacity 2 holds the previous step's picks: 2 of {2, 3}, none of {1, 4}, 4 of {3, 4}
    assert cache_hits(steps, 2, 8) == (2, 6)
    # capacity 3: {1, 2} then {1, 2, 3} held in full (2 and 1 hit); before step 3 it keeps 1 and 4
    # (picked at step 2) and one of 2, 3 (both last picked at step 1): 4 hits, and 3 if kept
    hits, total = cache_hits(steps, 3, 8)
    assert total == 6 and hits in (3, 4)
    assert cache_hits(steps, 8, 8) == (4, 6)  # all ever picked: 2, then 1, then 3 and 4


def test_prefetch_coverage_by_hand():
    """The previous step's next-ranked candidates against a step's misses (capacity 2: the cache
    holds the last step's picks), and what copying them in would move."""
    steps = [np.array([1, 2]), np.array([2, 3]), np.array([1, 4]), np.array([3, 4])]
    candidates = [np.array([3, 5]), np.array([4, 1]), np.array([3, 9]), np.array([7, 8])]
    # misses {3}, {1, 4}, {3}; the first candidate of the step before covers 3, then 4, then 3
    assert prefetch_coverage(steps, candidates, 2, 1, 10) == (4, 3, 3)
    assert prefetch_coverage(steps, candidates, 2, 2, 10) == (4, 4, 6)  # 1 too; every candidate uncached
    log = PickLog(top_n=2)  # a step's first top_n positions (best first) are picks, the rest candidates
    log(0, 5, torch.tensor([[[9, 4, 7, 1], [3, 8, 2, 6]]]), [4, 3])
    assert log.picks[0, 0][5].tolist() == [4, 9] and log.candidates[0, 0][5].tolist() == [7, 1]
    assert log.picks[0, 0][6].tolist() == [3, 8] and log.candidates[0, 0][6].tolist() == [2]


def test_offline_optimum_by_hand_and_never_below_recency():
    steps = [np.array([1, 2]), np.array([2, 3]), np.array([1, 4]), np.array([3, 4])]
    assert farthest_next_use_hits(steps, 2, 8) == (2, 6)  # capacity = top_n: only the last step's picks
    # capacity 3: before step 3 it keeps 1 and 4 (just picked) and 3 (picked again next), not 2
    assert farthest_next_use_hits(steps, 3, 8) == (4, 6)
    assert farthest_next_use_hits(steps, 8, 8) == (4, 6)
    g = np.random.default_rng(1)
    rows = [[np.sort(g.choice(60, 16, replace=False) + t) for t in range(40)] for _ in range(3)]
    for capacity in (16, 20, 24, 40):
        for r in rows:
            best, total = farthest_next_use_hits(r, capacity, 200)
            recent, same_total = cache_hits(r, capacity, 200)
            assert total == same_total and best >= recent, (capacity, best, recent)
    assert sum(farthest_next_use_hits(r, 24, 200)[0] for r in rows) > sum(cache_hits(r, 24, 200)[0] for r in rows)


def test_decayed_frequency_eviction_by_hand():
    # capacity 4: 1 is picked at steps 0 and 1; after step 3 recency keeps 4 and 5 (picked at step
    # 2) beside 6 and 7, while the decayed count keeps 1 (0.9^3 + 0.9^2 = 1.54 against 0.9^1):
    # step 4 finds 1 only then
    steps = [np.array([1, 2]), np.array([1, 3]), np.array([4, 5]), np.array([6, 7]), np.array([1, 8])]
    assert cache_hits(steps, 4, 16) == (1, 8)
    assert decayed_frequency_hits(steps, 4, 16, decay=0.9) == (2, 8)
    g = np.random.default_rng(2)
    rows = [[np.sort(g.choice(60, 16, replace=False) + t) for t in range(40)] for _ in range(3)]
    for r in rows:  # never above the offline optimum
        assert decayed_frequency_hits(r, 24, 200)[0] <= farthest_next_use_hits(r, 24, 200)[0]


def test_engine_cache_hits_by_hand_and_against_the_simulation():
    steps = [np.array([1, 2]), np.array([2, 3]), np.array([1, 4]), np.array([3, 4])]
    assert engine_cache_hits([steps], 2, 8) == (2, 6)
    # capacity 3: 1, 2, 3 take slots 0, 1, 2; before step 3, 2 and 3 are equally old and the lower
    # slot goes (2), so 3 and 4 both hit: 4
    assert engine_cache_hits([steps], 3, 8) == (4, 6)
    assert engine_cache_hits([steps, steps[::-1]], 8, 8) == (8, 12)
    g = np.random.default_rng(0)  # drifting picks: the engine's eviction within 2% of exact LRU
    rows = [[np.sort(g.choice(60, 16, replace=False) + t) for t in range(40)] for _ in range(3)]
    simulated = [cache_hits(r, 24, 200) for r in rows]
    hits, total = engine_cache_hits(rows, 24, 200)
    assert total == sum(n for _, n in simulated)
    assert abs(hits - sum(h for h, _ in simulated)) <= 0.02 * total


def test_observed_picks_match_token_by_token_decode(default_model_dir):
    kc = KCacheConfig(mode="kcache", top_n=8, dense_layers=28, sink_tokens=2, recent_window=8)
    model = load_model(default_model_dir, torch.device("cpu"), torch.float32, max_len=256)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(default_model_dir).encode(pydoc_data.topics.topics["assignment"])[:96]
    lm = TeacherForcedLM(model, capacity=256)
    logs = {}
    for how in ("block", "token by token"):
        lm.truncate(0)
        lm.prefill(ids[:80])
        logs[how] = log = PickLog()
        lm.cache.on_select = log
        if how == "block":
            lm.decode(ids[80:], kc)
        else:
            for token in ids[80:]:
                lm.decode([token], kc)
        lm.cache.on_select = None
    block, single = logs["block"].picks, logs["token by token"].picks
    assert sorted(block) == sorted(single) == [(layer, h) for layer in (28, 29) for h in range(3)]
    for key, rows in block.items():
        assert sorted(rows) == list(range(80, 96))
        for position, picked in rows.items():
            assert np.array_equal(picked, single[key][position]), (key, position)
            seq_len = position + 1
            assert len(set(picked.tolist())) == min(8, seq_len - 8 - 2)
            assert picked.min() >= 2 and picked.max() < seq_len - 8


def test_deferred_misses_replay_keeps_what_the_recency_cache_held():
    """benchmarks/deferred_misses_accuracy.py: a step keeps exactly the picks that the cache of the
    most recently picked positions held before it (`cache_hits` counts the same), per KV head, over
    chunks of a decode; a decode's first step keeps all; a decode that does not continue restarts cold."""
    from deferred_misses_accuracy import DeferredMisses

    g = np.random.default_rng(7)
    heads = [[g.choice(30, 6, replace=False) + t for t in range(12)] for _ in range(2)]  # [head][step] picks
    top = torch.tensor(np.stack([np.stack(steps) for steps in heads]))  # [Hkv 2, steps 12, 6]
    replay = DeferredMisses()
    keep = replay.filter(layer_key=1, capacity=9)
    kept = torch.cat([keep(100, top[:, :5], [6] * 5), keep(105, top[:, 5:], [6] * 7)], dim=1)
    assert kept[:, 0].all()  # the cold first step waits for its picks
    for h, steps in enumerate(heads):
        assert int(kept[h, 1:].sum()) == cache_hits(steps, 9, 100)[0]
        for t in range(1, 12):  # a kept pick was picked at one of the steps before
            before = set(np.concatenate(steps[:t]).tolist())
            assert all(p in before for p in top[h, t][kept[h, t]].tolist())
    assert replay.picked == 2 * 11 * 6 and replay.held == int(kept[:, 1:].sum())
    again = keep(100, top[:, :5], [6] * 5)  # a new decode from the same position: cold again
    assert torch.equal(again, kept[:, :5])


def test_deferred_misses_decode_is_the_same_in_a_block_or_token_by_token(default_model_dir, monkeypatch):
    """The study's attention under the emulated model: a block decoded in one forward and token by
    token give the same logits (the replay carries each layer's cache from call to call), other
    than the exact steps', with a share of the picks held."""
    from deferred_misses_accuracy import DeferredMisses, deferring_attention
    from kcache_dist.kcache import teacher_forced

    kc = KCacheConfig(mode="kcache", top_n=8, dense_layers=28, sink_tokens=2, recent_window=8)
    model = load_model(default_model_dir, torch.device("cpu"), torch.float32, max_len=256)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(default_model_dir).encode(pydoc_data.topics.topics["assignment"])[:112]
    lm = TeacherForcedLM(model, capacity=256)
    lm.prefill(ids[:80])
    exact = lm.decode(ids[80:], kc)
    replays, logits = [], []
    for how in ("block", "token by token"):
        replays.append(DeferredMisses())
        monkeypatch.setattr(teacher_forced, "sparse_decode_attention", deferring_attention(replays[-1]))
        lm.truncate(80)
        logits.append(lm.decode(ids[80:], kc) if how == "block" else
                      torch.cat([lm.decode([token], kc) for token in ids[80:]]))
        monkeypatch.undo()
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert replays[0].picked == replays[1].picked == 2 * 3 * 31 * 8  # 2 layers, 3 KV heads, 31 warm steps
    assert replays[0].held == replays[1].held and 0 < replays[0].held < replays[0].picked
    assert not torch.allclose(logits[0], exact, atol=1e-3)
