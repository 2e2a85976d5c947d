#!/usr/bin/env python3
"""The multi-GPU checks in one script, on a Llama-3-8B-shaped model with random weights (the same
weights at every tensor-parallel size, `models/random_weights.py`):

    python benchmarks/multi_gpu.py --tp 1,2,4 --parts greedy,serve,profile --out-dir benchmarks/results/multi_gpu
    python benchmarks/multi_gpu.py --tp 1,2,4 --parts throughput --contexts 8192 --out-dir ...

Parts (each writes JSON into --out-dir; a summary goes to multi_gpu_tp<sizes>_<parts>.json, rewritten
after every part; N runs over the --tp sizes, 1 meaning one process on one GPU, the largest is M):
  greedy      TP=1 (`python`) and each TP=N>1 (`deepspeed --num_gpus N`) greedy tokens of the same
              token-id prompts, full and KCache mode, and at N>1 on CUDA KCache mode with the
              two-shot all-reduce (`ParallelConfig.all_reduce="two_shot"`), each against TP=1
              (float32, so that a different summation order of the row-parallel all-reduce does
              not flip near-tied random logits); every rank of
              the KCache run at TP=M reports its GPU's NUMA node and where its V pool's pages are
              (move_pages over a sample of pages).
  serve       `deepspeed --num_gpus M launch/serve.py` (KCache mode) answers a completion whose text
              must equal the TP=1 greedy text of the same prompt; SIGTERM to rank 0 (the DeepSpeed
              launcher does not pass it on) then stops every rank, and the launcher exits.
  profile     `benchmarks/profile_decode.py` at the first context under each `mpirun -np N` (N=1:
              one process on one GPU; same batch): device time per step, the NCCL all-reduces
              included, whole and in micro-batches, op by op and as CUDA graphs, also with the
              two-shot all-reduce (--two-shot-all-reduce), and what the all-reduces cost a step
              with and without the overlap or the two-shot kernel (the steps timed without them).
  throughput  `benchmarks/throughput.py` under each `mpirun -np N` (N=1: one process on one GPU) at
              each context, each mode at its planned largest batch (at most --max-batch-per-gpu
              x N), whole and in --micro-batches:
              total and per-GPU decode tokens/s; TP scaling against the TP=1 result in --out-dir
              (so the sizes can be run in separate calls: --tp 1,2 then --tp 4; a result of another
              card or other settings is not divided by it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kcache_dist.config import ALL_REDUCES, HOST_VALUES, KCacheConfig, parse_host_memory_gb  # noqa: E402
from kcache_dist.parallel.launcher import mpirun_flags  # noqa: E402

from server_load import free_port, wait_until_healthy  # noqa: E402

DEFAULT_SHAPE = "llama3-8b"
GREEDY_TOKENS = 24
PROMPT_LENGTHS = [1500, 700, 64]  # KCache (top_n 1024) selects in the first prompt's sparse layers
MAX_MODEL_LEN = 2048
SERVE_START_TIMEOUT_S = 600
MODES = ("full", "kcache")
GREEDY_RUNS = [("full", "nccl"), ("kcache", "nccl"), ("kcache", "two_shot")]  # (mode, ParallelConfig.all_reduce)


def prompts(vocab_size: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(vocab_size // 8, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ---- the greedy job (runs on every rank of a launched job) -----------------------------------
def greedy_job(model_dir: str, out_path: str) -> None:
    import torch

    from kcache_dist import LLM, KCacheConfig, SamplingParams
    from kcache_dist.cache.numa import gpu_numa_node, pages_per_node
    from kcache_dist.config import ParallelConfig
    from kcache_dist.parallel import current_state, launched_world_size

    tp = launched_world_size()
    result = {"tp": tp, "modes": {}}
    for mode, all_reduce in GREEDY_RUNS:
        if all_reduce == "two_shot" and (tp == 1 or not torch.cuda.is_available()):
            continue  # nothing to sum, or no symmetric memory
        llm = LLM(model=model_dir, load_format="random", dtype="float32", tensor_parallel_size=tp,
                  parallel=ParallelConfig(all_reduce=all_reduce), max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
                  kcache=KCacheConfig(mode=mode))
        state = current_state()
        outputs = llm.generate(prompts(llm.engine.model_config.vocab_size),
                               SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
        run = mode if all_reduce == "nccl" else f"{mode}_{all_reduce}"
        result["modes"][run] = {"token_ids": [o.outputs[0].token_ids for o in outputs],
                                "texts": [o.outputs[0].text for o in outputs]}
        pool = getattr(llm.engine.runner.kv_cache, "host_pool", None)
        if pool is not None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            placement = {"rank": state.rank, "cuda_device": device,
                         "gpu_numa_node": gpu_numa_node(device) if device is not None else None,
                         "pool_bound_to_node": pool.numa_node, "pool_bytes": pool.num_bytes, "pinned": pool.pinned,
                         "pages_per_node": pages_per_node(pool.address, pool.num_bytes, sample_pages=256)}
            with open(f"{out_path}.rank{state.rank}.numa.json", "w") as f:
                json.dump(placement, f)
            print(f"rank {state.rank}: GPU {device} on NUMA node {placement['gpu_numa_node']}; V pool "
                  f"{pool.num_bytes / 2**30:.2f} GiB bound to node {pool.numa_node}, sampled pages per node "
                  f"{placement['pages_per_node']}", flush=True)
        llm.engine.release()
        del llm
    if current_state().rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


# ---- the parts (run by the orchestrating process) --------------------------------------------
def _env(**extra: str) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def shown_command(cmd: list[str], out_dir: str) -> str:
    """cmd as a result keeps it, with no machine's paths: the interpreter as `python`, paths under
    out_dir relative to it, paths in the repository relative to its root, other absolute paths (a
    temporary model directory) by their last component."""
    def shown(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        for base in (os.path.abspath(out_dir), ROOT):
            if arg.startswith(base + os.sep):
                return os.path.relpath(arg, base)
        return os.path.basename(arg) if os.path.isabs(arg) else arg

    return " ".join(shown(arg) for arg in cmd)


def _run(cmd: list[str], log_path: str, timeout_s: float, env: dict) -> dict:
    """Run cmd (in the repository root, output to log_path, which lies in the results folder)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=ROOT)
    with open(log_path) as f:
        tail = f.read()[-3000:]
    print(f"$ {' '.join(cmd)}\n  -> exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        print(tail, flush=True)
    return {"cmd": shown_command(cmd, os.path.dirname(log_path)), "exit_code": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1)}


def first_difference(a: list[list[int]], b: list[list[int]]) -> list:
    """Per prompt: None if equal, else the first index where the token ids differ."""
    out = []
    for x, y in zip(a, b):
        diff = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None)
        out.append(diff if diff is not None or len(x) == len(y) else min(len(x), len(y)))
    return out


def part_greedy(args, model_dir: str) -> dict:
    out = {}
    for tp in sorted({1, *args.tps}):
        path = os.path.join(args.out_dir, f"greedy_tp{tp}.json")
        script = [os.path.abspath(__file__), "--greedy-job", model_dir, path]
        cmd = [sys.executable, *script] if tp == 1 else ["deepspeed", "--num_gpus", str(tp), *script]
        out[f"tp{tp}_run"] = _run(cmd, path + ".log", 1200, _env())
    with open(os.path.join(args.out_dir, "greedy_tp1.json")) as f:
        one = json.load(f)
    for tp in [t for t in args.tps if t > 1]:
        with open(os.path.join(args.out_dir, f"greedy_tp{tp}.json")) as f:
            many = json.load(f)
        for run, tokens in many["modes"].items():  # two-shot runs against TP=1 of their mode
            a, b = one["modes"][run.removesuffix("_two_shot")]["token_ids"], tokens["token_ids"]
            out[f"tp{tp}_{run}"] = {"equal": a == b, "first_difference_per_prompt": first_difference(a, b)}
    numa = []
    for rank in range(args.tp):
        with open(os.path.join(args.out_dir, f"greedy_tp{args.tp}.json.rank{rank}.numa.json")) as f:
            numa.append(json.load(f))
    out["numa_per_rank"] = numa
    out["tp1_kcache_texts"] = one["modes"]["kcache"]["texts"]
    return out


def part_serve(args, model_dir: str, expected: dict) -> dict:
    import httpx

    from kcache_dist.models.named_shapes import shape_config

    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(args.tp), os.path.join(ROOT, "launch", "serve.py"), "--model", model_dir,
           "--load-format", "random", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", "8", "--kcache-mode", "kcache", "--port", str(port), "--disable-uvicorn-access-log"]
    log_path = os.path.join(args.out_dir, f"serve_tp{args.tp}.log")
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                              start_new_session=True)
    result = {"cmd": shown_command(cmd, args.out_dir)}
    try:
        base = f"http://127.0.0.1:{port}"
        result["start_s"] = round(wait_until_healthy(base, server, log_path, SERVE_START_TIMEOUT_S), 1)
        prompt = prompts(shape_config(args.shape)["vocab_size"])[0]
        response = httpx.post(base + "/v1/completions", timeout=300.0,
                              json={"model": model_dir, "prompt": prompt, "max_tokens": GREEDY_TOKENS,
                                    "temperature": 0, "ignore_eos": True})
        result["status_code"] = response.status_code
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else response.text
        result["text_equals_tp1_greedy"] = text == expected["tp1_kcache_texts"][0]
    finally:
        import psutil

        t0 = time.monotonic()
        rank0 = [c for c in psutil.Process(server.pid).children(recursive=True) if "--local_rank=0" in c.cmdline()]
        for process in rank0 or [psutil.Process(server.pid)]:
            process.send_signal(signal.SIGTERM)
        try:
            result["exit_code_after_sigterm"] = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            result["exit_code_after_sigterm"] = "killed after 120 s"
        result["stop_s"] = round(time.monotonic() - t0, 1)
        log.close()
    print(f"serve: {result}", flush=True)
    return result


def part_profile(args) -> dict:
    context, out = args.contexts[0], {}
    for tp in args.tps:
        path = os.path.join(args.out_dir, f"profile_tp{tp}_{context}.json")
        script = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_decode.py"), "--context", str(context),
                  "--batch", args.profile_batch, "--steps", "3", "--rows", "12", "--host-memory-gb",
                  str(args.host_memory_gb), "--two-shot-all-reduce", *_kcache_flags(args),
                  "--out", path]
        cmd = script if tp == 1 else ["mpirun", *mpirun_flags(), "-np", str(tp), *script]
        env = _env(CUDA_VISIBLE_DEVICES="0") if tp == 1 else _env()
        out[f"tp{tp}"] = {"run": _run(cmd, path + ".log", 900, env), "json": os.path.basename(path)}
        if out[f"tp{tp}"]["run"]["exit_code"] == 0:
            with open(path) as f:
                out[f"tp{tp}"]["steps"] = [{k: v for k, v in r.items() if k.endswith("device_ms_median")
                                            or k.startswith("all_reduce") or k in ("mode", "batch")}
                                           for r in json.load(f)["results"]]
    return out


def _kcache_flags(args) -> list[str]:
    """The KCacheConfig flags that profile_decode.py and throughput.py take from this script's."""
    row_cache = [] if args.row_cache_factor is None else ["--row-cache-factor", str(args.row_cache_factor)]
    return [*row_cache, "--host-values", args.host_values]


def part_throughput(args) -> dict:
    runs = {}
    common = ["--model", args.shape, "--dtype", "bfloat16", "--batches", "max", "--decode-tokens", "8",
              "--warmup-steps", "2", "--prefill-seqs", "1", "--no-hf-baseline", "--host-memory-gb",
              str(args.host_memory_gb), "--micro-batches", args.micro_batches, "--modes", args.modes,
              "--all-reduce", args.all_reduce, *_kcache_flags(args),
              *({True: ["--enforce-eager"], False: ["--no-enforce-eager"]}.get(args.enforce_eager, []))]
    for context in args.contexts:
        for tp in args.tps:
            path = os.path.join(args.out_dir, f"throughput_tp{tp}_{context}.json")
            script = [os.path.join(ROOT, "benchmarks", "throughput.py"), "--contexts", str(context), *common,
                      "--max-batch", str(args.max_batch_per_gpu * tp), "--out", path]
            cmd = [sys.executable, *script] if tp == 1 else ["mpirun", *mpirun_flags(), "-np", str(tp), sys.executable,
                                                             *script]
            env = _env(CUDA_VISIBLE_DEVICES="0") if tp == 1 else _env()
            runs[f"tp{tp}_{context}"] = _run(cmd, path + ".log", 1200, env)
            if runs[f"tp{tp}_{context}"]["exit_code"] == 0:
                with open(path) as f:
                    points = json.load(f)["points"]
                runs[f"tp{tp}_{context}"]["points"] = [
                    {"mode": p["mode"], "batch": p["batch"], "micro_batches": p["micro_batches"],
                     "decode_tokens_per_s": p["decode_tokens_per_s"],
                     "per_gpu_decode_tokens_per_s": p["decode_tokens_per_s"] / tp, "step_s_median": p["step_s_median"]}
                    for p in points]
    runs["scaling"] = tp_scaling(args.out_dir, args.contexts)
    return runs


SCALING_SETUP_ARGS = ("model", "dtype", "host_memory_gb", "all_reduce", "enforce_eager", "top_n", "dense_layers",
                      "sink_tokens", "recent_window", "group_reduce", "renormalize", "row_cache_factor",
                      "scoring_keys", "host_values", "decode_tokens")


def _setup(result: dict) -> dict:
    """What must match for two throughput.py results to be compared: the card and the settings."""
    args = result.get("args", {})
    return {"device": result.get("device", {}).get("name"), **{k: args.get(k) for k in SCALING_SETUP_ARGS}}


def tp_scaling(out_dir: str, contexts: list[int]) -> list[dict]:
    """Per context, mode and TP size found in `out_dir`: the fastest decode tokens/s at the largest
    batch, per GPU, against TP=1, and KCache over full at that size. A result whose card or settings
    differ from TP=1's (e.g. a file left from another run) is not divided by it: `over_tp1` is None
    and `setup_differs_from_tp1` names what differs."""
    rows = []
    for context in contexts:
        best, setups = {}, {}  # (tp, mode) -> point; tp -> _setup
        for name in os.listdir(out_dir):
            prefix, suffix = "throughput_tp", f"_{context}.json"
            if not (name.startswith(prefix) and name.endswith(suffix)):
                continue
            tp = int(name[len(prefix):-len(suffix)])
            with open(os.path.join(out_dir, name)) as f:
                result = json.load(f)
            setups[tp] = _setup(result)
            for mode in MODES:
                mine = [p for p in result["points"] if p["mode"] == mode]
                if mine:
                    top = max(p["batch"] for p in mine)
                    best[tp, mode] = max((p for p in mine if p["batch"] == top), key=lambda p: p["decode_tokens_per_s"])
        for (tp, mode), p in sorted(best.items()):
            one = best.get((1, mode))
            full = best.get((tp, "full"))
            differs = sorted(k for k, v in setups[tp].items() if 1 in setups and setups[1][k] != v)
            comparable = one is not None and not differs
            rows.append({"context": context, "tp": tp, "mode": mode, "batch": p["batch"],
                         "micro_batches": p["micro_batches"], "decode_tokens_per_s": p["decode_tokens_per_s"],
                         "per_gpu_decode_tokens_per_s": p["decode_tokens_per_s"] / tp,
                         "over_tp1": p["decode_tokens_per_s"] / one["decode_tokens_per_s"] if comparable else None,
                         "setup_differs_from_tp1": differs,
                         "kcache_over_full": (p["decode_tokens_per_s"] / full["decode_tokens_per_s"]
                                              if mode == "kcache" and full else None)})
    return rows


def main() -> None:
    from kcache_dist.parallel import exit_on_lost_rank, strip_local_rank_arg

    argv = strip_local_rank_arg(sys.argv[1:])
    if argv and argv[0] == "--greedy-job":
        with exit_on_lost_rank():
            greedy_job(argv[1], argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", default="2", help="tensor-parallel sizes, e.g. 2,4 (each compared with TP=1)")
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="named shape (tiny-llama for a CPU smoke run)")
    p.add_argument("--parts", default="greedy,serve,profile,throughput")
    p.add_argument("--contexts", default="8192")
    p.add_argument("--profile-batch", default="full=64,kcache=64", help="profile_decode.py --batch")
    p.add_argument("--host-memory-gb", type=parse_host_memory_gb, default="auto",
                   help="per rank, for the profile and throughput runs, or 'auto' (EngineConfig.host_memory_gb)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="throughput.py --enforce-eager (no CUDA graphs); default: the engine's, CUDA graphs")
    p.add_argument("--micro-batches", default="1,2", help="throughput.py --micro-batches")
    p.add_argument("--max-batch-per-gpu", type=int, default=512,
                   help="throughput.py --max-batch is this times the TP size, so the cap grows with the memory")
    p.add_argument("--modes", default="kcache,full", help="throughput.py --modes")
    p.add_argument("--all-reduce", default="nccl", choices=list(ALL_REDUCES), help="throughput.py --all-reduce")
    p.add_argument("--row-cache-factor", type=float, default=None,
                   help="KCacheConfig.row_cache_factor of the profile and throughput runs (default: the engine's)")
    p.add_argument("--host-values", default=KCacheConfig().host_values, choices=list(HOST_VALUES),
                   help="KCacheConfig.host_values of the profile and throughput runs")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "multi_gpu"))
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    parts = args.parts.split(",")
    args.tps = sorted({int(t) for t in args.tp.split(",")})
    if args.tps[0] < 1:
        p.error("--tp: give tensor-parallel sizes of at least 1, e.g. 1,2,4")
    args.tp = max(args.tps)
    if args.tp == 1 and {"greedy", "serve"} & set(parts):
        p.error("--tp: the greedy and serve parts need a size above 1, e.g. 1,2,4")
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    from kcache_dist.models.named_shapes import write_shape_dir

    summary = {"tp": args.tps, "shape": args.shape,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "parts": {}}
    out = os.path.join(args.out_dir, f"multi_gpu_tp{'-'.join(map(str, args.tps))}_{'_'.join(parts)}.json")
    with tempfile.TemporaryDirectory(prefix="kcache_multi_gpu_") as scratch:
        model_dir = write_shape_dir(args.shape, os.path.join(scratch, args.shape))
        for part in parts:
            try:
                if part == "greedy":
                    summary["parts"]["greedy"] = part_greedy(args, model_dir)
                elif part == "serve":
                    summary["parts"]["serve"] = part_serve(args, model_dir, summary["parts"]["greedy"])
                elif part == "profile":
                    summary["parts"]["profile"] = part_profile(args)
                elif part == "throughput":
                    summary["parts"]["throughput"] = part_throughput(args)
                else:
                    raise SystemExit(f"unknown part {part!r}")
            except Exception as error:  # a failed part is reported; the others still run
                summary["parts"][part] = {"error": f"{type(error).__name__}: {error}"}
            print(json.dumps({part: summary["parts"][part]}, indent=1)[:4000], flush=True)
            with open(out, "w") as f:  # after every part, so that a run cut short keeps what it did
                json.dump(summary, f, indent=1)
    print(f"wrote {out}", flush=True)
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "topo", "-m"], check=False)


if __name__ == "__main__":
    main()
