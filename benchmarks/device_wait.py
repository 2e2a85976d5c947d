#!/usr/bin/env python3
"""What the scheduling rank's device wait (`parallel.wait_for_device`, under tensor parallelism on
CUDA) costs a decode step, timed on the GPU:

    python benchmarks/device_wait.py step OUT.json
    mpirun -np 2 python benchmarks/device_wait.py engine OUT.json --model llama3-8b --contexts 2048 \\
        --batches 1,16,64 --modes full,kcache --micro-batches 1 --no-hf-baseline --no-enforce-eager

step (one GPU): a stand-in step (a CUDA graph of 1, 8 or 64 bf16 4096 x 4096 matmuls, then logits
[64, 128256] fp32) whose greedy tokens are read back three ways, alternating, medians of 300: as
without the wait (argmax, tolist), as the sampler does (argmax, the wait, then the copy), and with
the copy to pinned host memory queued before the wait (argmax, copy queued, the wait, the read).

engine: `benchmarks/throughput.py` with the given arguments, the sampler given the wait or not in
alternating blocks of 4 steps on the same engine; the decode steps' median wall time of each, per
mode and batch (each point's first two steps of each kind left out). Rank 0 writes OUT.json.
"""

from __future__ import annotations

import json
import os
import runpy
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import kcache_dist.engine.llm_engine as llm_engine  # noqa: E402
from kcache_dist.engine.sampler import sample  # noqa: E402
from kcache_dist.parallel import wait_for_device  # noqa: E402
from kcache_dist.sampling_params import SamplingParams  # noqa: E402

BLOCK_STEPS = 4  # engine: steps per block with the wait on, then off


def stand_in_step(out_path: str, reps: int = 300) -> dict:
    dev = torch.device("cuda")
    params = [SamplingParams(temperature=0)] * 64
    generator = torch.Generator().manual_seed(0)
    result = {"card": torch.cuda.get_device_name(dev), "reps": reps, "median_step_us": {}}
    for matmuls in (1, 8, 64):
        a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
        bias = torch.randn(64, 128256, device=dev)
        logits = torch.empty(64, 128256, device=dev)

        def work():
            x = a
            for _ in range(matmuls):
                x = a @ x
            logits.copy_(bias + x[0, 0].float())

        work()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            work()

        def no_wait():
            graph.replay()
            return logits.argmax(-1).tolist()

        def sampler():
            graph.replay()
            return sample(logits, params, [None] * 64, generator,
                          lambda: wait_for_device(dev, 30.0, "the stand-in step"))

        def copy_queued_first():
            graph.replay()
            ids = logits.argmax(-1).to("cpu", non_blocking=True)  # pinned: the copy is queued, not done
            wait_for_device(dev, 30.0, "the stand-in step")
            return ids.tolist()

        forms = {"no_wait": no_wait, "sampler": sampler, "copy_queued_first": copy_queued_first}
        expected = no_wait()
        times: dict[str, list[float]] = {name: [] for name in forms}
        for name, form in forms.items():
            if form() != expected:
                raise RuntimeError(f"{name} read other tokens than the argmax")
        for _ in range(reps):
            for name, form in forms.items():
                start = time.perf_counter()
                form()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[20:]) * 1e6 for name, t in times.items()}
        result["median_step_us"][matmuls] = medians
        print(f"{matmuls} matmuls: " + ", ".join(f"{n} {v:.1f} us" for n, v in medians.items())
              + f"; sampler - no_wait {medians['sampler'] - medians['no_wait']:+.1f} us", flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def engine_steps(out_path: str, throughput_args: list[str]) -> None:
    real_sample = llm_engine.sample
    state = {"on": True, "steps": 0}
    times: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}

    def switched_sample(logits, params, generators, default_generator, wait_for_device=None):
        return real_sample(logits, params, generators, default_generator, wait_for_device if state["on"] else None)

    plain_step = llm_engine.LLMEngine.step

    def timed_step(engine):
        state["on"] = (state["steps"] // BLOCK_STEPS) % 2 == 0
        state["steps"] += 1
        scheduler = engine.scheduler
        decoding = not scheduler.waiting and all(s.num_uncomputed_tokens == 1 for s in scheduler.running)
        point = f"{engine.config.kcache.mode}:{len(scheduler.running)}"
        start = time.perf_counter()
        outputs = plain_step(engine)
        if decoding and scheduler.running:
            times["on" if state["on"] else "off"].setdefault(point, []).append(time.perf_counter() - start)
        return outputs

    llm_engine.sample = switched_sample
    llm_engine.LLMEngine.step = timed_step
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    sys.argv = [os.path.join(ROOT, "benchmarks", "throughput.py"), *throughput_args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    if not times["on"]:
        return  # not the scheduling rank
    summary = {}
    for point in sorted(times["on"]):
        on, off = times["on"][point][2:], times["off"].get(point, [])[2:]
        if len(on) >= 8 and len(off) >= 8:
            summary[point] = {"steps_on": len(on), "steps_off": len(off), "median_on_us": statistics.median(on) * 1e6,
                              "median_off_us": statistics.median(off) * 1e6,
                              "wait_us": (statistics.median(on) - statistics.median(off)) * 1e6}
            print(f"{point}: wait {summary[point]['wait_us']:+.1f} us a step "
                  f"({summary[point]['median_off_us']:.0f} us without)", flush=True)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    with open(out_path, "w") as f:
        json.dump({"card": card, "block_steps": BLOCK_STEPS, "per_point": summary, "throughput_args": throughput_args},
                  f, indent=1)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("step", "engine"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "step":
        stand_in_step(sys.argv[2])
    else:
        engine_steps(sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
