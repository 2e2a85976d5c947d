"""KCache mode: K of every layer in device memory; V of the sparse layers in host memory.

Layer l < dense_layers keeps K and V in device memory and runs dense attention (as full-KV mode).
A sparse layer keeps:
  k pool   [num_blocks, Hkv, bs, D]          device
  v pool   [num_blocks, Hkv, bs, D]          host (pinned, on the GPU's NUMA node)
  v hot    [num_slots + 1, Hkv, sink + window, D] device: each running sequence's sink rows and a
                                              ring of its last `recent_window` rows (the last
                                              slot is spare: CUDA-graph padding rows write it)
  stage     [num_slots + 1, Hkv, 2C', D]  device, with a recent window of 16 or more: each
                                              sequence's last new rows on their way to the host
                                              pool in chunks of C' (`DecodeRowsStage`)
  row cache [num_slots + 1, Hkv, C, D]    device, with `row_cache_rows` = C > 0 only: the far V rows
                                              each sequence picked most recently (`FarRowCache`),
                                              forgotten when a sequence starts (`start_sequences`)
Block ids are shared by all pools, so one block table serves K and V. Prefill runs dense attention
(earlier chunks' V copied back from the host pool one layer ahead: `PrefillHostReads`); a decode
step runs KCache attention.

With fp8 scoring keys (`KCacheConfig.scoring_keys="fp8"`) a sparse layer keeps instead:
  k pool   [num_blocks, Hkv, bs, D] float8 e4m3, k scales [num_blocks, Hkv, bs] float32   device
  kv pool  [num_blocks, Hkv, bs, 2D]   host: a row is the position's exact K | V (one fetch, both)
  k hot, v hot                         device: exact K and V of the sink and window rows
  row cache rows of 2D                 device: K | V of the far rows picked most recently
The float8 K only scores and picks; the picked, sink and window positions are weighed by their exact
K (`kcache/decode.py`: the torch reference or the Triton kernels). A prefill reads its earlier
chunks' exact K back from the host pool with their V.

With fp8 host values (`KCacheConfig.host_values="fp8"`) a sparse layer's host rows are V as float8
e4m3 (`kcache/fp8_keys.quantize_rows`: a float32 scale per position and KV head, kept in device
memory as v scales [num_blocks, Hkv, bs]), and so are the row cache's rows; v hot keeps the exact
V of the sink and window. The far picks and a prefill's earlier chunks are weighed with the rows
multiplied back by their scales.

Under tensor parallelism with more ranks than KV heads, a rank holds part of its KV head's query
group; the decode gathers the whole group's queries before picking and keeps its own heads' output
(`parallel/kv_head_replicas.py`), so the picks are one process's.

On CUDA, new V rows go to the host pool on a separate offload stream, ordered by events: the
compute stream does not wait for the write, and a later read of that layer's host pool waits for
it on the GPU (the decode's fetch, and the copy of a prefill chunk's earlier rows). A prefill
chunk's rows are stored by a kernel; with a recent window of at least 16 positions a decode's new
rows are staged in device memory and copied in chunks by the copy engine after the step
(`decode_rows_stage.py`: SM stores to host memory slowed tensor-parallel steps). A decode-only
step makes no host synchronisation, so it can be captured in a CUDA graph: inside a capture an
offload branch forks from the capture stream and `join_offload` joins it back before the capture
ends; a replay is preceded by `join_offload` for earlier writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..forward_context import ForwardContext
from ..kcache.decode import far_rows_fetched, kcache_decode
from ..kcache.fp8_keys import FP8_DTYPE, SCALE_DTYPE, dequantize_rows, quantize_rows
from ..kcache.row_cache import FarRowCache
from ..kcache.selection import SelectionSpec
from ..layers.paged_attention import gather_context, prefill_attention
from ..parallel import KVHeadReplicas
from .decode_rows_stage import Copy3D, DecodeRowsStage, stage_chunk_rows
from .full_kv_cache import dense_attend
from .host_pool import HostPool
from .planner import host_rows_per_position
from .prefill_host_reads import PrefillHostReads
from .store_rows import store_rows


class KCacheKVCache:
    def __init__(self, num_layers: int, dense_layers: int, num_blocks: int, num_slots: int, num_kv_heads: int,
                 block_size: int, head_dim: int, spec: SelectionSpec, dtype: torch.dtype, device: torch.device,
                 row_cache_rows: int = 0, max_model_len: int = 0, fp8_scoring_keys: bool = False,
                 fp8_host_values: bool = False, kv_head_replicas: KVHeadReplicas = KVHeadReplicas()):
        self.dense_layers = dense_layers
        self.kv_head_replicas = kv_head_replicas
        self.spec = spec
        self.device = device
        self.head_dim = head_dim
        self.fp8_scoring_keys = fp8_scoring_keys
        self.fp8_host_values = fp8_host_values
        block_shape = (num_blocks, num_kv_heads, block_size, head_dim)
        num_sparse = num_layers - dense_layers
        host_shape = (*block_shape[:3], host_rows_per_position(fp8_scoring_keys) * head_dim)  # V, or K | V
        host_dtype = FP8_DTYPE if fp8_host_values else dtype
        # the host pool first: the allocation most likely to fail
        self.host_pool = HostPool(HostPool.bytes_for([host_shape] * num_sparse, host_dtype), device)
        self.host_rows = [self.host_pool.take(host_shape, host_dtype) for _ in range(num_sparse)]
        self.v_scales = ([torch.empty(block_shape[:3], dtype=SCALE_DTYPE, device=device) for _ in range(num_sparse)]
                         if fp8_host_values else [])
        sparse_k_dtype = FP8_DTYPE if fp8_scoring_keys else dtype
        self.k_caches = [torch.empty(block_shape, dtype=dtype if layer < dense_layers else sparse_k_dtype,
                                     device=device) for layer in range(num_layers)]
        self.k_scales = ([torch.empty(block_shape[:3], dtype=SCALE_DTYPE, device=device) for _ in range(num_sparse)]
                         if fp8_scoring_keys else [])
        self.dense_v_caches = [torch.empty(block_shape, dtype=dtype, device=device) for _ in range(dense_layers)]
        hot_shape = (num_slots + 1, num_kv_heads, spec.hot_rows, head_dim)  # + the spare slot
        # the spare slot takes the hot rows of CUDA-graph padding rows and of rows outside sink and window
        self.spare_hot_slot = num_slots
        self.v_hot = [torch.empty(hot_shape, dtype=dtype, device=device) for _ in range(num_sparse)]
        self.k_hot = ([torch.empty(hot_shape, dtype=dtype, device=device) for _ in range(num_sparse)]
                      if fp8_scoring_keys else [])
        self.row_cache = (FarRowCache(num_sparse, num_slots + 1, num_kv_heads, row_cache_rows, max_model_len,
                                      host_shape[-1], host_dtype, device) if row_cache_rows else None)
        self._far_rows_counted = 0  # without a row cache: far V rows the decode steps read (count_decode_fetch)
        self.offload_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._offload_done: list[Optional[_OffloadDone]] = [None] * num_sparse
        self._offload_forked_in_capture = False  # a write in the current capture forked the offload stream
        chunk_rows = stage_chunk_rows(spec.recent_window, block_size)
        self.decode_stage = (DecodeRowsStage(self.host_rows, self.host_pool.buffer, num_slots, chunk_rows, device)
                             if chunk_rows and num_sparse else None)
        self.prefill_reads = PrefillHostReads(device)

    def device_bytes(self) -> int:
        """Device memory of the cache's tensors (blocks, hot rows, staged decode rows, row cache), as
        the planner counts it."""
        tensors = [*self.k_caches, *self.k_scales, *self.v_scales, *self.dense_v_caches, *self.v_hot, *self.k_hot]
        if self.row_cache is not None:
            tensors += self.row_cache.tensors()
        if self.decode_stage is not None:
            tensors.append(self.decode_stage.stage)
        return sum(t.numel() * t.element_size() for t in tensors)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               ctx: ForwardContext) -> torch.Tensor:
        """Store the new k, v [T, Hkv, D]; return attention of q [T, Hq, D] over each context."""
        k_cache = self.k_caches[layer_idx]
        if not ctx.decode_only and layer_idx + 1 - self.dense_layers in range(len(self.host_rows)):
            self._start_prefill_reads(layer_idx + 1 - self.dense_layers, ctx)  # beside this layer's work
        if layer_idx < self.dense_layers:
            return dense_attend(k_cache, self.dense_v_caches[layer_idx], q, k, v, scale, ctx)
        sparse = layer_idx - self.dense_layers
        host_rows, v_hot = self.host_rows[sparse], self.v_hot[sparse]
        fp8 = self.fp8_scoring_keys
        if fp8:
            k_fp8, k_scale = quantize_rows(k)
            store_rows(k_cache, k_fp8, ctx.slot_mapping)
            store_rows(self.k_scales[sparse][..., None], k_scale[..., None], ctx.slot_mapping)
        else:
            store_rows(k_cache, k, ctx.slot_mapping)
        for hot, rows in ((v_hot, v), *(((self.k_hot[sparse], k),) if fp8 else ())):
            if ctx.decode_only:
                self._write_hot_decode(hot, rows, ctx)
            else:
                self._write_hot(hot, rows, ctx)
        earlier_writes = self._offload_done[sparse]
        host_v = v
        if self.fp8_host_values:
            host_v, v_scale = quantize_rows(v)
            store_rows(self.v_scales[sparse][..., None], v_scale[..., None], ctx.slot_mapping)
        host_rows_new = torch.cat([k, v], dim=-1) if fp8 else host_v
        nd = ctx.num_decodes
        staged = 0
        if self.decode_stage is not None and nd:
            # the stage's copies issued so far have read it before it is written again
            self._wait_for_host_writes(earlier_writes, on_device=q.is_cuda)
            staged = len(host_rows_new) if ctx.decode_only else nd  # with a graph's padding rows
            self.decode_stage.store(sparse, host_rows_new[:staged], ctx.positions[:staged], ctx.hot_slots[:staged])
        if staged < len(host_rows_new):
            self._offload(sparse, host_rows_new[staged:], ctx.slot_mapping[staged:])
        out = torch.empty_like(q)
        if nd:
            if not staged:  # (staged: waited for above)
                # With a recent window the new row is read from v_hot, so only earlier writes must land first.
                self._wait_for_host_writes(earlier_writes if self.spec.recent_window else self._offload_done[sparse],
                                           on_device=q.is_cuda)
            replicas = self.kv_head_replicas  # a replicated KV head picks from its whole query group
            group_out = kcache_decode(replicas.whole_groups(q[:nd]), k_cache, host_rows, v_hot, ctx.block_tables[:nd],
                                      ctx.seq_lens[:nd], ctx.hot_slots[:nd], ctx.seq_lens_list[:nd],
                                      ctx.hot_slots_list[:nd], self.spec, scale, max_seq_len=ctx.max_seq_len,
                                      row_cache=self.row_cache.layer(sparse) if self.row_cache else None,
                                      k_scales=self.k_scales[sparse] if fp8 else None,
                                      k_hot=self.k_hot[sparse] if fp8 else None,
                                      v_scales=self.v_scales[sparse] if self.fp8_host_values else None)
            out[:nd] = replicas.own_heads(group_out)
        earlier_rows = ({} if ctx.decode_only else
                        self.prefill_reads.take(sparse, host_rows, ctx, self._host_writes_event(earlier_writes)))
        for i in range(nd, ctx.num_seqs):
            start, end = ctx.query_start_loc[i], ctx.query_start_loc[i + 1]
            length, table = ctx.seq_lens_list[i], ctx.block_tables[i]
            earlier = earlier_rows.get(i)  # later chunks only
            if earlier is None:
                earlier = v.new_empty(v.shape[1], 0, host_rows.shape[-1])
            elif self.fp8_host_values:
                scales = gather_context(self.v_scales[sparse][..., None], table, earlier.shape[1])[..., 0]
                earlier = dequantize_rows(earlier, scales).to(v.dtype)
            earlier_k, earlier_v = earlier.split(self.head_dim, -1) if fp8 else (None, earlier)
            values = torch.cat([earlier_v, v[start:end].transpose(0, 1)], dim=1)  # [Hkv, L, D]
            keys = (torch.cat([earlier_k, k[start:end].transpose(0, 1)], dim=1) if fp8
                    else gather_context(k_cache, table, length))
            out[start:end] = prefill_attention(q[start:end], keys, values, scale)
        return out

    def start_sequences(self, hot_slots: list[int]) -> None:
        """Sequences whose first token is in the coming step took these hot slots: the row cache
        forgets what the slots' earlier sequences picked (the model runner calls it before the step,
        outside any CUDA graph)."""
        if self.row_cache is not None:
            self.row_cache.reset(hot_slots)

    def count_decode_fetch(self, seq_lens: list[int]) -> None:
        """Count the far V rows that decoding sequences of `seq_lens` (after the step) read from
        the host pool in every sparse layer (the model runner calls it once per step, so that
        warm-up runs and graph replays count as what they are). A row cache counts its own misses."""
        if self.row_cache is None:
            self._far_rows_counted += len(self.host_rows) * far_rows_fetched(seq_lens, self.k_caches[0].shape[1],
                                                                             self.spec)

    @property
    def host_row_bytes(self) -> int:
        """Bytes of one position's row of one KV head in the host pool: V, or K | V with fp8 scoring
        keys, as stored (float8 with fp8 host values)."""
        rows = self.host_rows[0] if self.host_rows else None
        return 0 if rows is None else rows.shape[-1] * rows.element_size()

    @property
    def v_rows_fetched(self) -> int:
        """Far V rows read from host memory by decode steps so far, all sparse layers (with a row
        cache: its misses, read from the device)."""
        return self._far_rows_counted if self.row_cache is None else int(self.row_cache.misses.sum())

    def copy_staged_rows(self, plan, block_of: Callable[[int, int], int]) -> None:
        """After a step's forward (the model runner calls it, outside any CUDA graph): copy the
        chunks of staged decode rows that the step closed to the host pool (`DecodeRowsStage`), on
        the offload stream after the step's work; later reads of the host pool wait for them.
        plan: the step's `StepPlan`; block_of(hot slot, i): block i of the table of the slot's sequence."""
        if self.decode_stage is None:
            return
        copies = self.decode_stage.copies_after_step(plan.hot_slots, plan.num_computed_tokens,
                                                     plan.num_new_tokens, plan.num_decodes, block_of)
        self.issue_staged_copies(copies)

    def issue_staged_copies(self, copies: list[Copy3D]) -> None:
        """Run copies of staged decode rows to the host pool: on CUDA on the offload stream after
        the work queued so far on the current stream, recorded as every sparse layer's last host
        write (so later reads wait for them); elsewhere at once."""
        if not copies:
            return
        if self.offload_stream is None:
            self.decode_stage.issue(copies, None)
            return
        done = self._on_offload_stream(lambda: self.decode_stage.issue(copies, self.offload_stream))
        self._offload_done = [done] * len(self._offload_done)

    def join_offload(self) -> None:
        """The current stream waits, on the device, for every host write issued so far. Outside a
        capture, host-side reads then wait for the same point; inside one, the capture's offload
        branch, if its writes forked one, is joined back (a capture must end with every stream it
        forked joined, and may not wait on work outside it). The model runner calls it before
        capturing or replaying a decode graph and at the end of a capture."""
        if self.offload_stream is None:
            return
        capturing = _capturing_on(self.device)
        forked, self._offload_forked_in_capture = self._offload_forked_in_capture, False
        if capturing and not forked:
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_stream(self.offload_stream)
        done = _OffloadDone(torch.cuda.Event(), captured=capturing)
        done.event.record(stream)
        self._offload_done = [done] * len(self._offload_done)

    def _offload(self, sparse: int, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the host rows [T, Hkv, D] (V; K | V [T, Hkv, 2D] with fp8 scoring keys) to the host
        pool; on CUDA on the offload stream, after they are ready."""
        if self.offload_stream is None:
            store_rows(self.host_rows[sparse], rows, slot_mapping)
            return
        done = self._on_offload_stream(lambda: store_rows(self.host_rows[sparse], rows, slot_mapping))
        rows.record_stream(self.offload_stream)  # keep the rows' memory until the write has read them
        slot_mapping.record_stream(self.offload_stream)
        self._offload_done[sparse] = done

    def _on_offload_stream(self, write: Callable[[], None]) -> "_OffloadDone":
        """Run `write()` (a write of the host pool) on the offload stream after the work queued so
        far on the current stream; the event after it (inside a capture, the fork is noted for
        `join_offload`)."""
        self.offload_stream.wait_stream(torch.cuda.current_stream(self.device))
        capturing = _capturing_on(self.device)
        self._offload_forked_in_capture |= capturing
        with torch.cuda.stream(self.offload_stream):
            write()
            done = _OffloadDone(torch.cuda.Event(), captured=capturing)
            done.event.record(self.offload_stream)
        return done

    def _wait_for_host_writes(self, done: Optional["_OffloadDone"], on_device: bool) -> None:
        """Order a read of the host pool after the write `done`: the current stream waits for it
        (on_device) or the host does. Inside a capture, a write recorded outside it is already
        ordered by the `join_offload` before the capture (and cannot be waited on inside it)."""
        if done is None or done.captured != _capturing_on(self.device):
            return
        if on_device:
            torch.cuda.current_stream(self.device).wait_event(done.event)
        else:
            done.event.synchronize()

    def _start_prefill_reads(self, sparse: int, ctx: ForwardContext) -> None:
        """Start copying sparse layer `sparse`'s earlier rows of ctx's prefill chunks to the device,
        after the layer's host writes so far."""
        self.prefill_reads.start(sparse, self.host_rows[sparse], ctx,
                                 self._host_writes_event(self._offload_done[sparse]))

    def _host_writes_event(self, done: Optional["_OffloadDone"]) -> Optional[torch.cuda.Event]:
        """The event a read of the host pool outside a capture waits for after the write `done`
        (None: nothing to wait for; a write recorded in a capture was joined into the capture
        stream before it ended, so the stream orders it)."""
        return None if done is None or done.captured else done.event

    def _write_hot(self, hot: torch.Tensor, rows: torch.Tensor, ctx: ForwardContext) -> None:
        """Copy new V (or K) rows [T, Hkv, D] that are sink positions or among the last `recent_window` of
        their sequence into the sequence's hot rows; the other rows go to the spare slot, which no
        sequence reads (so nothing here waits on the host: no boolean indexing). Needs
        ctx.token_seqs, which the model runner sets for every step it prepares."""
        if self.spec.hot_rows == 0:
            return
        seqs = ctx.token_seqs
        pos = ctx.positions
        keep = (pos < self.spec.sink_tokens) | (pos >= ctx.seq_lens[seqs] - self.spec.recent_window)
        slot = torch.where(keep, ctx.hot_slots[seqs], self.spare_hot_slot)
        hot[slot, :, self.spec.hot_row(pos)] = rows

    def _write_hot_decode(self, hot: torch.Tensor, rows: torch.Tensor, ctx: ForwardContext) -> None:
        """`_write_hot` for a decode-only step (one token per sequence, each in its own hot slot, so
        no ctx.token_seqs): with a recent window every new row is kept; without one, a row past the
        sink goes to the spare slot."""
        if self.spec.hot_rows == 0:
            return
        pos, slot = ctx.positions, ctx.hot_slots
        if not self.spec.recent_window:
            slot = torch.where(pos < self.spec.sink_tokens, slot, self.spare_hot_slot)
        hot[slot, :, self.spec.hot_row(pos)] = rows


@dataclass(frozen=True)
class _OffloadDone:
    """The event after a host write, and whether it was recorded inside a CUDA-graph capture
    (such an event means something only inside that capture)."""

    event: torch.cuda.Event
    captured: bool


def _capturing_on(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
