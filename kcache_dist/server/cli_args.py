"""Command-line flags of the server, in vLLM's spelling, and what they turn into: an
`EngineConfig` (engine and KCache flags override a `--config` JSON file) and `ServerSettings`.
Under a launcher the tensor parallel size defaults to the number of processes it started."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import (DTYPE_ALIASES, DTYPE_NAMES, DEVICE_NAMES, GROUP_REDUCES, HOST_VALUES, KCACHE_MODES, SCORING_KEYS,
                      EngineConfig, parse_host_memory_gb)
from .body_limit import DEFAULT_MAX_REQUEST_BODY_BYTES

API_KEY_ENV_VAR = "KCACHE_DIST_API_KEY"
DEFAULT_MAX_QUEUED_REQUESTS = 1024

DESCRIPTION = """\
OpenAI-compatible HTTP server for kcache_dist.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true),
GET /v1/models, GET /health, GET /metrics (Prometheus).

Start it as one process, or as one tensor-parallel group of N processes under a launcher
(`deepspeed --num_gpus N launch/serve.py ...`, `mpirun -np N python launch/serve.py ...`):
rank 0 serves HTTP and schedules, every rank computes its slice of the heads.

Engine and KCache flags override the values of a --config file; a flag left out keeps the file's
value (or the EngineConfig default), except that under a launcher --tensor-parallel-size defaults
to the number of processes. SIGINT/SIGTERM stop accepting requests, let the ones in
flight finish, then stop every rank, which exits with status 0. A signal to the worker ranks
alone does not stop them: rank 0 does, once it has drained (a second SIGINT forces a worker out).
"""

EPILOG = """\
examples:
  python launch/serve.py                                   # the embedded SmolLM2-135M-Instruct
  python launch/serve.py --model PATH --port 8000 --api-key secret
  python launch/serve.py --config ds_configs/full_kv_gpu.json --kcache-mode kcache --top-n 256
  deepspeed --num_gpus 4 launch/serve.py --model PATH      # tensor parallel size 4; stop: SIGTERM to rank 0
  mpirun -np 2 python launch/serve.py --model PATH         # tensor parallel size 2; stop: SIGTERM to mpirun
"""

# (flag, EngineConfig field, type, help)
ENGINE_FLAGS = [
    ("--model", "model", str, "local Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct)"),
    ("--tokenizer", "tokenizer", str, "tokenizer directory (default: the model's)"),
    ("--dtype", "dtype", str, "weights and cache dtype: " + " | ".join(DTYPE_NAMES + tuple(DTYPE_ALIASES))),
    ("--device", "device", str, " | ".join(DEVICE_NAMES)),
    ("--max-model-len", "max_model_len", int, "longest sequence (prompt + output) in tokens (default: the model's)"),
    ("--max-num-seqs", "max_num_seqs", int, "most requests running at once (more wait in a queue)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one engine step"),
    ("--block-size", "block_size", int, "tokens per cache block (default: 16 in full mode, 256 in KCache mode)"),
    ("--num-kv-blocks", "num_kv_blocks", int, "fixed number of cache blocks (default: sized from memory)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float,
     "fraction of GPU memory for weights and cache (default 0.9)"),
    ("--cpu-kv-cache-gb", "cpu_kv_cache_gb", float, "cache size on a CPU device (default 4)"),
    ("--host-memory-gb", "host_memory_gb", parse_host_memory_gb, "KCache mode: GiB of host memory a rank for the V "
     "pool, or auto (default): 80%% of what the rank's NUMA node has available over the ranks on that node"),
    ("--seed", "seed", int, "seed of requests that give none (default 0)"),
    ("--decode-micro-batches", "decode_micro_batches", int, "split each decode step into N micro-batches on N CUDA "
     "streams, overlapping one's V fetch and all-reduces with another's kernels (default 1: no split)"),
    ("--load-format", "load_format", str, "safetensors: the model directory's checkpoint (default) | random: "
     "random weights of the model's shape, for benchmarks (the directory needs only config.json and a tokenizer)"),
]
TENSOR_PARALLEL_HELP = ("ranks that share the attention heads; the server runs exactly one tensor-parallel group, so "
                        "this must equal the number of processes (default: the number the launcher started, 1 "
                        "without one; under a launcher this also overrides the --config file's value)")

# (flag, KCacheConfig field, type, help)
KCACHE_FLAGS = [
    ("--kcache-mode", "mode", str, "full: K and V in device memory (default) | kcache: V of sparse layers in host memory"),
    ("--top-n", "top_n", int, "far positions attended per KV head each decode step (default 1024)"),
    ("--dense-layers", "dense_layers", int, "first layers that keep dense attention (default 8)"),
    ("--sink-tokens", "sink_tokens", int, "first tokens always attended (default 4)"),
    ("--recent-window", "recent_window", int, "last tokens always attended (default 128)"),
    ("--group-reduce", "group_reduce", str, "GQA selection from the " + " | ".join(GROUP_REDUCES)
     + " of the query heads' probabilities (default max)"),
    ("--row-cache-factor", "row_cache_factor", float, "keep the ceil(F x top_n) far V rows picked most recently "
     "per sequence, sparse layer and KV head in device memory and fetch only the other picks (default on CUDA 2, "
     "from --max-model-len 16384 up 4; 0 on CPU; 0: none)"),
    ("--scoring-keys", "scoring_keys", str, "K that picks the far positions: model (default) | fp8 (K in device "
     "memory as float8, the exact K beside V in host memory)"),
    ("--host-values", "host_values", str, "how host memory keeps the V of sparse layers: model (default) | fp8 "
     "(float8 with a scale per row on the device: half the bytes of host memory and of each fetched row)"),
]
_CHOICES = {"dtype": list(DTYPE_NAMES + tuple(DTYPE_ALIASES)), "device": list(DEVICE_NAMES),
            "mode": list(KCACHE_MODES), "group_reduce": list(GROUP_REDUCES), "scoring_keys": list(SCORING_KEYS),
            "host_values": list(HOST_VALUES)}


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP side runs. `served_model_names[0]` is the name /v1/models reports; requests may
    use any of them."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ("SmolLM2-135M-Instruct",)
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    shutdown_timeout_s: Optional[float] = None
    uvicorn_log_level: str = "info"
    access_log: bool = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/serve.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    engine = parser.add_argument_group("model and engine")
    engine.add_argument("--config", default=None, metavar="ds_configs/FILE.json",
                        help="engine configuration file (its keys mirror EngineConfig)")
    for flag, name, kind, help_text in ENGINE_FLAGS:
        engine.add_argument(flag, dest=name, type=kind, default=None, choices=_CHOICES.get(name), help=help_text)
    engine.add_argument("--enforce-eager", dest="enforce_eager", action=argparse.BooleanOptionalAction, default=None,
                        help="run every step op by op (default: on CUDA, decode steps replay CUDA graphs)")
    engine.add_argument("--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=int, default=None,
                        metavar="N", help=TENSOR_PARALLEL_HELP)
    kcache = parser.add_argument_group("KCache attention")
    for flag, name, kind, help_text in KCACHE_FLAGS:
        kcache.add_argument(flag, dest="kcache_" + name, type=kind, default=None, choices=_CHOICES.get(name),
                            metavar=None if name in _CHOICES else name.upper(),
                            help=help_text)
    kcache.add_argument("--renormalize", dest="kcache_renormalize",
                        action=argparse.BooleanOptionalAction, default=None,
                        help="divide by the selected probability mass (default) or, with --no-renormalize, "
                             "by the full softmax sum")
    http = parser.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    http.add_argument("--api-key", action="append", default=None,
                      help=f"require 'Authorization: Bearer KEY' on /v1/ routes (repeatable; default: "
                           f"${API_KEY_ENV_VAR} if set, else no key)")
    http.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                      help="model name(s) clients use; the first is reported by /v1/models "
                           "(default: the --model value, or SmolLM2-135M-Instruct)")
    http.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                      help=f"larger request bodies get HTTP 413 (default {DEFAULT_MAX_REQUEST_BODY_BYTES})")
    http.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS, metavar="N",
                      help="most requests that may wait for a batch slot (beyond the --max-num-seqs running); "
                           "a request arriving when N wait gets HTTP 503 with a Retry-After header "
                           f"(default {DEFAULT_MAX_QUEUED_REQUESTS})")
    http.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                      help="on SIGINT/SIGTERM, abort requests still running after this long (default: wait "
                           "for all of them)")
    http.add_argument("--uvicorn-log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"])
    http.add_argument("--disable-uvicorn-access-log", action="store_true", help="do not log every HTTP request")
    return parser


def serving_tensor_parallel_size(flag_value: Optional[int], config_value: int, num_processes: int) -> int:
    """The server's tensor parallel size: the flag, else under a launcher the number of processes,
    else the config's. ValueError unless it makes exactly one tensor-parallel group of the job."""
    if flag_value is not None:
        if flag_value < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {flag_value}")
        tp = flag_value
    else:
        tp = num_processes if num_processes > 1 else config_value
    if num_processes > 1 and tp != num_processes:
        replicas = f" ({num_processes // tp} data-parallel replicas)" if tp < num_processes and \
            num_processes % tp == 0 else ""
        raise ValueError(f"tensor parallel size {tp} does not fit this job of {num_processes} processes{replicas}: "
                         f"the server runs one tensor-parallel group behind one HTTP front end (data parallel size "
                         f"1), so the tensor parallel size must be {num_processes}; leave out "
                         f"--tensor-parallel-size (it defaults to the number of processes) or start "
                         f"{tp} process{'es' if tp > 1 else ''}")
    return tp


def engine_config_from_args(args: argparse.Namespace, num_processes: int = 1) -> EngineConfig:
    """The --config file (or the defaults) with every given flag applied, for a job of
    `num_processes` (see `serving_tensor_parallel_size`); ValueError names a bad value."""
    base = EngineConfig.from_json(args.config) if args.config is not None else EngineConfig()
    overrides = {name: getattr(args, name) for name in [name for _, name, _, _ in ENGINE_FLAGS] + ["enforce_eager"]
                 if getattr(args, name) is not None}
    kcache_names = [name for _, name, _, _ in KCACHE_FLAGS] + ["renormalize"]
    kcache_overrides = {name: getattr(args, "kcache_" + name) for name in kcache_names
                        if getattr(args, "kcache_" + name) is not None}
    if kcache_overrides:
        overrides["kcache"] = dataclasses.replace(base.kcache, **kcache_overrides)
    tp = serving_tensor_parallel_size(args.tensor_parallel_size, base.parallel.tensor_parallel_size, num_processes)
    if tp != base.parallel.tensor_parallel_size:
        overrides["parallel"] = dataclasses.replace(base.parallel, tensor_parallel_size=tp)
    return dataclasses.replace(base, **overrides)


def default_served_model_name(config: EngineConfig) -> str:
    """The --model value as given (as vLLM does), or the embedded model's name."""
    if config.model is not None:
        return config.model
    from ..default_model import GGUF_FILE_NAME

    return Path(GGUF_FILE_NAME).name.split(".", 1)[0]  # "SmolLM2-135M-Instruct"


def server_settings_from_args(args: argparse.Namespace, config: EngineConfig) -> ServerSettings:
    api_keys = args.api_key or ([os.environ[API_KEY_ENV_VAR]] if os.environ.get(API_KEY_ENV_VAR) else [])
    if any(not key for key in api_keys):
        raise ValueError("--api-key must not be empty")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    if args.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    return ServerSettings(
        host=args.host, port=args.port, api_keys=tuple(api_keys),
        served_model_names=tuple(args.served_model_name or [default_served_model_name(config)]),
        max_request_body_bytes=args.max_request_body_bytes, max_queued_requests=args.max_queued_requests,
        shutdown_timeout_s=args.shutdown_timeout,
        uvicorn_log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log)
