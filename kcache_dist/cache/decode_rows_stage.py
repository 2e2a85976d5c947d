"""The decode's new host rows: staged in device memory, written to the host pool by the copy engine.

A decode step makes one new V row (K | V with fp8 scoring keys) per (sequence, KV head, sparse
layer). Stored into pinned host memory by a kernel (SM stores, as prefill chunks still are), those
rows slowed the kernels and the all-reduces around them on tensor-parallel ranks (two H200s at
8K: a step's longest store 0.5-1.1 ms instead of ~6 us, the K pass beside it up to 1.8 ms instead
of 0.75, the step 62.7 ms against 60.3 with nothing written to host memory and 60.5 staged;
benchmarks/results/decode_rows_stage_h200), while on one GPU they cost nothing. A new row is read from the
recent window's device rows (`v_hot`) for `recent_window` steps, so its host copy can wait:

  stage [num_sparse, num_slots + 1, Hkv, 2C, W]   device, host dtype: each sequence slot's last
                                                   2C new rows in a ring of two chunks of C rows

The decode stores its new rows into the stage (device stores, captured in CUDA graphs); after the
step, for every sequence whose position closed a chunk (position + 1 a multiple of C), one 3D copy
by the copy engine writes the chunk's rows of every sparse layer and KV head to the host pool
[num_blocks, Hkv, bs, W] (layers at a fixed stride in one `HostPool`). C divides the block size,
so a chunk lies in one block, contiguous per (layer, KV head) on both sides. A chunk that began
before the sequence's decode (its rows written by the prefill) is copied from the first decoded
position on. The copies run on the offload stream, so a read of the host pool waits for them as
for any host write (`KCacheKVCache._offload_done`). A chunk's first row is read from the host pool
`recent_window - C + 1` steps after the copy is issued, at least two with C <= recent_window / 2;
the ring's other chunk is filled meanwhile, and a chunk is written again only C steps later.

On CUDA the copy is the driver's `cuMemcpy3DAsync`; elsewhere `copy_3d_reference` does the same
copy on flat byte views (the CPU engine runs it, so its tests check the copies' geometry).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

MAX_CHUNK_ROWS = 64
MIN_CHUNK_ROWS = 8


def stage_chunk_rows(recent_window: int, block_size: int) -> int:
    """C: the largest power of two <= min(recent_window // 2, MAX_CHUNK_ROWS) that divides the
    block size; 0 (no stage: the decode stores its rows straight into host memory) when that is
    below MIN_CHUNK_ROWS."""
    chunk = 1
    while chunk * 2 <= min(recent_window // 2, MAX_CHUNK_ROWS) and block_size % (chunk * 2) == 0:
        chunk *= 2
    return chunk if chunk >= MIN_CHUNK_ROWS else 0


@dataclass(frozen=True)
class Copy3D:
    """A pitched 3D copy of bytes, as CUDA's CUDA_MEMCPY3D describes one: `depth` slices of
    `height` rows of `width_bytes`; a side's byte (x, y, z) lies at
    base + (z * rows_per_slice + y) * pitch + x."""

    src_base: int  # data_ptr of the source's first slice
    src_x_bytes: int
    src_y: int
    src_pitch: int
    src_rows_per_slice: int
    dst_base: int
    dst_x_bytes: int
    dst_y: int
    dst_pitch: int
    dst_rows_per_slice: int
    width_bytes: int
    height: int
    depth: int


def copy_3d_reference(src: torch.Tensor, dst: torch.Tensor, copy: Copy3D) -> None:
    """`copy` between the flat uint8 tensors src and dst (bases: their data_ptr() plus the copy's
    base offsets), in torch."""

    def view(flat: torch.Tensor, base: int, x: int, y: int, pitch: int, rows: int) -> torch.Tensor:
        offset = base - flat.data_ptr() + y * pitch + x
        return flat.as_strided((copy.depth, copy.height, copy.width_bytes), (rows * pitch, pitch, 1), offset)

    view(dst, copy.dst_base, copy.dst_x_bytes, copy.dst_y, copy.dst_pitch, copy.dst_rows_per_slice).copy_(
        view(src, copy.src_base, copy.src_x_bytes, copy.src_y, copy.src_pitch, copy.src_rows_per_slice))


class _CudaMemcpy3D(ctypes.Structure):  # CUDA_MEMCPY3D (cuda.h)
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcZ", ctypes.c_size_t),
                ("srcLOD", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
                ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p), ("reserved0", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t), ("srcHeight", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstZ", ctypes.c_size_t),
                ("dstLOD", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
                ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p), ("reserved1", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t), ("dstHeight", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t), ("Depth", ctypes.c_size_t)]


_CU_MEMORYTYPE_HOST, _CU_MEMORYTYPE_DEVICE = 1, 2
_driver: Optional[ctypes.CDLL] = None


def copy_3d_cuda(copy: Copy3D, stream: torch.cuda.Stream) -> None:
    """`copy` from device memory to pinned host memory by the copy engine, on `stream` (the
    driver's cuMemcpy3DAsync, in the calling thread's current context: the device's primary
    context, which torch's runtime uses, made current first where the thread has none)."""
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL("libcuda.so.1")
        _driver.cuMemcpy3DAsync_v2.argtypes = [ctypes.POINTER(_CudaMemcpy3D), ctypes.c_void_p]
    context = ctypes.c_void_p()
    if _driver.cuCtxGetCurrent(ctypes.byref(context)) == 0 and not context.value:
        _driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), ctypes.c_int(stream.device.index))
        _driver.cuCtxSetCurrent(context)
    params = _CudaMemcpy3D(
        srcXInBytes=copy.src_x_bytes, srcY=copy.src_y, srcMemoryType=_CU_MEMORYTYPE_DEVICE,
        srcDevice=copy.src_base, srcPitch=copy.src_pitch, srcHeight=copy.src_rows_per_slice,
        dstXInBytes=copy.dst_x_bytes, dstY=copy.dst_y, dstMemoryType=_CU_MEMORYTYPE_HOST,
        dstHost=copy.dst_base, dstPitch=copy.dst_pitch, dstHeight=copy.dst_rows_per_slice,
        WidthInBytes=copy.width_bytes, Height=copy.height, Depth=copy.depth)
    status = _driver.cuMemcpy3DAsync_v2(ctypes.byref(params), ctypes.c_void_p(stream.cuda_stream))
    if status != 0:
        raise RuntimeError(f"cuMemcpy3DAsync of the decode's staged rows to the host pool failed: CUresult {status}")


class DecodeRowsStage:
    """The stage of one rank's sparse layers (module docstring) and the copies that empty it.

    host_rows: the sparse layers' host pools [num_blocks, Hkv, bs, W], equal shapes at a fixed
    address stride (consecutive `HostPool.take`s); host_buffer: the flat uint8 buffer they lie in
    (the reference copy's destination)."""

    def __init__(self, host_rows: Sequence[torch.Tensor], host_buffer: torch.Tensor, num_slots: int,
                 chunk_rows: int, device: torch.device):
        first = host_rows[0]
        _, num_kv_heads, block_size, width = first.shape
        if block_size % chunk_rows:
            raise ValueError(f"stage chunk of {chunk_rows} rows does not divide the block size {block_size}")
        strides = {b.data_ptr() - a.data_ptr() for a, b in zip(host_rows, host_rows[1:])}
        if len(strides) > 1 or any(t.shape != first.shape or t.dtype != first.dtype for t in host_rows):
            raise ValueError("the sparse layers' host pools must have one shape and lie at a fixed stride")
        self.chunk_rows = chunk_rows
        self.block_size = block_size
        self.host_buffer = host_buffer
        self._host_base = first.data_ptr()
        self._row_bytes = width * first.element_size()
        self._host_layer_stride = strides.pop() if strides else first.numel() * first.element_size()
        self._host_rows_per_layer = first.shape[0] * num_kv_heads  # (block, KV head) pieces
        self.stage = torch.empty((len(host_rows), num_slots + 1, num_kv_heads, 2 * chunk_rows, width),
                                 dtype=first.dtype, device=device)
        self._staged_from: dict[int, int] = {}  # hot slot -> first position its decode stages

    def store(self, sparse: int, rows: torch.Tensor, positions: torch.Tensor, hot_slots: torch.Tensor) -> None:
        """Stage the new rows [T, Hkv, W] of sparse layer `sparse` (one per decoded sequence, at
        positions [T] in hot slots [T]; CUDA-graph padding rows go to the spare slot)."""
        stage = self.stage[sparse].view(torch.uint8)  # float8 rows move as bytes
        stage[hot_slots, :, positions % (2 * self.chunk_rows)] = rows.view(torch.uint8)

    def copies_after_step(self, hot_slots: Sequence[int], num_computed_tokens: Sequence[int],
                          num_new_tokens: Sequence[int], num_decodes: int,
                          block_of: Callable[[int, int], int]) -> list[Copy3D]:
        """The copies a step's new rows call for (sequence i of the step: hot slot, tokens before
        the step, new tokens; the first `num_decodes` decode one token; block_of(hot slot, i): block
        i of the slot's sequence), and note where each prefilled sequence's staged rows begin."""
        copies = []
        c = self.chunk_rows
        for i, (slot, start, new) in enumerate(zip(hot_slots, num_computed_tokens, num_new_tokens)):
            if i >= num_decodes:  # a prefill chunk: written to the host pool directly
                self._staged_from[slot] = start + new
                continue
            if (start + 1) % c:
                continue
            first = max(start + 1 - c, self._staged_from.get(slot, 0))
            if first > start:
                continue
            copies += self.copies(slot, block_of(slot, start // self.block_size), first, start + 1 - first)
        return copies

    def copies(self, slot: int, block: int, first: int, rows: int) -> list[Copy3D]:
        """Rows [first, first + rows) of slot `slot`, every sparse layer and KV head, into `block`:
        one copy over all layers, or one a layer where the layers' stride is no whole number of
        (block, KV head) pieces."""
        num_layers, slots, num_kv_heads, ring, _ = self.stage.shape
        row_bytes = self._row_bytes
        src_pitch, dst_pitch = ring * row_bytes, self.block_size * row_bytes
        whole = self._host_layer_stride % dst_pitch == 0
        per_copy = num_layers if whole else 1
        return [Copy3D(src_base=self.stage[layer].data_ptr(), src_x_bytes=first % ring * row_bytes,
                       src_y=slot * num_kv_heads, src_pitch=src_pitch, src_rows_per_slice=slots * num_kv_heads,
                       dst_base=self._host_base + layer * self._host_layer_stride,
                       dst_x_bytes=first % self.block_size * row_bytes, dst_y=block * num_kv_heads,
                       dst_pitch=dst_pitch,
                       dst_rows_per_slice=(self._host_layer_stride // dst_pitch if whole
                                           else self._host_rows_per_layer),
                       width_bytes=rows * row_bytes, height=num_kv_heads, depth=per_copy)
                for layer in range(0, num_layers, per_copy)]

    def issue(self, copies: list[Copy3D], stream: Optional[torch.cuda.Stream]) -> None:
        """Run the copies: on CUDA by the copy engine on `stream` (ordered after the step by the
        caller), else at once."""
        stage_bytes = self.stage.view(-1).view(torch.uint8)
        for copy in copies:
            if stream is None:
                copy_3d_reference(stage_bytes, self.host_buffer, copy)
            else:
                copy_3d_cuda(copy, stream)
