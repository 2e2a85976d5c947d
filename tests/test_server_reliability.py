"""The server under load, overload and memory faults: real `launch/serve.py` subprocesses on a
free 127.0.0.1 port with the tiny random Llama, talked to with the official `openai` client.

Overload: a tiny cache and batch, more concurrent requests than the queue bound — the ones beyond
it get 503 with a Retry-After header, every accepted one completes with the offline greedy text
(preempted and recomputed on the way), and the cache is empty afterwards. Load: many concurrent
streaming clients in KCache mode (`server_load.py`, also the benchmark): every request completes
with its token count and the offline greedy text, no cache block leaks. Memory fault: a host
memory budget below one sequence stops the server at start with the planner's message."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import openai

from conftest import PROMPTS
from kcache_dist import LLM, KCacheConfig, SamplingParams
from test_server import SERVE_SCRIPT, ServerProcess, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from server_load import LoadSpec, run_load  # noqa: E402

REQUEST_TIMEOUT_S = 60.0
START_TIMEOUT_S = 120.0


def cache_blocks_free(metrics: dict[str, float]) -> float:
    return metrics["kcache_dist_device_cache_blocks_total"] - metrics["kcache_dist_device_cache_blocks_in_use"]


# ---- overload ---------------------------------------------------------------------------------------
OVERLOAD_MAX_MODEL_LEN = 128
OVERLOAD_NUM_KV_BLOCKS = 12  # 192 tokens: two sequences of prompt + 64 tokens, not four
OVERLOAD_MAX_NUM_SEQS = 4
OVERLOAD_MAX_QUEUED = 8
OVERLOAD_NUM_REQUESTS = 32
OVERLOAD_MAX_TOKENS = 64


def test_overload_gets_503_with_retry_after_and_accepted_requests_complete_exactly(tiny_llama_dir, tmp_path):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(OVERLOAD_NUM_REQUESTS)]
    params = SamplingParams(temperature=0, max_tokens=OVERLOAD_MAX_TOKENS, ignore_eos=True)
    offline = LLM(device="cpu", model=tiny_llama_dir, max_model_len=OVERLOAD_MAX_MODEL_LEN)
    expected = {p: out.outputs[0].text for p, out in zip(PROMPTS, offline.generate(PROMPTS, params))}
    server = ServerProcess(["--model", tiny_llama_dir, "--device", "cpu", "--max-model-len",
                            str(OVERLOAD_MAX_MODEL_LEN), "--num-kv-blocks", str(OVERLOAD_NUM_KV_BLOCKS),
                            "--max-num-seqs", str(OVERLOAD_MAX_NUM_SEQS), "--max-queued-requests",
                            str(OVERLOAD_MAX_QUEUED), "--disable-uvicorn-access-log"],
                           str(tmp_path / "server.log")).wait_ready(START_TIMEOUT_S)
    try:
        free_before = cache_blocks_free(server.metrics())

        async def one(client: openai.AsyncOpenAI, prompt: str, stream: bool):
            try:
                if not stream:
                    reply = await client.completions.create(model=tiny_llama_dir, prompt=prompt, temperature=0,
                                                            max_tokens=OVERLOAD_MAX_TOKENS,
                                                            extra_body={"ignore_eos": True})
                    return reply.choices[0].text, reply.usage.completion_tokens
                chunks = await client.completions.create(model=tiny_llama_dir, prompt=prompt, temperature=0,
                                                         max_tokens=OVERLOAD_MAX_TOKENS, stream=True,
                                                         stream_options={"include_usage": True},
                                                         extra_body={"ignore_eos": True})
                text, usage = "", None
                async for chunk in chunks:
                    text += chunk.choices[0].text if chunk.choices else ""
                    usage = chunk.usage or usage
                return text, usage.completion_tokens
            except openai.APIStatusError as e:
                return e

        async def burst():
            async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                          timeout=REQUEST_TIMEOUT_S) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client, p, i % 2 == 1)
                                                                for i, p in enumerate(prompts))), 120)

        results = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, openai.APIStatusError)]
        served = [(p, r) for p, r in zip(prompts, results) if not isinstance(r, openai.APIStatusError)]
        print(f"\noverload: {len(served)} served, {len(refused)} refused with 503 of {len(results)}")
        assert refused, "no request was refused: the queue bound did not act"
        for error in refused:
            assert error.status_code == 503
            assert error.response.headers["Retry-After"] == "1"
            assert error.body["code"] == "server_overloaded" and error.body["type"] == "server_error"
            assert re.fullmatch(rf"the server is overloaded: \d+ requests are queued already \(at most "
                                rf"{OVERLOAD_MAX_QUEUED} may wait\); retry after 1 s", error.body["message"])
        assert len(served) >= OVERLOAD_MAX_QUEUED  # the first ones always find room in the queue
        for prompt, (text, num_tokens) in served:
            assert (text, num_tokens) == (expected[prompt], OVERLOAD_MAX_TOKENS)
        metrics = wait_until(lambda: (m := server.metrics())["kcache_dist_requests_running"] == 0 and m, 10,
                             "the batch emptied")
        assert metrics["kcache_dist_preemptions_total"] > 0  # more than the cache holds: preempted, recomputed
        assert metrics["kcache_dist_requests_waiting"] == 0
        assert metrics['kcache_dist_requests_finished_total{finish_reason="length"}'] == len(served)
        assert metrics['kcache_dist_requests_finished_total{finish_reason="abort"}'] == 0
        assert cache_blocks_free(metrics) == free_before
        # the queue is open again
        reply = asyncio.run(_one_request(server, tiny_llama_dir))
        assert reply == expected[PROMPTS[0]]
    finally:
        server.stop()


async def _one_request(server: ServerProcess, model: str) -> str:
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        reply = await client.completions.create(model=model, prompt=PROMPTS[0], temperature=0,
                                                max_tokens=OVERLOAD_MAX_TOKENS, extra_body={"ignore_eos": True})
        return reply.choices[0].text


# ---- load ---------------------------------------------------------------------------------------------
LOAD_KCACHE = KCacheConfig(mode="kcache", top_n=16, dense_layers=1, sink_tokens=4, recent_window=16)
LOAD_SPEC = LoadSpec(num_clients=64, requests_per_client=4, max_tokens=24)


def test_streaming_load_in_kcache_mode_completes_exactly_and_leaks_no_blocks(tiny_llama_dir, tmp_path):
    kcache_flags = ["--kcache-mode", "kcache", "--top-n", str(LOAD_KCACHE.top_n), "--dense-layers",
                    str(LOAD_KCACHE.dense_layers), "--sink-tokens", str(LOAD_KCACHE.sink_tokens),
                    "--recent-window", str(LOAD_KCACHE.recent_window)]
    offline = LLM(device="cpu", model=tiny_llama_dir, kcache=LOAD_KCACHE)
    server = ServerProcess(["--model", tiny_llama_dir, "--device", "cpu", *kcache_flags,
                            "--disable-uvicorn-access-log"], str(tmp_path / "server.log")).wait_ready(START_TIMEOUT_S)
    try:
        report = run_load(server.base_url, tiny_llama_dir, LOAD_SPEC, offline=offline, server_pid=server.process.pid)
    finally:
        server.stop()
    print("\nload:", report)
    assert report["requests_served"] == LOAD_SPEC.num_clients * LOAD_SPEC.requests_per_client
    assert report["requests_failed"] == 0
    assert report["requests_with_wrong_token_count"] == 0
    assert report["requests_with_text_unlike_offline"] == 0
    assert report["v_bytes_fetched"] > 0  # the sparse layer read far V rows from the host pool
    assert report["device_cache_blocks_free_after"] == report["device_cache_blocks_free_before"]
    assert report["host_v_blocks_free_after"] == report["host_v_blocks_free_before"] > 0
    assert report["locked_memory_kib_after"] == report["locked_memory_kib_before"]  # no pinned memory growth
    assert report["pinned_host_bytes_after"] == report["pinned_host_bytes_before"]
    assert report["latency_p50_s"] <= report["latency_p99_s"]
    assert report["throughput_tokens_per_s"] > 0


# ---- memory faults ------------------------------------------------------------------------------------
def test_host_memory_budget_below_one_sequence_stops_the_server_at_start(tiny_llama_dir):
    result = subprocess.run([sys.executable, SERVE_SCRIPT, "--model", tiny_llama_dir, "--device", "cpu",
                             "--kcache-mode", "kcache", "--dense-layers", "1", "--host-memory-gb", "0.000001",
                             "--port", "0"], capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"cannot start the engine: the KV cache cannot hold one sequence of max_model_len=512 \(2 "
                     r"blocks of 256 tokens\) on rank 0 \(CPU, NUMA node unknown\)\. Host memory is short by \d+ "
                     r"bytes .* No max_model_len fits: raise host_memory_gb\.", result.stderr), result.stderr
    assert "Traceback" not in result.stderr and "Uvicorn running" not in result.stderr
