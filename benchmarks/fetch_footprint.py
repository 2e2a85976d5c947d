#!/usr/bin/env python3
"""How fast the zero-copy V fetch reads pinned host memory, as its rows spread over the pool (one GPU).

    PYTHONUNBUFFERED=1 python benchmarks/fetch_footprint.py OUT.json [--parts stride,pools,order]
    PYTHONUNBUFFERED=1 python benchmarks/fetch_footprint.py OUT.json --parts concurrent --gpus 1,2,4

`benchmarks/kernels.py` found the gather at 91-92% of bulk H2D except on the 8.6 GB pool of
B=128 x 32K at top 256 (30%). The parts below look for the cause; each prints its points and the
JSON holds them all, with the bulk H2D figure measured at the start of the same run.

  stride  one 256-B row every S bytes (4 KiB .. 2 MiB) over a span of X bytes (1 .. 16 GiB) of one
          HostPool, in ascending address order: ns per row. A jump with S shows the unit in which
          host memory is translated for the GPU's reads; a jump with X the reach of the caches of
          those translations (the same span is read repeatedly, so a span within reach stays warm).
  pools   B x 32K sequences (B = 32, 128), top 256 and 1024 rows per (sequence, KV head) at random,
          the library's gather kernel (`_gather_kernel`, grids 132 / 264 / 528) from three kinds of
          pinned memory holding the same layout: HostPool (anonymous mapping, huge pages advised,
          cudaHostRegister), torch's pinned allocator (cudaHostAlloc) and driver-managed host memory
          (cuMemCreate on the NUMA node, mapped in pieces of its 2 MiB granularity: the GPU then maps
          it with 2 MiB pages).
  order   B = 128 x 32K, top 256 and 1024: block tables as a random permutation of the pool (as in
          kernels.py), each sequence's blocks contiguous, and sequences contiguous but in random
          order; each gathered by (sequence, head) rows as the library does and in pool-address order.
  warm    whether the copy engine can take the translation misses off the SMs: one row every 64 KiB
          over 1 and 1.5 GiB read cold (after 8 GiB of other pieces), warm (read again), and after
          a copy-engine "sweep" of the span (one 2D copy, cudaMemcpy2DAsync: 4, 64 or 256 bytes of
          every 64 KiB piece); then the sweep and the cold gather each beside a 2 GiB device copy
          on another stream (how much of each hides behind HBM-bound work).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kcache_dist.cache.host_pool import HostPool  # noqa: E402
from kcache_dist.kcache.triton_kcache import _gather_kernel  # noqa: E402

from kernels import DT, D, HKV, baselines, bench, log, random_idx  # noqa: E402

GIB = 1 << 30
ROW_BYTES = D * DT.itemsize
BS = 256
CONTEXT = 32768


@triton.jit
def _gather_rows(VP, SRC, DST, OUT, n_rows, D: tl.constexpr, R: tl.constexpr):
    """OUT[DST[r]] = VP[SRC[r]] for r < n_rows; VP [rows, D] (pinned host, read through UVA)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ri = tl.arange(0, R)
    di = tl.arange(0, D)
    for start in range(pid * R, n_rows, nprog * R):
        r = start + ri
        m = r < n_rows
        src = tl.load(SRC + r, mask=m, other=0)
        v = tl.load(VP + src[:, None] * D + di[None, :], mask=m[:, None], other=0.0)
        dst = tl.load(DST + r, mask=m, other=0).to(tl.int64)
        tl.store(OUT + dst[:, None] * D + di[None, :], v, mask=m[:, None])


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requested_handle_types", ctypes.c_int), ("location", _Location),
                ("win32_handle_metadata", ctypes.c_void_p), ("compression_type", ctypes.c_ubyte),
                ("gpu_direct_rdma_capable", ctypes.c_ubyte), ("usage", ctypes.c_ushort),
                ("reserved", ctypes.c_ubyte * 4)]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_LOCATION_TYPE_HOST_NUMA = 3
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class DriverHostMemory:
    """num_bytes of pinned host memory on NUMA node `node` from the driver's virtual memory API,
    readable by the current GPU (through UVA, like cudaHostRegister'ed memory). `granularity` is
    the piece size it was mapped in. Triton takes it as a pointer (`data_ptr`, `dtype`)."""

    def __init__(self, num_bytes: int, node: int, dtype: torch.dtype):
        cu = ctypes.CDLL("libcuda.so.1")
        prop = _AllocationProp(type=CU_MEM_ALLOCATION_TYPE_PINNED,
                               location=_Location(CU_MEM_LOCATION_TYPE_HOST_NUMA, node))
        granularity = ctypes.c_size_t()
        self._check(cu.cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), 1),
                    "cuMemGetAllocationGranularity")
        self.granularity = granularity.value
        size = -(-num_bytes // self.granularity) * self.granularity
        handle = ctypes.c_ulonglong()
        self._check(cu.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop),
                                   ctypes.c_ulonglong(0)), "cuMemCreate")
        ptr = ctypes.c_ulonglong()
        self._check(cu.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(self.granularity),
                                           ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "cuMemAddressReserve")
        self._check(cu.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle, ctypes.c_ulonglong(0)),
                    "cuMemMap")
        access = _AccessDesc(_Location(CU_MEM_LOCATION_TYPE_DEVICE, torch.cuda.current_device()),
                             CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self._check(cu.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(access), ctypes.c_size_t(1)),
                    "cuMemSetAccess")
        self.ptr, self.num_bytes, self.dtype = ptr.value, size, dtype  # not unmapped: the run's process ends

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed: CUresult {result}")

    def data_ptr(self) -> int:
        return self.ptr


def gbps(num_rows: int, ms: float) -> float:
    return num_rows * ROW_BYTES / ms / 1e6


def part_stride(dev, h2d: float) -> list[dict]:
    pool = HostPool(16 * GIB, dev)
    rows = pool.take((16 * GIB // ROW_BYTES, D), DT)
    points = []
    for span in (1 * GIB, 2 * GIB, 4 * GIB, 8 * GIB, 16 * GIB):
        for stride in (4096, 16384, 65536, 262144, 2 << 20):
            n = span // stride
            src = torch.arange(n, device=dev, dtype=torch.int64) * (stride // ROW_BYTES)
            dst = torch.arange(n, device=dev, dtype=torch.int64)
            out = torch.empty(n, D, dtype=DT, device=dev)
            ms = bench(lambda: _gather_rows[(264,)](rows, src, dst, out, n, D=D, R=32, num_warps=4), reps=10)
            p = {"span_GiB": span / GIB, "stride_bytes": stride, "rows": n, "ms": ms, "ns_per_row": ms * 1e6 / n,
                 "GBps": gbps(n, ms), "pct_h2d": 100 * gbps(n, ms) / h2d}
            log(json.dumps(p))
            points.append(p)
    return points


def far_rows(B: int, top_n: int, gen, dev) -> torch.Tensor:
    """[B * HKV, top_n] sorted random far positions of B sequences of CONTEXT - U[0, 48] tokens, on dev."""
    lens = (CONTEXT - torch.randint(0, 49, (B,), generator=gen)).tolist()
    return random_idx(lens, top_n, gen).to(dev)


def time_gather(pool, bt, idx, grid: int) -> float:
    rows, top_n = idx.shape
    n = rows * top_n
    out = torch.empty(n, D, dtype=DT, device=bt.device)
    return bench(lambda: _gather_kernel[(grid,)](pool, bt, idx, out, idx, n, bt.stride(0), top_n, HKV=HKV, D=D, BS=BS,
                                                 R=32, num_warps=4, HAS_DST=False))


def part_pools(dev, h2d: float, gen) -> list[dict]:
    points = []
    for B in (32, 128):
        num_blocks = B * CONTEXT // BS
        shape = (num_blocks, HKV, BS, D)
        num_bytes = num_blocks * HKV * BS * ROW_BYTES
        host_pool = HostPool(num_bytes, dev)
        kinds = {"host_pool": host_pool.take(shape, DT),
                 "torch_pinned": torch.empty(shape, dtype=DT, pin_memory=True)}
        driver = DriverHostMemory(num_bytes, host_pool.numa_node or 0, DT)
        kinds["driver_vmm"] = driver
        bt = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(B, -1).to(dev)
        for top_n in (256, 1024):
            idx = far_rows(B, top_n, gen, dev)
            for kind, pool in kinds.items():
                for grid in (132, 264, 528):
                    ms = time_gather(pool, bt, idx, grid)
                    n = idx.numel()
                    p = {"pool": kind, "B": B, "context": CONTEXT, "top_n": top_n, "grid": grid,
                         "pool_GB": num_bytes / 1e9, "ms": ms, "GBps": gbps(n, ms), "pct_h2d": 100 * gbps(n, ms) / h2d}
                    if kind == "driver_vmm":
                        p["granularity_bytes"] = driver.granularity
                    log(json.dumps(p))
                    points.append(p)
        del kinds, host_pool
    return points


def block_tables(layout: str, B: int, gen, dev) -> torch.Tensor:
    per_seq = CONTEXT // BS
    if layout == "random":
        bt = torch.randperm(B * per_seq, generator=gen)
    elif layout == "contiguous":
        bt = torch.arange(B * per_seq)
    else:  # "shuffled_sequences": each sequence's blocks contiguous, the sequences in random pool order
        bt = torch.randperm(B, generator=gen)[:, None] * per_seq + torch.arange(per_seq)
    return bt.to(torch.int32).view(B, per_seq).to(dev)


def part_order(dev, h2d: float, gen) -> list[dict]:
    B = 128
    num_blocks = B * CONTEXT // BS
    host_pool = HostPool(num_blocks * HKV * BS * ROW_BYTES, dev)  # held: freeing it unregisters the memory
    pool = host_pool.take((num_blocks, HKV, BS, D), DT)
    fill = torch.empty(1 << 28, dtype=DT, device=dev)
    for start in range(0, pool.numel(), fill.numel()):  # values, so that the address-ordered rows can be checked
        chunk = pool.view(-1)[start:start + fill.numel()]
        chunk.copy_(fill[:chunk.numel()].normal_())
    del fill
    points = []
    for top_n in (256, 1024):
        idx = far_rows(B, top_n, gen, dev)
        n = idx.numel()
        for layout in ("random", "contiguous", "shuffled_sequences"):
            bt = block_tables(layout, B, gen, dev)
            for grid in (132, 264):
                ms = time_gather(pool, bt, idx, grid)
                p = {"order": "by_row", "layout": layout, "top_n": top_n, "grid": grid, "ms": ms, "GBps": gbps(n, ms),
                     "pct_h2d": 100 * gbps(n, ms) / h2d}
                log(json.dumps(p))
                points.append(p)
            r = torch.arange(n, device=dev) // top_n
            pos = idx.view(-1).long()
            src = (bt.long()[r // HKV, pos // BS] * HKV + r % HKV) * BS + pos % BS
            src_sorted, order = torch.sort(src)
            dst = torch.arange(n, device=dev)[order]
            flat = pool.view(-1, D)
            out = torch.empty(n, D, dtype=DT, device=dev)
            _gather_rows[(264,)](flat, src_sorted, dst, out, n, D=D, R=32, num_warps=4)
            same = bool(torch.equal(out.cpu(), flat[src.cpu()]))
            for grid in (132, 264):
                ms = bench(lambda: _gather_rows[(grid,)](flat, src_sorted, dst, out, n, D=D, R=32, num_warps=4))
                p = {"order": "pool_address", "layout": layout, "top_n": top_n, "grid": grid, "ms": ms,
                     "GBps": gbps(n, ms), "pct_h2d": 100 * gbps(n, ms) / h2d, "rows_equal_reference": same}
                log(json.dumps(p))
                points.append(p)
    return points


CONCURRENT_STRIDES = [(4096, 1 * GIB)] + [(65536, span * GIB) for span in (1, 2, 4, 8)]


def concurrent_worker(gpu: int, barrier, results) -> None:
    """One process of the concurrent part: GPU `gpu`, its own 8 GiB NUMA-local HostPool."""
    torch.cuda.set_device(gpu)
    dev = torch.device("cuda", gpu)
    pool = HostPool(8 * GIB, dev)
    rows = pool.take((8 * GIB // ROW_BYTES, D), DT)
    bulk = rows.view(-1)[: GIB // DT.itemsize]
    bulk_dst = torch.empty_like(bulk, device=dev)
    points = []
    barrier.wait()
    ms = bench(lambda: bulk_dst.copy_(bulk, non_blocking=True), reps=10)
    points.append({"what": "h2d_copy_1GiB", "ms": ms, "GBps": GIB / ms / 1e6})
    for stride, span in CONCURRENT_STRIDES:
        n = span // stride
        src = torch.arange(n, device=dev, dtype=torch.int64) * (stride // ROW_BYTES)
        dst = torch.arange(n, device=dev, dtype=torch.int64)
        out = torch.empty(n, D, dtype=DT, device=dev)
        _gather_rows[(264,)](rows, src, dst, out, n, D=D, R=32, num_warps=4)  # compiled before the barrier
        torch.cuda.synchronize()
        barrier.wait()
        ms = bench(lambda: _gather_rows[(264,)](rows, src, dst, out, n, D=D, R=32, num_warps=4), reps=10)
        points.append({"what": "stride_gather", "stride_bytes": stride, "span_GiB": span / GIB, "rows": n, "ms": ms,
                       "ns_per_row": ms * 1e6 / n, "GBps": gbps(n, ms)})
    results.put({"gpu": gpu, "numa_node": pool.numa_node, "points": points})


def part_concurrent(gpu_counts: list[int]) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    runs = []
    for n in gpu_counts:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=concurrent_worker, args=(g, barrier, results)) for g in range(n)]
        for proc in procs:
            proc.start()
        per_gpu = sorted((results.get(timeout=600) for _ in procs), key=lambda r: r["gpu"])
        for proc in procs:
            proc.join()
        log(json.dumps({"gpus": n, "per_gpu": per_gpu}))
        runs.append({"gpus": n, "per_gpu": per_gpu})
    return runs


PIECE_BYTES = 64 << 10  # the unit of the translations (part stride)


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime torch loaded (for cudaMemcpy2DAsync, which torch does not expose)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            rt = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("no CUDA runtime library (libcudart.so) found")
    rt.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                     ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return rt


def _timed_ms(fn, stream: torch.cuda.Stream) -> float:
    """Device time of fn's work on `stream` (one call: a repeat would find the translations warm)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def part_warm(dev, reps: int = 5) -> dict:
    pool = HostPool(12 * GIB, dev)
    rows = pool.take((12 * GIB // ROW_BYTES, D), DT)
    rt, main, side = _cudart(), torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
    sweep_out = torch.empty(2 * GIB // PIECE_BYTES * 256, dtype=torch.uint8, device=dev)

    def gather_fn(start: int, span: int, grid: int = 264):
        n = span // PIECE_BYTES
        src = torch.arange(n, device=dev, dtype=torch.int64) * (PIECE_BYTES // ROW_BYTES) + start // ROW_BYTES
        dst = torch.arange(n, device=dev, dtype=torch.int64)
        out = torch.empty(n, D, dtype=DT, device=dev)
        return lambda: _gather_rows[(grid,)](rows, src, dst, out, n, D=D, R=32, num_warps=4)

    def sweep_fn(span: int, width: int):
        def sweep():
            err = rt.cudaMemcpy2DAsync(sweep_out.data_ptr(), width, rows.data_ptr(), PIECE_BYTES, width,
                                       span // PIECE_BYTES, 1, torch.cuda.current_stream(dev).cuda_stream)
            if err:
                raise RuntimeError(f"cudaMemcpy2DAsync failed: cudaError {err}")
        return sweep

    evict = gather_fn(2 * GIB, 8 * GIB)

    def cold(fn, stream=main) -> float:
        evict()
        torch.cuda.synchronize()
        return _timed_ms(fn, stream)

    result = {"spans": []}
    for span in (GIB, 3 * GIB // 2):
        gather = gather_fn(0, span)
        gather()  # compiled
        point = {"span_GiB": span / GIB, "pieces": span // PIECE_BYTES,
                 "gather_cold_ms": [cold(gather) for _ in range(reps)],
                 "gather_warm_ms": [_timed_ms(gather, main) for _ in range(reps)]}
        for width in (4, 64, 256):
            sweep, after = [], []
            for _ in range(reps):
                sweep.append(cold(sweep_fn(span, width), side))
                after.append(_timed_ms(gather, main))
            point[f"sweep{width}_ms"], point[f"gather_after_sweep{width}_ms"] = sweep, after
        log(json.dumps({k: (statistics.median(v) if isinstance(v, list) else v) for k, v in point.items()}))
        result["spans"].append(point)
    x = torch.empty(2 * GIB, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    beside = {"hbm_copy_alone_ms": [_timed_ms(lambda: y.copy_(x), main) for _ in range(reps)]}
    for name, fn in (("sweep64", sweep_fn(GIB, 64)), ("gather_cold", gather_fn(0, GIB, grid=132))):
        alone, together = [], []
        for _ in range(reps):
            alone.append(cold(fn, side))
            evict()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(main)
            side.wait_event(start)
            with torch.cuda.stream(side):
                fn()
            y.copy_(x)
            main.wait_stream(side)
            end.record(main)
            torch.cuda.synchronize()
            together.append(start.elapsed_time(end))
        beside[f"{name}_alone_ms"], beside[f"hbm_copy_with_{name}_ms"] = alone, together
    log(json.dumps({k: statistics.median(v) for k, v in beside.items()}))
    result["beside_hbm_copy"] = beside
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="fetch_footprint.json")
    p.add_argument("--parts", default="stride,pools,order", help="of: stride, pools, order, concurrent, warm")
    p.add_argument("--gpus", default="1,2,4", help="GPU counts of the concurrent part (GPUs 0 .. N-1)")
    args = p.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"stride", "pools", "order", "concurrent", "warm"})
    if unknown:
        p.error(f"unknown parts: {', '.join(unknown)}")
    out_path = args.out
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(0)
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              **baselines(dev)}
    h2d = result["h2d_GBps"]
    if "stride" in parts:
        result["stride"] = part_stride(dev, h2d)
    if "pools" in parts:
        result["pools"] = part_pools(dev, h2d, gen)
    if "order" in parts:
        result["order"] = part_order(dev, h2d, gen)
    if "warm" in parts:
        result["warm"] = part_warm(dev)
    if "concurrent" in parts:
        counts = [int(n) for n in args.gpus.split(",")]
        if max(counts) > torch.cuda.device_count():
            p.error(f"--gpus asks for {max(counts)} GPUs; {torch.cuda.device_count()} are visible")
        result["concurrent"] = part_concurrent(counts)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
