"""Pure-torch KCache decode attention: the definition that the Triton kernels are tested against.

For one sequence of length L and KV head h with query heads g = 1..G sharing it:
    s[g, j] = q[g] . k[j] * scale                  for every cached position j (all of K)
    p[g, j] = softmax_j(s[g, :])                   exact: the denominator covers all L positions
    r[j]    = max_g p[g, j]   (or sum_g)           one group score, so one V fetch serves all G heads
    sel     = sink U window U top_n(r over far)    far = positions outside sink and window
    o[g]    = sum_{j in sel} p[g, j] v[j] / Z      Z = sum_{j in sel} p[g, j] (renormalize) or 1
With top_n + sink + window >= L, sel is every position and o equals dense attention.

With fp8 scoring keys (`KCacheConfig.scoring_keys="fp8"`, renormalize only), p and r come from the
float8 copy of K (`fp8_keys.py`) and only pick; the output weighs what was picked by the exact K:
    o[g]    = sum_{j in sel} softmax_{j in sel}(q[g] . k[j] * scale) v[j]
the exact K of the far picks coming from host memory with their V (a host row is K | V).

With fp8 host values (`KCacheConfig.host_values="fp8"`) the far rows v[j] are the host pool's
float8 rows times their float32 scales (v_scales, device); the sink and window rows are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..layers.paged_attention import gather_context
from .fp8_keys import dequantize_rows
from .selection import SelectionSpec

if TYPE_CHECKING:
    from .row_cache import FarRowCacheLayer


def select_far_positions(probs: torch.Tensor, sink_end: int, window_start: int, spec: SelectionSpec) -> torch.Tensor:
    """probs [Hkv, G, L] float32 -> selected far positions [Hkv, n] (ascending), n = min(top_n, far);
    among equal scores the lowest positions, as the Triton selection takes them."""
    far = probs[..., sink_end:window_start]
    group_score = far.amax(1) if spec.group_reduce == "max" else far.sum(1)  # [Hkv, F]
    n = min(spec.top_n, far.shape[-1])
    ranked = torch.sort(group_score, dim=-1, descending=True, stable=True).indices
    return ranked[..., :n].sort(-1).values + sink_end


def gather_rows(pool: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """pool [NB, Hkv, bs, D]; positions [Hkv, n] of one sequence -> rows [Hkv, n, D] (pool's device)."""
    block_size = pool.shape[2]
    table = block_table.to(pool.device).long()
    positions = positions.to(pool.device)
    heads = torch.arange(pool.shape[1], device=pool.device)[:, None].expand_as(positions)
    return pool[table[positions // block_size], heads, positions % block_size]


def kcache_decode_one(q: torch.Tensor, k_cache: torch.Tensor, v_far_pool: torch.Tensor, v_hot: torch.Tensor,
                      block_table: torch.Tensor, seq_len: int, spec: SelectionSpec, scale: float,
                      fetch_far: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sequence's decode step.

    q [Hq, D]; k_cache [NB, Hkv, bs, D] (device); v_far_pool [NB, Hkv, bs, D] (host memory);
    v_hot [Hkv, sink + window, D] this sequence's hot rows (device); block_table [>= blocks];
    fetch_far(far positions [Hkv, n]) -> their V rows [Hkv, n, D] (default: `gather_rows` from the
    pool; the far-row cache passes its own); v_scales [NB, Hkv, bs] float32: the far rows are float8,
    multiplied by their scales (fp8 host values). Returns [Hq, D] in q's dtype.
    """
    num_kv_heads = k_cache.shape[1]
    qg = q.view(num_kv_heads, -1, q.shape[-1]).float()  # [Hkv, G, D]
    keys = gather_context(k_cache, block_table, seq_len).float()  # [Hkv, L, D]
    logits = torch.einsum("hgd,hld->hgl", qg, keys) * scale  # [Hkv, G, L]
    probs = torch.softmax(logits, dim=-1)
    sink_end, window_start = spec.split(seq_len)
    hot_pos = hot_positions(sink_end, window_start, seq_len, q.device)
    sel_logits = logits[..., hot_pos]  # [Hkv, G, nh]
    v_sel = v_hot[:, spec.hot_row(hot_pos)].float()  # [Hkv, nh, D]
    if window_start > sink_end:
        far_pos = select_far_positions(probs, sink_end, window_start, spec)  # [Hkv, n]
        far_logits = logits.gather(-1, far_pos[:, None, :].expand(-1, qg.shape[1], -1))
        v_far = (gather_rows(v_far_pool, block_table, far_pos) if fetch_far is None
                 else fetch_far(far_pos)).to(q.device).float()
        if v_scales is not None:
            v_far = v_far * gather_rows(v_scales[..., None], block_table, far_pos).to(q.device)
        sel_logits, v_sel = torch.cat([sel_logits, far_logits], -1), torch.cat([v_sel, v_far], 1)
    # renormalised: a softmax over the picks themselves (their share of the whole softmax can
    # underflow, e.g. for a head whose mass lies on positions its group did not pick)
    weights = (torch.softmax(sel_logits, dim=-1) if spec.renormalize
               else torch.exp(sel_logits - torch.logsumexp(logits, dim=-1, keepdim=True)))
    out = torch.einsum("hgn,hnd->hgd", weights, v_sel)
    return out.reshape(q.shape).to(q.dtype)


def kcache_decode_fp8_scoring_one(q: torch.Tensor, k_fp8_cache: torch.Tensor, k_scales: torch.Tensor,
                                  kv_far_pool: torch.Tensor, k_hot: torch.Tensor, v_hot: torch.Tensor,
                                  block_table: torch.Tensor, seq_len: int, spec: SelectionSpec, scale: float,
                                  fetch_far: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One sequence's decode step with fp8 scoring keys (module docstring).

    q [Hq, D]; k_fp8_cache [NB, Hkv, bs, D] float8, k_scales [NB, Hkv, bs] float32 (device);
    kv_far_pool [NB, Hkv, bs, 2D] exact K | V rows (host memory); k_hot, v_hot [Hkv, sink + window, D]
    this sequence's hot rows (device); block_table [>= blocks]; fetch_far(far positions [Hkv, n]) ->
    their K | V rows [Hkv, n, 2D] (default: `gather_rows` from the pool). Returns [Hq, D] in q's dtype.
    """
    if not spec.renormalize:
        raise ValueError("fp8 scoring keys need renormalize (the positions not picked have no exact K here)")
    num_kv_heads, head_dim = k_fp8_cache.shape[1], q.shape[-1]
    qg = q.view(num_kv_heads, -1, head_dim).float()  # [Hkv, G, D]
    scoring_keys = dequantize_rows(gather_context(k_fp8_cache, block_table, seq_len),
                                   gather_context(k_scales[..., None], block_table, seq_len)[..., 0])  # [Hkv, L, D]
    sink_end, window_start = spec.split(seq_len)
    hot_pos = hot_positions(sink_end, window_start, seq_len, q.device)
    k_sel, v_sel = k_hot[:, spec.hot_row(hot_pos)].float(), v_hot[:, spec.hot_row(hot_pos)].float()  # [Hkv, nh, D]
    if window_start > sink_end:
        scoring_probs = torch.softmax(torch.einsum("hgd,hld->hgl", qg, scoring_keys) * scale, dim=-1)  # [Hkv, G, L]
        far_pos = select_far_positions(scoring_probs, sink_end, window_start, spec)  # [Hkv, n]
        kv_far = (gather_rows(kv_far_pool, block_table, far_pos) if fetch_far is None
                  else fetch_far(far_pos)).to(q.device).float()  # [Hkv, n, 2D]
        k_far, v_far = kv_far.split(head_dim, -1)
        k_sel, v_sel = torch.cat([k_sel, k_far], 1), torch.cat([v_sel, v_far], 1)
    weights = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, k_sel) * scale, dim=-1)  # [Hkv, G, n_sel]
    return torch.einsum("hgn,hnd->hgd", weights, v_sel).reshape(q.shape).to(q.dtype)


def hot_positions(sink_end: int, window_start: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The sink and window positions of a sequence of `seq_len`, ascending: [sink_end + seq_len - window_start]."""
    return torch.cat([torch.arange(sink_end), torch.arange(window_start, seq_len)]).to(device)


def through_row_cache(row_cache: Optional["FarRowCacheLayer"], pool: torch.Tensor, block_table: torch.Tensor,
                      hot_slot: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A `fetch_far` for one sequence (cache slot `hot_slot`) that reads the far rows of `pool`
    through the layer's far-row cache; None (fetch from the pool) without one."""
    if row_cache is None:
        return None
    slot = torch.tensor([hot_slot])
    return lambda far_pos: row_cache.fetch(slot, far_pos[None], lambda idx: gather_rows(
        pool, block_table, idx[0].clamp(min=0))[None])[0]


def kcache_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_far_pool: torch.Tensor, v_hot: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: list[int], hot_slots: list[int],
                            spec: SelectionSpec, scale: float,
                            row_cache: Optional["FarRowCacheLayer"] = None,
                            v_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch of decode steps. q [B, Hq, D]; v_hot [num_slots, Hkv, sink + window, D];
    block_tables [B, max_blocks]; seq_lens, hot_slots: B ints; row_cache: far V rows through the
    layer's far-row cache (`row_cache.py`), sequence b in cache slot hot_slots[b]; v_scales: as
    `kcache_decode_one`. Returns [B, Hq, D]."""
    return torch.stack([kcache_decode_one(q[b], k_cache, v_far_pool, v_hot[hot_slots[b]], block_tables[b],
                                          seq_lens[b], spec, scale,
                                          through_row_cache(row_cache, v_far_pool, block_tables[b], hot_slots[b]),
                                          v_scales=v_scales)
                        for b in range(q.shape[0])])


def kcache_decode_fp8_scoring_reference(q: torch.Tensor, k_fp8_cache: torch.Tensor, k_scales: torch.Tensor,
                                        kv_far_pool: torch.Tensor, k_hot: torch.Tensor, v_hot: torch.Tensor,
                                        block_tables: torch.Tensor, seq_lens: list[int], hot_slots: list[int],
                                        spec: SelectionSpec, scale: float,
                                        row_cache: Optional["FarRowCacheLayer"] = None) -> torch.Tensor:
    """`kcache_decode_reference` with fp8 scoring keys: q [B, Hq, D]; k_fp8_cache, k_scales,
    kv_far_pool as `kcache_decode_fp8_scoring_one`; k_hot, v_hot [num_slots, Hkv, sink + window, D];
    row_cache: K | V rows. Returns [B, Hq, D]."""
    return torch.stack([kcache_decode_fp8_scoring_one(
        q[b], k_fp8_cache, k_scales, kv_far_pool, k_hot[hot_slots[b]], v_hot[hot_slots[b]], block_tables[b],
        seq_lens[b], spec, scale, through_row_cache(row_cache, kv_far_pool, block_tables[b], hot_slots[b]))
        for b in range(q.shape[0])])
