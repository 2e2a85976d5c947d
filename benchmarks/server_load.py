#!/usr/bin/env python3
"""Load on the real HTTP server: many concurrent streaming clients on loopback, each sending a few
greedy completion requests one after another; reports latency percentiles, throughput, and what
was lost (failed requests, wrong token counts, text unlike the offline `LLM.generate`, cache
blocks not returned, locked memory grown).

    python benchmarks/server_load.py --clients 64 --requests-per-client 4 --max-tokens 32 \
        --out benchmarks/results/server_load_cpu.json -- --device cpu --kcache-mode kcache --dense-layers 1

Flags after `--` go to `launch/serve.py` (a free 127.0.0.1 port is added); the offline reference
is built from the same flags. Without `--model` among them, the server serves the embedded default
model. `tests/test_server_reliability.py` runs `run_load` on the tiny test model.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_SCRIPT = os.path.join(ROOT, "launch", "serve.py")
sys.path.insert(0, ROOT)

BASE_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model",
    "Long contexts need a lot of memory, so the values may live in host memory while the keys stay",
]
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LoadSpec:
    """`num_clients` concurrent streaming clients, each sending `requests_per_client` requests of
    `max_tokens` greedy tokens (ignore_eos) one after another."""

    num_clients: int = 64
    requests_per_client: int = 4
    max_tokens: int = 32
    timeout_s: float = 600.0

    def prompt(self, client: int, request: int) -> str:
        """Distinct prompts of varied lengths."""
        base = BASE_PROMPTS[(client + request) % len(BASE_PROMPTS)]
        return f"{base} {client}-{request}"


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def metrics_of(base_url: str) -> dict[str, float]:
    """/metrics as {name or name{extra labels}: value}, without the model_name label."""
    import httpx

    values = {}
    for line in httpx.get(base_url + "/metrics", timeout=10.0).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")] = float(value)
    return values


def locked_memory_kib(pid: int) -> int:
    """VmLck (page-locked memory, what pinned host buffers count as) of `pid` and its children."""
    import psutil

    total = 0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))
        except (OSError, StopIteration):
            pass
    return total


def blocks_free(metrics: dict[str, float], prefix: str) -> int:
    return int(metrics[f"kcache_dist_{prefix}_total"] - metrics[f"kcache_dist_{prefix}_in_use"])


async def _client(client, model: str, spec: LoadSpec, index: int, records: list) -> None:
    import openai

    for request in range(spec.requests_per_client):
        prompt = spec.prompt(index, request)
        start = time.perf_counter()
        first_token_s = None
        text, num_tokens, error = "", None, None
        try:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=spec.max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first_token_s = first_token_s or time.perf_counter() - start
                    text += chunk.choices[0].text
                if chunk.usage:
                    num_tokens = chunk.usage.completion_tokens
        except openai.APIError as e:
            error = f"{type(e).__name__}: {e}"
        records.append({"prompt": prompt, "text": text, "num_tokens": num_tokens, "error": error,
                        "latency_s": time.perf_counter() - start, "first_token_s": first_token_s})


def run_load(base_url: str, model: str, spec: LoadSpec, offline=None, server_pid: Optional[int] = None) -> dict:
    """Drive the server at `base_url` with `spec`; `offline` (an `LLM` of the same configuration)
    gives the expected greedy texts. Returns the figures as a JSON-ready dict."""
    import openai

    before = metrics_of(base_url)
    locked_before = locked_memory_kib(server_pid) if server_pid is not None else None
    records: list[dict] = []

    async def all_clients() -> None:
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=os.environ.get("KCACHE_DIST_API_KEY", "x"),
                                      max_retries=0, timeout=REQUEST_TIMEOUT_S) as client:
            await asyncio.wait_for(asyncio.gather(*(_client(client, model, spec, i, records)
                                                    for i in range(spec.num_clients))), spec.timeout_s)

    start = time.perf_counter()
    asyncio.run(all_clients())
    wall_s = time.perf_counter() - start
    after = _wait_for_idle(base_url)
    served = [r for r in records if r["error"] is None]
    unlike_offline = 0
    if offline is not None:
        from kcache_dist import SamplingParams

        prompts = [r["prompt"] for r in served]
        outputs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True))
        unlike_offline = sum(r["text"] != out.outputs[0].text for r, out in zip(served, outputs))
    latencies = [r["latency_s"] for r in served] or [float("nan")]
    first_tokens = [r["first_token_s"] for r in served if r["first_token_s"] is not None] or [float("nan")]
    generated = sum(r["num_tokens"] or 0 for r in served)
    return {
        "clients": spec.num_clients, "requests_per_client": spec.requests_per_client, "max_tokens": spec.max_tokens,
        "requests_sent": len(records), "requests_served": len(served),
        "requests_failed": len(records) - len(served),
        "errors": sorted({r["error"] for r in records if r["error"] is not None})[:5],
        "requests_with_wrong_token_count": sum(r["num_tokens"] != spec.max_tokens for r in served),
        "requests_with_text_unlike_offline": unlike_offline if offline is not None else None,
        "wall_s": round(wall_s, 3),
        "latency_p50_s": round(percentile(latencies, 0.5), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
        "first_token_p50_s": round(percentile(first_tokens, 0.5), 4),
        "first_token_p99_s": round(percentile(first_tokens, 0.99), 4),
        "generated_tokens": generated, "throughput_tokens_per_s": round(generated / wall_s, 2),
        "requests_per_s": round(len(served) / wall_s, 3),
        "preemptions": int(after["kcache_dist_preemptions_total"] - before["kcache_dist_preemptions_total"]),
        "v_bytes_fetched": int(after["kcache_dist_v_bytes_fetched_total"] - before["kcache_dist_v_bytes_fetched_total"]),
        "device_cache_blocks_free_before": blocks_free(before, "device_cache_blocks"),
        "device_cache_blocks_free_after": blocks_free(after, "device_cache_blocks"),
        "host_v_blocks_free_before": blocks_free(before, "host_v_blocks"),
        "host_v_blocks_free_after": blocks_free(after, "host_v_blocks"),
        "pinned_host_bytes_before": int(before["kcache_dist_pinned_host_bytes"]),
        "pinned_host_bytes_after": int(after["kcache_dist_pinned_host_bytes"]),
        "locked_memory_kib_before": locked_before,
        "locked_memory_kib_after": locked_memory_kib(server_pid) if server_pid is not None else None,
    }


def _wait_for_idle(base_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """The metrics once nothing runs or waits (the last stream's abort hook may still be queued)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = metrics_of(base_url)
        idle = metrics["kcache_dist_requests_running"] == 0 and metrics["kcache_dist_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base_url: str, server: subprocess.Popen, log_path: str, timeout_s: float) -> float:
    """Seconds until GET /health answers 200. RuntimeError with the end of the server's log if the
    process exits first or `timeout_s` passes."""
    import httpx

    start = time.monotonic()
    while True:
        if server.poll() is not None or time.monotonic() - start > timeout_s:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"the server did not start; the end of its log ({log_path}):\n{tail}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _offline_llm(server_args: list[str]):
    """An `LLM` with the engine configuration the server builds from `server_args`."""
    from kcache_dist import LLM
    from kcache_dist.server.cli_args import build_parser, engine_config_from_args

    config = engine_config_from_args(build_parser().parse_args(server_args))
    return LLM(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "parallel"},
               tensor_parallel_size=config.parallel.tensor_parallel_size)


def main() -> int:
    argv = sys.argv[1:]
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own_args = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=LoadSpec.num_clients)
    parser.add_argument("--requests-per-client", type=int, default=LoadSpec.requests_per_client)
    parser.add_argument("--max-tokens", type=int, default=LoadSpec.max_tokens)
    parser.add_argument("--no-offline-check", action="store_true", help="skip the comparison with LLM.generate")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(own_args)
    spec = LoadSpec(args.clients, args.requests_per_client, args.max_tokens)
    from kcache_dist.server.cli_args import build_parser, default_served_model_name, engine_config_from_args

    model = default_served_model_name(engine_config_from_args(build_parser().parse_args(server_args)))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        server = subprocess.Popen([sys.executable, SERVE_SCRIPT, *server_args, "--port", str(port),
                                   "--disable-uvicorn-access-log"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            wait_until_healthy(base_url, server, log.name, timeout_s=300)
        except RuntimeError as error:
            raise SystemExit(str(error)) from None
        offline = None if args.no_offline_check else _offline_llm(server_args)
        report = run_load(base_url, model, spec, offline=offline, server_pid=server.pid)
    finally:
        server.terminate()
        server.wait(60)
    report = {"server_args": server_args, **report}
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    lost = report["requests_failed"] + report["requests_with_wrong_token_count"] + \
        (report["requests_with_text_unlike_offline"] or 0)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
