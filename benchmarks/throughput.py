#!/usr/bin/env python3
"""Decode and prefill throughput of the engine, KCache against full-KV mode, next to the roofline
and to Hugging Face transformers `generate` on the same shape.

    python benchmarks/throughput.py --model llama3-8b --dtype bfloat16 --contexts 8192,32768
    mpirun -np 2 python benchmarks/throughput.py --model llama3-8b ...      (tensor parallel over 2 ranks)
    deepspeed --num_gpus 2 benchmarks/throughput.py --model llama3-8b ...
    python benchmarks/throughput.py --model tiny-llama --contexts 128,256 --device cpu   (a CPU smoke run)
    python benchmarks/throughput.py --plot-only benchmarks/results/throughput_llama3-8b.json   (PNGs again)

Model: a local Hugging Face checkpoint directory (its weights are loaded), or a named shape
(`kcache_dist.models.named_shapes`: llama3-8b, llama2-7b, qwen2-7b, tiny-llama, tiny-qwen2) whose
weights the engine draws at random on the device: no file beyond config.json and a placeholder
tokenizer is written. Every rank of the job joins one tensor-parallel group.

For each context length and mode the engine is planned by its own memory planner (as a user would
start it: max_model_len = the context) and run at batch sizes up to the largest its plan allows:
  1. Plan: an engine with max_num_seqs=1 tells what GPU and host memory could hold; an engine with
     max_num_seqs = that many sequences is then built, and its plan's full-length sequences are the
     largest batch of this mode at this context.
  2. Decode: that many random-token prompts are prefilled together; then, from the largest batch
     down, the batch is cut to each size (requests aborted) and `--warmup-steps` untimed plus
     `--decode-tokens` timed decode steps run through `LLMEngine.step` (sampling and detokenizing
     included: what a user gets). Prompts are `context - reserve` tokens long, the reserve being
     the tokens the sweep will generate, so no sequence outgrows the planned max_model_len; the
     mean sequence length of the timed steps is reported.
  3. Prefill: a lone prompt of context - 1 tokens (time to first token), then `--prefill-seqs`
     prompts together (prefill tokens/s); their only output is the first token, so every step is
     a prefill step.
Reported per point: decode tokens/s (batch x steps / wall time), step time, prefill tokens/s, time
to first token, GPU memory, host V bytes, V bytes fetched per step and GB/s, and the roofline
(`kcache_dist.cache.decode_traffic`: max(HBM bytes / measured HBM copy bandwidth, PCIe bytes /
measured pinned H2D bandwidth), both measured at the start of the run on each rank's device).
Peer baseline: HF `AutoModelForCausalLM` built from the same config.json (random weights, same
dtype) on rank 0 after the engine runs, `generate` at the largest batch that fits (from full mode's
planned batch down on out-of-memory); a logits processor stamps every new token, so decode
tokens/s = batch x (N - 1) / (time of token N - time of token 1) and the prompt's prefill is the
time to token 1. Only rank 0 prints and writes `--out` (JSON) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kcache_dist.cache.decode_traffic import DecodeStepBytes, decode_step_bytes  # noqa: E402
from kcache_dist.config import (ALL_REDUCES, HOST_VALUES, SCORING_KEYS, EngineConfig, KCacheConfig,  # noqa: E402
                               ParallelConfig, parse_host_memory_gb)
from kcache_dist.engine.llm_engine import LLMEngine, resolve_device_type  # noqa: E402
from kcache_dist.kcache.selection import SelectionSpec  # noqa: E402
from kcache_dist.models.named_shapes import NAMED_SHAPES, write_shape_dir  # noqa: E402
from kcache_dist.parallel import (all_reduce_min, barrier, current_state, exit_on_lost_rank,  # noqa: E402
                                  init_parallel, launched_world_size, shutdown_parallel, strip_local_rank_arg)
from kcache_dist.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

from device_timing import device_copy_Bps, host_to_device_Bps  # noqa: E402
from selection_check import SelectionCheck  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("full", "kcache")
GB = 1e9
# The issue's targets (one GPU, Llama-3-8B shape, bf16, 8K and 32K context).
TARGET_KCACHE_OVER_FULL_DECODE = 1.8
TARGET_STEP_OVER_ROOFLINE = 1.15
TARGET_KCACHE_OVER_HF_DECODE = 20.0
TARGET_PREFILL_KCACHE_OVER_FULL = 0.9  # KCache prefill tokens/s within 10% of full mode's
HF_BATCH_SHRINK = 0.75  # next HF batch to try after an out-of-memory error
SLOW_STEP_FACTOR = 2.0  # a timed step this many times the median is counted as slow (a compile, a pause)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    engine_defaults, kcache_defaults = EngineConfig(), KCacheConfig()
    p = argparse.ArgumentParser(description="Decode/prefill throughput: KCache vs full-KV mode vs HF generate",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama3-8b",
                   help=f"checkpoint directory, or a named shape with random weights: {', '.join(NAMED_SHAPES)}")
    p.add_argument("--contexts", default="8192,32768", help="context lengths (tokens) = max_model_len of each plan")
    p.add_argument("--batches", default="auto",
                   help="'auto' (powers of two below the plan's largest batch, and that batch), 'max' (the "
                        "largest only) or a list such as 1,2,4 (sizes above the plan's largest are skipped)")
    p.add_argument("--modes", default="kcache,full", help="engine modes, of: full, kcache, run in this order")
    p.add_argument("--micro-batches", default="1,2",
                   help="decode micro-batch counts timed at every point on the same engine (1: the step whole; "
                        "EngineConfig.decode_micro_batches), op by op or from CUDA graphs (each count has its own)")
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per point (>= 2)")
    p.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps before each point")
    p.add_argument("--prefill-seqs", type=int, default=2, help="prompts prefilled together for prefill tokens/s")
    p.add_argument("--hf-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="HF transformers generate on the same shape (rank 0, after the engine runs)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<model>.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="float32 | float16 | bfloat16 | auto (the engine's rule)")
    p.add_argument("--gpu-memory-utilization", type=float, default=engine_defaults.gpu_memory_utilization)
    p.add_argument("--host-memory-gb", type=parse_host_memory_gb, default=engine_defaults.host_memory_gb,
                   help="GiB of host memory for each rank's V pool (KCache), or 'auto' (EngineConfig.host_memory_gb)")
    p.add_argument("--cpu-kv-cache-gb", type=float, default=engine_defaults.cpu_kv_cache_gb,
                   help="cache budget on a CPU device")
    p.add_argument("--max-num-batched-tokens", type=int, default=engine_defaults.max_num_batched_tokens)
    p.add_argument("--max-batch", type=int, default=512, help="cap on the planned batch (max_num_seqs)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="decode op by op (default: the engine's, CUDA graphs for decode steps on CUDA)")
    p.add_argument("--top-n", type=int, default=kcache_defaults.top_n)
    p.add_argument("--dense-layers", type=int, default=kcache_defaults.dense_layers)
    p.add_argument("--sink-tokens", type=int, default=kcache_defaults.sink_tokens)
    p.add_argument("--recent-window", type=int, default=kcache_defaults.recent_window)
    p.add_argument("--group-reduce", default=kcache_defaults.group_reduce, choices=["max", "sum"])
    p.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=kcache_defaults.renormalize)
    p.add_argument("--row-cache-factor", type=float, default=kcache_defaults.row_cache_factor,
                   help="KCacheConfig.row_cache_factor (default: the engine's; on CUDA 2, from a context of 16K "
                   "tokens 4); with a row cache the roofline's PCIe bytes are its misses")
    p.add_argument("--scoring-keys", default=kcache_defaults.scoring_keys, choices=list(SCORING_KEYS),
                   help="KCacheConfig.scoring_keys")
    p.add_argument("--host-values", default=kcache_defaults.host_values, choices=list(HOST_VALUES),
                   help="KCacheConfig.host_values")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="buffer of the bandwidth measurements (default 1024 on CUDA, 64 on CPU)")
    p.add_argument("--collective-timeout-s", type=float, default=600.0)
    p.add_argument("--all-reduce", default=ParallelConfig().all_reduce, choices=list(ALL_REDUCES),
                   help="ParallelConfig.all_reduce (with more than one rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-selection", action="store_true",
                   help="check every KCache selection on the host (slow: the timings then mean nothing); the "
                        "counts go to the JSON's selection_check, the first faulty row to <out>.faulty_row.pt")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="only redraw the PNGs and print the table of an earlier run's JSON (no engine, no GPU)")
    args = p.parse_args(argv)
    args.contexts = _int_list(args.contexts)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes takes {', '.join(MODES)}; got {args.modes}")
    if args.batches not in ("auto", "max"):
        args.batches = sorted(set(_int_list(args.batches)))
        if not args.batches or args.batches[0] < 1:
            p.error("--batches: give 'auto', 'max' or positive integers")
    args.micro_batches = sorted(set(_int_list(args.micro_batches)))
    if not args.micro_batches or args.micro_batches[0] < 1:
        p.error("--micro-batches: give positive integers")
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (the HF baseline times N - 1 decode steps)")
    if not args.contexts or min(args.contexts) < 2:
        p.error("--contexts: give lengths >= 2")
    return args


def kcache_knobs(args: argparse.Namespace) -> KCacheConfig:
    return KCacheConfig(mode="kcache", top_n=args.top_n, dense_layers=args.dense_layers, sink_tokens=args.sink_tokens,
                        recent_window=args.recent_window, renormalize=args.renormalize,
                        group_reduce=args.group_reduce, row_cache_factor=args.row_cache_factor,
                        scoring_keys=args.scoring_keys, host_values=args.host_values)


# ---------------------------------------------------------------------------------------------
# Output helpers: rank 0 prints, a progress bar when tqdm is there
# ---------------------------------------------------------------------------------------------

class Progress:
    """Units of work done / known so far: tqdm's bar when installed and stderr is a terminal, else
    one line per unit (logs stay readable). Silent on ranks other than 0."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.done, self.total = 0, total
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="pt", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def add_total(self, n: int) -> None:
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def advance(self, what: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_description_str(what[:60])
            self._bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {what}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------
# Model source, bandwidths, memory
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """name: the shape's name or the checkpoint directory's base name; load_format: "random" for a
    named shape (config.json and tokenizer written to a temporary directory), else "safetensors"."""

    name: str
    model_dir: str
    load_format: str


def model_source(model: str, scratch_dir: str) -> ModelSource:
    if model in NAMED_SHAPES:
        return ModelSource(model, write_shape_dir(model, os.path.join(scratch_dir, model)), "random")
    if os.path.isdir(model):
        return ModelSource(os.path.basename(os.path.normpath(model)), model, "safetensors")
    raise SystemExit(f"--model {model!r} is neither a directory nor a named shape ({', '.join(NAMED_SHAPES)})")


def measure_bandwidths(device: torch.device, num_bytes: int, reps: int = 10) -> dict:
    """HBM: device-to-device copy of num_bytes, (read + written bytes) / time. H2D: pinned host to
    device copy of num_bytes. On a CPU device both are a host memory copy (no PCIe in the path).
    Under tensor parallelism every rank measures at once (they meet at a barrier first), as their
    decode steps fetch from host memory at once: the H2D figure is a rank's share."""
    barrier()
    hbm_Bps = device_copy_Bps(device, num_bytes, reps)
    barrier()
    # on a CPU device a copy reads num_bytes once: the rate at which V rows can be read
    h2d_Bps = host_to_device_Bps(device, num_bytes, reps) if device.type == "cuda" else hbm_Bps / 2
    _free_device_memory(device)
    return {"buffer_bytes": num_bytes, "hbm_copy_GBps": hbm_Bps / GB, "h2d_GBps": h2d_Bps / GB,
            "what": ("device-to-device copy (read + written bytes) / time; pinned host-to-device copy"
                     if device.type == "cuda" else "CPU device: host memory copy for both")}


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory(device: torch.device) -> dict:
    """Device memory now: allocated by torch, peak allocated since the last reset, used on the
    device (total - free: other processes and the CUDA context included). None on a CPU."""
    if device.type != "cuda":
        return {"gpu_allocated_bytes": None, "gpu_peak_allocated_bytes": None, "gpu_used_bytes": None}
    free, total = torch.cuda.mem_get_info(device)
    return {"gpu_allocated_bytes": torch.cuda.memory_allocated(device),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device), "gpu_used_bytes": total - free}


def weight_bytes_per_decode_step(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads on this rank: every parameter, except the input embedding
    table when the LM head has its own weights (a decode step reads only the new tokens' rows)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


# ---------------------------------------------------------------------------------------------
# Engines at the planner's largest batch
# ---------------------------------------------------------------------------------------------

def engine_config(args: argparse.Namespace, source: ModelSource, mode: str, context: int, max_num_seqs: int,
                  tp: int) -> EngineConfig:
    kcache = kcache_knobs(args) if mode == "kcache" else KCacheConfig(mode="full")
    return EngineConfig(model=source.model_dir, dtype=args.dtype, device=args.device, max_model_len=context,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization, host_memory_gb=args.host_memory_gb,
                        cpu_kv_cache_gb=args.cpu_kv_cache_gb, seed=args.seed, load_format=source.load_format,
                        enforce_eager=args.enforce_eager,
                        kcache=kcache, parallel=ParallelConfig(tensor_parallel_size=tp, all_reduce=args.all_reduce,
                                                               collective_timeout_s=args.collective_timeout_s))


def release(engine: Optional[LLMEngine], device: torch.device) -> None:
    if engine is not None:
        engine.release()
    _free_device_memory(device)


def build_at_plan_max(args: argparse.Namespace, source: ModelSource, mode: str, context: int, tp: int,
                      device: torch.device) -> tuple[LLMEngine, dict]:
    """An engine whose plan holds as many max_model_len=context sequences as it can (at most
    --max-batch), and facts of the planning. Collective: every rank calls it alike. Raises
    ValueError (on every rank) when not even one sequence fits."""
    t0 = time.perf_counter()
    probe = LLMEngine(engine_config(args, source, mode, context, 1, tp))
    plan = probe.runner.cache_plan
    budget = plan.rank_budget(current_state().rank)
    fits = [n for n in (budget.num_gpu_blocks_fit, budget.num_host_blocks_fit) if n is not None]
    upper = all_reduce_min(max(1, min(args.max_batch, min(fits) // plan.blocks_per_seq)))
    release(probe, device)
    max_num_seqs, tried = upper, []
    while True:  # hot V rows and activations grow with max_num_seqs: halve if the plan refuses
        try:
            engine = LLMEngine(engine_config(args, source, mode, context, max_num_seqs, tp))
            break
        except ValueError as error:
            tried.append(max_num_seqs)
            if max_num_seqs == 1:
                raise
            logging.getLogger(__name__).warning("max_num_seqs=%d does not fit (%s); halving", max_num_seqs, error)
            max_num_seqs = max(1, max_num_seqs // 2)
        _free_device_memory(device)  # the refused engine's weights, held by the traceback until now
    plan = engine.runner.cache_plan
    facts = {"mode": mode, "context": context, "max_batch": plan.num_full_length_seqs,
             "probe_upper_bound": upper, "max_num_seqs_refused": tried, "binding": plan.binding,
             "row_cache_factor": engine.config.kcache.row_cache_factor if mode == "kcache" else 0.0,
             "num_blocks": plan.num_blocks, "block_size": plan.block_size,
             "gpu_cache_bytes": plan.gpu_cache_bytes, "hot_v_bytes": plan.hot_gpu_bytes,
             "host_v_pool_bytes": plan.host_pool_bytes, "gpu_bytes_per_token": plan.gpu_bytes_per_token,
             "host_bytes_per_token": plan.host_bytes_per_token,
             "predicted_peak_gpu_bytes": plan.predicted_peak_gpu_bytes() if device.type == "cuda" else None,
             "weight_bytes_per_decode_step": weight_bytes_per_decode_step(engine.runner.model),
             "dtype": str(engine.dtype).replace("torch.", ""), "build_s": time.perf_counter() - t0,
             "table": plan.table()}
    return engine, facts


def batch_sizes(spec: Any, max_batch: int) -> tuple[list[int], list[int]]:
    """(sizes to run, ascending; sizes skipped because the plan holds fewer sequences)."""
    if spec == "max":
        return [max_batch], []
    if spec == "auto":
        sizes, b = [], 1
        while b < max_batch:
            sizes.append(b)
            b *= 2
        return sizes + [max_batch], []
    return [b for b in spec if b <= max_batch], [b for b in spec if b > max_batch]


# ---------------------------------------------------------------------------------------------
# Measurements (on the scheduling rank)
# ---------------------------------------------------------------------------------------------

def random_prompt(generator: torch.Generator, vocab_size: int, length: int) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def decode_reserve_tokens(max_batch: int, context: int, budget_tokens: int, num_points: int,
                          tokens_per_point: int) -> int:
    """Tokens the first sequence can generate over the sweep: while the other prompts are
    prefilled (each step prefills at least budget - max_batch tokens, so at most
    ceil(max_batch x context / (budget - max_batch)) + 1 steps), then at every point."""
    fill_steps = math.ceil(max_batch * context / (budget_tokens - max_batch)) + 1
    return fill_steps + num_points * tokens_per_point + 1


def _all_decoding(engine: LLMEngine, batch: int) -> bool:
    scheduler = engine.scheduler
    return (not scheduler.waiting and len(scheduler.running) == batch
            and all(seq.num_uncomputed_tokens == 1 for seq in scheduler.running))


def _v_rows_fetched(engine: LLMEngine) -> int:
    return getattr(engine.runner.kv_cache, "v_rows_fetched", 0)


def decode_sweep(engine: LLMEngine, sizes: list[int], context: int, args: argparse.Namespace,
                 bandwidth: dict, generator: torch.Generator, device: torch.device,
                 on_point: Callable[[dict], None]) -> list[dict]:
    """Prefill max(sizes) prompts, then time decode steps at each size, largest first, and at each
    size with each of `args.micro_batches`."""
    sizes = sorted(sizes, reverse=True)
    largest, budget = sizes[0], engine.config.max_num_batched_tokens
    if budget <= largest:
        raise ValueError(f"max_num_batched_tokens={budget} must exceed the batch ({largest}) so prompts can be "
                         "prefilled while the others decode")
    tokens_per_point = args.warmup_steps + args.decode_tokens
    reserve = decode_reserve_tokens(largest, context, budget, len(sizes) * len(args.micro_batches), tokens_per_point)
    prompt_len = context - reserve
    if prompt_len < 1:
        raise ValueError(f"context {context} is too short for this sweep: it generates up to {reserve} tokens per "
                         "sequence (fewer batch sizes or decode tokens would fit)")
    # DELTA: a timed step's outputs are counted (one per sequence that got a token), not read
    params = SamplingParams(temperature=0, max_tokens=reserve, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    vocab = engine.model_config.vocab_size
    request_ids = [engine.add_request(random_prompt(generator, vocab, prompt_len), params) for _ in range(largest)]
    t0, fill_steps = time.perf_counter(), 0
    max_fill_steps = decode_reserve_tokens(largest, context, budget, 0, 0)
    while not _all_decoding(engine, largest):
        if fill_steps == max_fill_steps:
            raise RuntimeError(f"{largest} prompts were not all prefilled after {fill_steps} steps")
        engine.step()
        fill_steps += 1
    fill_s = time.perf_counter() - t0
    geometry, spec = engine.runner.cache_plan.geometry, _selection_spec(engine.config.kcache)
    weight_bytes = weight_bytes_per_decode_step(engine.runner.model)
    # a fetched far row per KV head: V (float8 with fp8 host values), or K | V with fp8 scoring keys
    bytes_per_fetched_row = geometry.host_row_bytes // geometry.num_kv_heads
    hbm_Bps, h2d_Bps = bandwidth["hbm_copy_GBps"] * GB, bandwidth["h2d_GBps"] * GB
    plan = engine.runner.cache_plan
    points = []
    for batch, micro_batches in itertools.product(sizes, args.micro_batches):
        for request_id in request_ids[batch:]:
            engine.abort_request(request_id)
        request_ids = request_ids[:batch]
        engine.decode_micro_batches = micro_batches
        first_point = batch == largest and micro_batches == args.micro_batches[0]
        for _ in range(args.warmup_steps):
            engine.step()
        preemptions_before = engine.scheduler.num_preemptions
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        rows_before = _v_rows_fetched(engine)
        step_s, step_bytes, mean_lens = [], [], []
        window_start = time.perf_counter()
        for _ in range(args.decode_tokens):
            seq_lens = [seq.num_tokens for seq in engine.scheduler.running]
            start = time.perf_counter()
            outputs = engine.step()
            step_s.append(time.perf_counter() - start)
            if len(outputs) != batch or len(seq_lens) != batch:
                raise RuntimeError(f"a timed step ran {len(outputs)} sequences, not {batch}")
            step_bytes.append(decode_step_bytes(geometry, weight_bytes, seq_lens, spec))
            mean_lens.append(statistics.fmean(seq_lens))
        _sync(device)
        window_s = time.perf_counter() - window_start
        v_bytes_per_step = (_v_rows_fetched(engine) - rows_before) * bytes_per_fetched_row / args.decode_tokens
        if engine.config.kcache.row_cache_factor:  # the far rows that crossed PCIe: the cache's misses
            step_bytes = [dataclasses.replace(b, far_v_bytes=int(v_bytes_per_step)) for b in step_bytes]
        mean_bytes = _mean_bytes(step_bytes)
        roofline_s = statistics.fmean(b.roofline_s(hbm_Bps, h2d_Bps) for b in step_bytes)
        step_mean_s = window_s / args.decode_tokens
        used_blocks = engine.block_manager.num_used_blocks
        point = {
            "mode": engine.config.kcache.mode, "context": context, "batch": batch, "micro_batches": micro_batches,
            "cuda_graphs": engine.runner.uses_cuda_graphs, "prompt_tokens": prompt_len,
            "mean_seq_len": statistics.fmean(mean_lens), "num_steps": args.decode_tokens, "window_s": window_s,
            "decode_tokens_per_s": batch * args.decode_tokens / window_s,
            "step_s_mean": step_mean_s, "step_s_median": statistics.median(step_s),
            "step_s_min": min(step_s), "step_s_max": max(step_s),
            "decode_tokens_per_s_at_median_step": batch / statistics.median(step_s),
            "slow_steps": sum(1 for t in step_s if t > SLOW_STEP_FACTOR * statistics.median(step_s)),
            **gpu_memory(device),
            "host_v_pool_bytes": plan.host_pool_bytes,
            "host_v_bytes_in_use": used_blocks * plan.block_size * plan.host_bytes_per_token,
            "v_bytes_fetched_per_step": v_bytes_per_step, "v_GBps": v_bytes_per_step / step_mean_s / GB,
            "hbm_bytes_per_step": mean_bytes.hbm_bytes, "pcie_bytes_per_step": mean_bytes.pcie_bytes,
            "bytes_per_step": dataclasses.asdict(mean_bytes),
            "roofline_step_s": roofline_s, "roofline_fraction": roofline_s / step_mean_s,
            "step_over_roofline": step_mean_s / roofline_s,
            "roofline_bound_by": mean_bytes.bound_by(hbm_Bps, h2d_Bps),
            "plan_max_batch": plan.num_full_length_seqs, "preemptions": engine.scheduler.num_preemptions
            - preemptions_before, "fill_steps": fill_steps if first_point else None,
            "fill_s": fill_s if first_point else None,
        }
        points.append(point)
        on_point(point)
    engine.decode_micro_batches = engine.config.decode_micro_batches
    for request_id in request_ids:
        engine.abort_request(request_id)
    return points


def _selection_spec(kc: KCacheConfig) -> SelectionSpec:
    return SelectionSpec(kc.top_n, kc.sink_tokens, kc.recent_window, kc.renormalize, kc.group_reduce)


def _mean_bytes(steps: list[DecodeStepBytes]) -> DecodeStepBytes:
    n = len(steps)
    return DecodeStepBytes(*(round(sum(getattr(s, f.name) for s in steps) / n)
                             for f in dataclasses.fields(DecodeStepBytes)))


def measure_prefill(engine: LLMEngine, context: int, num_seqs: int, generator: torch.Generator,
                    device: torch.device) -> dict:
    """Time to first token of a lone prompt of context - 1 tokens, then prefill tokens/s of
    num_seqs such prompts submitted together (one output token each: every step is a prefill).
    Each step's time is kept too (`ttft_step_s`, `prefill_step_s`: a long prompt's later chunks
    attend to more positions, so they take longer)."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    prompt_len, vocab = context - 1, engine.model_config.vocab_size

    def run_prompts(prompts: list[list[int]]) -> list[float]:
        """Each step's seconds, the first with the requests' submission."""
        _sync(device)
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        step_s = []
        while engine.has_unfinished_requests():
            engine.step()
            _sync(device)
            step_s.append(time.perf_counter() - t0 - sum(step_s))
        return step_s

    ttft_step_s = run_prompts([random_prompt(generator, vocab, prompt_len)])
    prefill_step_s = run_prompts([random_prompt(generator, vocab, prompt_len) for _ in range(num_seqs)])
    wall_s = sum(prefill_step_s)
    return {"prompt_tokens": prompt_len, "ttft_s": sum(ttft_step_s), "ttft_step_s": ttft_step_s,
            "prefill_seqs": num_seqs, "prefill_steps": len(prefill_step_s), "prefill_step_s": prefill_step_s,
            "prefill_wall_s": wall_s, "prefill_tokens_per_s": num_seqs * prompt_len / wall_s}


# ---------------------------------------------------------------------------------------------
# Hugging Face baseline (rank 0, after the engine runs)
# ---------------------------------------------------------------------------------------------

def hf_generate_point(model, vocab_size: int, context: int, batch: int, decode_tokens: int,
                      generator: torch.Generator, device: torch.device) -> dict:
    """One `generate` of decode_tokens new tokens after batch random prompts of context -
    decode_tokens tokens, timed at every step by a logits processor (called once per new token,
    after a device synchronize): first token at call 0, then decode_tokens - 1 decode steps."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times_s: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            self.times_s.append(time.perf_counter())
            return scores

    prompt_len = context - decode_tokens
    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)
    clock = StepClock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_tokens,
                             min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock]))
    if out.shape != (batch, prompt_len + decode_tokens) or len(clock.times_s) != decode_tokens:
        raise RuntimeError(f"HF generate returned shape {tuple(out.shape)} after {len(clock.times_s)} steps")
    first_token_s = clock.times_s[0] - t0
    decode_s = clock.times_s[-1] - clock.times_s[0]
    return {"context": context, "batch": batch, "prompt_tokens": prompt_len, "decode_tokens": decode_tokens,
            "first_token_s": first_token_s, "decode_s": decode_s,
            "decode_tokens_per_s": batch * (decode_tokens - 1) / decode_s,
            "step_s_mean": decode_s / (decode_tokens - 1),
            "prefill_tokens_per_s": batch * prompt_len / first_token_s,
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def hf_baseline(model_dir: str, dtype: torch.dtype, device: torch.device, start_batches: dict[int, int],
                decode_tokens: int, seed: int, progress: Progress) -> dict:
    """HF generate at each context, from start_batches[context] down by HF_BATCH_SHRINK on OOM."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    build_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(seed + 1)
    attn = getattr(model.config, "_attn_implementation", None)
    hf_generate_point(model, config.vocab_size, 18, 1, 2, generator, device)  # warm-up: 16 prompt tokens, 2 new
    points = []
    for context, start in start_batches.items():
        batch, refused = start, []
        while True:
            try:
                point = hf_generate_point(model, config.vocab_size, context, batch, decode_tokens, generator, device)
                point["oom_batches"] = refused
                points.append(point)
                progress.write(f"HF generate @{context}: batch {batch}, {point['decode_tokens_per_s']:.1f} decode "
                               f"tok/s, {point['prefill_tokens_per_s']:.0f} prefill tok/s"
                               + (f" (out of memory at {refused})" if refused else ""))
                break
            except torch.cuda.OutOfMemoryError:
                refused.append(batch)
                _free_device_memory(device)
                if batch == 1:
                    points.append({"context": context, "batch": None, "oom_batches": refused,
                                   "error": "out of memory at batch 1"})
                    break
                batch = min(batch - 1, int(batch * HF_BATCH_SHRINK))
        progress.advance(f"HF generate @{context}")
    del model
    _free_device_memory(device)
    return {"transformers_version": transformers.__version__, "attn_implementation": attn, "build_s": build_s,
            "points": points}


# ---------------------------------------------------------------------------------------------
# Summary, plots, table
# ---------------------------------------------------------------------------------------------

def _largest_point(points: list[dict], mode: str, context: int) -> Optional[dict]:
    """The mode's fastest point at its largest batch (over the micro-batch counts timed there)."""
    rows = [p for p in points if p["mode"] == mode and p["context"] == context]
    largest = max((p["batch"] for p in rows), default=None)
    return max((p for p in rows if p["batch"] == largest), key=lambda p: p["decode_tokens_per_s"], default=None)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summarize(points: list[dict], prefill: list[dict], hf: Optional[dict], contexts: list[int]) -> dict:
    """Per context, the issue's four comparisons at each mode's largest planned batch."""
    out = {}
    for context in contexts:
        kc, full = _largest_point(points, "kcache", context), _largest_point(points, "full", context)
        pre = {p["mode"]: p for p in prefill if p["context"] == context}
        hf_point = next((p for p in (hf or {}).get("points", []) if p["context"] == context and p.get("batch")), None)
        kc_tps = kc["decode_tokens_per_s"] if kc else None
        row = {
            "kcache_batch": kc and kc["batch"], "full_batch": full and full["batch"],
            "kcache_micro_batches": kc and kc.get("micro_batches", 1),
            "full_micro_batches": full and full.get("micro_batches", 1),
            "hf_batch": hf_point and hf_point["batch"],
            "kcache_decode_tokens_per_s": kc_tps, "full_decode_tokens_per_s": full and full["decode_tokens_per_s"],
            "hf_decode_tokens_per_s": hf_point and hf_point["decode_tokens_per_s"],
            "kcache_over_full_decode": _ratio(kc_tps, full and full["decode_tokens_per_s"]),
            "kcache_step_over_roofline": kc and kc["step_over_roofline"],
            "kcache_over_hf_decode": _ratio(kc_tps, hf_point and hf_point["decode_tokens_per_s"]),
            "prefill_kcache_over_full": _ratio(pre.get("kcache", {}).get("prefill_tokens_per_s"),
                                               pre.get("full", {}).get("prefill_tokens_per_s")),
        }
        checks = [("kcache_over_full_decode", ">=", TARGET_KCACHE_OVER_FULL_DECODE),
                  ("kcache_step_over_roofline", "<=", TARGET_STEP_OVER_ROOFLINE),
                  ("kcache_over_hf_decode", ">=", TARGET_KCACHE_OVER_HF_DECODE),
                  ("prefill_kcache_over_full", ">=", TARGET_PREFILL_KCACHE_OVER_FULL)]
        row["targets"] = {key: {"target": f"{op} {bound:g}",
                                "met": None if row[key] is None else (row[key] >= bound if op == ">=" else
                                                                      row[key] <= bound)}
                          for key, op, bound in checks}
        out[str(context)] = row
    return out


def plot(result: dict, path_prefix: str) -> list[str]:
    """Two PNGs: decode tokens/s vs batch (HF's point marked), and step time vs its roofline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, contexts = result["points"], result["args"]["contexts"]
    hf_points = [p for p in (result.get("hf_baseline") or {}).get("points", []) if p.get("batch")]
    styles = {"full": ("tab:blue", "o"), "kcache": ("tab:red", "s")}
    title = f"{result['model']['name']} {result['dtype']} on {result['device']['name']} x{result['device']['world_size']}"
    paths = []
    for kind in ("decode", "roofline"):
        fig, axes = plt.subplots(1, len(contexts), figsize=(4.6 * len(contexts), 3.8), squeeze=False)
        for ax, context in zip(axes[0], contexts):
            counts = sorted({p.get("micro_batches", 1) for p in points})
            for (mode, (color, marker)), micro_batches in itertools.product(styles.items(), counts):
                rows = sorted((p for p in points if p["mode"] == mode and p["context"] == context
                               and p.get("micro_batches", 1) == micro_batches), key=lambda p: p["batch"])
                if not rows:
                    continue
                xs = [p["batch"] for p in rows]
                name = mode if micro_batches == 1 else f"{mode}, {micro_batches} micro-batches"
                line = "-" if micro_batches == 1 else ":"
                if kind == "decode":
                    ax.plot(xs, [p["decode_tokens_per_s"] for p in rows], marker=marker, color=color, ls=line,
                            label=name)
                else:
                    ax.plot(xs, [1e3 * p["step_s_mean"] for p in rows], marker=marker, color=color, ls=line,
                            label=f"{name} step")
                    if micro_batches == 1:
                        ax.plot(xs, [1e3 * p["roofline_step_s"] for p in rows], ls="--", color=color,
                                label=f"{mode} roofline")
            if kind == "decode":
                for p in hf_points:
                    if p["context"] == context:
                        ax.plot([p["batch"]], [p["decode_tokens_per_s"]], marker="*", markersize=12, color="black",
                                ls="none", label="HF generate")
                ax.set_ylabel("decode tokens/s")
            else:
                ax.set_ylabel("decode step (ms)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch (sequences)")
            ax.set_title(f"context {context}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{title}: " + ("decode throughput" if kind == "decode" else
                                     "step time vs roofline (max of HBM and PCIe time)"))
        fig.tight_layout()
        paths.append(f"{path_prefix}_{kind}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def table(result: dict) -> str:
    lines = [f"{'mode':>6} {'ctx':>6} {'batch':>5} {'mb':>2} {'decode tok/s':>12} {'step ms':>8} {'roof ms':>8} "
             f"{'roof %':>6} {'bound':>5} {'V GB/s':>7} {'prefill tok/s':>13} {'TTFT s':>7} {'GPU GiB':>7}"]
    for p in result["points"]:
        gpu = p["gpu_used_bytes"]
        lines.append(f"{p['mode']:>6} {p['context']:>6} {p['batch']:>5} {p.get('micro_batches', 1):>2} "
                     f"{p['decode_tokens_per_s']:>12.1f} "
                     f"{1e3 * p['step_s_mean']:>8.2f} {1e3 * p['roofline_step_s']:>8.2f} "
                     f"{100 * p['roofline_fraction']:>6.1f} {p['roofline_bound_by']:>5} {p['v_GBps']:>7.2f} "
                     f"{p.get('prefill_tokens_per_s') or float('nan'):>13.0f} {p.get('ttft_s') or float('nan'):>7.3f} "
                     f"{'-' if gpu is None else f'{gpu / 2**30:.1f}':>7}")
    for p in (result.get("hf_baseline") or {}).get("points", []):
        if p.get("batch"):
            lines.append(f"{'HF':>6} {p['context']:>6} {p['batch']:>5} {'':>2} {p['decode_tokens_per_s']:>12.1f} "
                         f"{1e3 * p['step_s_mean']:>8.2f} {'':>8} {'':>6} {'':>5} {'':>7} "
                         f"{p['prefill_tokens_per_s']:>13.0f} {p['first_token_s']:>7.3f}")
    for context, row in result["summary"].items():
        parts = []
        for key, check in row["targets"].items():
            value = row[key]
            parts.append(f"{key} {'-' if value is None else f'{value:.2f}'} ({check['target']}: "
                         f"{'n/a' if check['met'] is None else 'met' if check['met'] else 'MISSED'})")
        lines.append(f"@{context}: " + "; ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def measure_mode(engine: LLMEngine, sizes: list[int], context: int, args: argparse.Namespace, bandwidth: dict,
                 generator: torch.Generator, device: torch.device, max_batch: int, what: str, progress: Progress,
                 errors: list[str]) -> tuple[list[dict], Optional[dict]]:
    """The decode sweep and the prefill measurement of one engine (on its scheduling rank). A failure
    of either is recorded in `errors` and leaves the engine empty for the other."""
    points: list[dict] = []  # filled point by point: a later failure keeps the earlier points

    def on_point(p: dict) -> None:
        points.append(p)
        progress.advance(f"{what} batch {p['batch']}")
        progress.write(f"{what} batch {p['batch']}: {p['decode_tokens_per_s']:.1f} tok/s, step "
                       f"{1e3 * p['step_s_mean']:.2f} ms ({100 * p['roofline_fraction']:.0f}% of roofline "
                       f"{1e3 * p['roofline_step_s']:.2f} ms, {p['roofline_bound_by']})"
                       + (f"; {p['slow_steps']} slow step(s), longest {1e3 * p['step_s_max']:.0f} ms"
                          if p["slow_steps"] else ""))

    def guarded(stage: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as error:  # record and go on: one point must not end the run
            errors.append(f"{what} {stage}: {type(error).__name__}: {error}")
            progress.write(f"{what} {stage}: ERROR {type(error).__name__}: {error}\n{traceback.format_exc()}")
            for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                engine.abort_request(seq.request_id)
            return None

    if sizes:
        guarded("decode", lambda: decode_sweep(engine, sizes, context, args, bandwidth, generator, device, on_point))
    pre = guarded("prefill", lambda: {"mode": engine.config.kcache.mode, "context": context,
                                      **measure_prefill(engine, context, min(args.prefill_seqs, max_batch),
                                                        generator, device)})
    if pre is not None:
        progress.advance(f"{what} prefill")
        progress.write(f"{what} prefill: {pre['prefill_tokens_per_s']:.0f} tok/s, TTFT {pre['ttft_s']:.3f} s")
    return points, pre


def run(args: argparse.Namespace, scratch_dir: str) -> Optional[dict]:
    tp = launched_world_size()
    device_type = resolve_device_type(args.device)
    source = model_source(args.model, scratch_dir)
    state = init_parallel(tp, device_type=device_type, timeout_s=args.collective_timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    is_rank0 = state.rank == 0
    explicit = isinstance(args.batches, list)
    progress = Progress(len(args.contexts) * len(args.modes) * (2 + (len(args.batches) if explicit else 1)
                                                                * len(args.micro_batches))
                        + (len(args.contexts) if args.hf_baseline else 0), enabled=is_rank0)
    bandwidth_bytes = (args.bandwidth_mib or (1024 if device.type == "cuda" else 64)) << 20
    bandwidth = measure_bandwidths(device, bandwidth_bytes)
    progress.write(f"bandwidth on {device}: HBM copy {bandwidth['hbm_copy_GBps']:.1f} GB/s, "
                   f"H2D {bandwidth['h2d_GBps']:.1f} GB/s")
    points, prefill, plans, errors = [], [], [], []
    generator = torch.Generator().manual_seed(args.seed)
    dtype = None
    t_start = time.perf_counter()
    for context in args.contexts:
        for mode in args.modes:
            what = f"{mode} @{context}"
            try:
                engine, facts = build_at_plan_max(args, source, mode, context, tp, device)
            except ValueError as error:  # raised alike on every rank: nothing fits, or a bad context
                errors.append(f"{what}: {error}")
                progress.write(f"{what}: skipped: {error}")
                progress.advance(f"{what}: skipped")
                del error
                _free_device_memory(device)
                continue
            dtype = engine.dtype
            plans.append(facts)
            progress.write(f"{what}: the plan holds {facts['max_batch']} sequences (bound by {facts['binding']})\n"
                           + facts["table"])
            progress.advance(f"{what}: planned")
            sizes, skipped = batch_sizes(args.batches, facts["max_batch"])
            if skipped:
                errors.append(f"{what}: batches {skipped} skipped: the plan holds {facts['max_batch']} sequences")
            progress.add_total((len(sizes) - (len(args.batches) if explicit else 1)) * len(args.micro_batches))
            if engine.is_scheduler:
                try:
                    mode_points, pre = measure_mode(engine, sizes, context, args, bandwidth, generator, device,
                                                    facts["max_batch"], what, progress, errors)
                finally:
                    engine.stop_workers()
                if pre is not None:
                    prefill.append(pre)
                    for p in mode_points:
                        p.update(prefill_tokens_per_s=pre["prefill_tokens_per_s"], ttft_s=pre["ttft_s"])
                points += mode_points
            else:
                engine.run_worker()
            release(engine, device)
    engine_s = time.perf_counter() - t_start
    world_size, launcher = state.world_size, state.launcher
    shutdown_parallel()  # the HF baseline runs on rank 0 alone; the other ranks are done
    if not is_rank0:
        progress.close()
        return None
    hf = None
    if args.hf_baseline and dtype is not None:
        start_batches = {}
        for context in args.contexts:
            full = _largest_point(points, "full", context)
            any_point = max((p["batch"] for p in points if p["context"] == context), default=None)
            if full or any_point:
                start_batches[context] = full["batch"] if full else any_point
        if start_batches:
            try:
                hf = hf_baseline(source.model_dir, dtype, device, start_batches, args.decode_tokens, args.seed,
                                 progress)
            except Exception as error:
                errors.append(f"HF baseline: {type(error).__name__}: {error}")
                progress.write(f"HF baseline: ERROR {error}\n{traceback.format_exc()}")
    progress.close()
    with open(os.path.join(source.model_dir, "config.json"), encoding="utf-8") as f:
        model_config = json.load(f)
    result = {
        "benchmark": "throughput",
        "model": {"name": source.name, "load_format": source.load_format, "config": model_config},
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                   or "cpu", "world_size": world_size, "tensor_parallel_size": tp, "launcher": launcher},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "plot_only")},  # no machine's paths
        # row_cache_factor None: the engine's default for the device and context, in each plan
        "kcache_config": dataclasses.asdict(kcache_knobs(args)),
        "bandwidth": bandwidth,
        "plans": plans,
        "points": points,
        "prefill": prefill,
        "hf_baseline": hf,
        "summary": summarize(points, prefill, hf, args.contexts),
        "errors": errors,
        "engine_s": engine_s,
        "total_s": time.perf_counter() - t_start,
    }
    return result


def write_plots(result: dict, out: str) -> list[str]:
    try:
        return plot(result, out.removesuffix(".json"))
    except ImportError:
        return ["no plots: matplotlib is not installed (pip install matplotlib; then --plot-only JSON)"]


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    args = parse_args(strip_local_rank_arg(sys.argv[1:] if argv is None else argv))
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            result = json.load(f)
        print(table(result), flush=True)
        print(f"wrote {', '.join(write_plots(result, args.plot_only))}", flush=True)
        return result
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check = SelectionCheck().install() if args.check_selection else None
    try:
        with tempfile.TemporaryDirectory(prefix="kcache_throughput_") as scratch_dir, exit_on_lost_rank():
            result = run(args, scratch_dir)
    finally:
        if check is not None:
            check.uninstall()
    if result is None:
        return None
    name = result["model"]["name"]
    out = args.out or os.path.join(RESULTS_DIR, f"throughput_{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if check is not None:
        result["selection_check"] = check.summary()
        print(f"selection check: {check.faulty} faulty rows of {check.rows} in {check.calls} calls", flush=True)
        if check.first_faulty is not None:
            torch.save(check.first_faulty, out.removesuffix(".json") + ".faulty_row.pt")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    pngs = write_plots(result, out)
    print(table(result), flush=True)
    if result["errors"]:
        print("errors:\n  " + "\n  ".join(result["errors"]), flush=True)
    print(f"wrote {out} and {', '.join(pngs)} ({result['total_s']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
