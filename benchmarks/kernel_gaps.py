"""The kernel timeline of one call on the GPU, and where the GPU sat idle in it: the device's work
as (name, start_us, duration_us) records from `torch.profiler`, and the idle time before each
kernel of a given name (e.g. NCCL's all-reduce kernels), which a step's time with minus without
those kernels cannot tell apart from the kernels' own time.

    python benchmarks/kernel_gaps.py TRACE.json [TRACE.json.gz ...]

(files written by `profile_decode.py --trace-graphs --out OUT`: OUT.MODE.rankR.trace.json)

Used by `benchmarks/profile_decode.py --trace-graphs`. A record's times are the profiler's (the
host clock, so the records of the ranks of one machine line up to a few us).
"""

from __future__ import annotations

import argparse
import gzip
import json
from typing import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

Kernel = tuple[str, float, float]  # name, start_us, duration_us

ALL_REDUCE_KERNEL_PREFIX = "ncclDevKernel_AllReduce"


def trace_kernels(run: Callable[[], object], device: torch.device) -> list[Kernel]:
    """The device work (kernels, copies, sets) of one `run()`, in start order."""
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize(device)
    kernels = [(e.name, float(e.time_range.start), float(e.time_range.end - e.time_range.start))
               for e in prof.events() if e.device_type.name == "CUDA"]
    return sorted(kernels, key=lambda k: k[1])


def idle_before(kernels: Sequence[Kernel], name_prefix: str) -> list[float]:
    """For each record whose name starts with name_prefix, in start order: us from the end of all
    the work started before it to its start (0 where that work still ran)."""
    gaps, busy_until = [], None
    for name, start, duration in sorted(kernels, key=lambda k: k[1]):
        if name.startswith(name_prefix):
            gaps.append(max(0.0, start - busy_until) if busy_until is not None else 0.0)
        busy_until = start + duration if busy_until is None else max(busy_until, start + duration)
    return gaps


def timeline_summary(kernels: Sequence[Kernel], name_prefix: str = ALL_REDUCE_KERNEL_PREFIX) -> dict:
    """Span, busy (the union of the records' intervals) and idle ms of a timeline; the idle us
    before each `name_prefix` record, their sum in ms, and those records' own ms."""
    span_us = busy_us = 0.0
    if kernels:
        ordered = sorted(kernels, key=lambda k: k[1])
        span_us = max(s + d for _, s, d in ordered) - ordered[0][1]
        run_start, run_end = ordered[0][1], ordered[0][1] + ordered[0][2]
        for _, start, duration in ordered[1:]:
            if start > run_end:
                busy_us += run_end - run_start
                run_start, run_end = start, start + duration
            else:
                run_end = max(run_end, start + duration)
        busy_us += run_end - run_start
    gaps = idle_before(kernels, name_prefix)
    return {"span_ms": span_us / 1e3, "busy_ms": busy_us / 1e3, "idle_ms": (span_us - busy_us) / 1e3,
            "kernels": len(kernels), "matched": len(gaps), "matched_ms": sum(d for n, _, d in kernels
                                                                            if n.startswith(name_prefix)) / 1e3,
            "idle_before_matched_ms": sum(gaps) / 1e3, "idle_before_matched_us": [round(g, 1) for g in gaps]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", help="JSON files of {path: [[name, start_us, duration_us], ...]}")
    p.add_argument("--prefix", default=ALL_REDUCE_KERNEL_PREFIX, help="name prefix of the kernels to look before")
    args = p.parse_args(argv)
    for path in args.traces:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            for name, kernels in json.load(f).items():
                s = timeline_summary([tuple(k) for k in kernels], args.prefix)
                print(f"{path} {name}: span {s['span_ms']:.2f} ms, busy {s['busy_ms']:.2f}, idle {s['idle_ms']:.2f}; "
                      f"{s['matched']} x {args.prefix}: own {s['matched_ms']:.2f} ms, idle before them "
                      f"{s['idle_before_matched_ms']:.2f} ms")


if __name__ == "__main__":
    main()
