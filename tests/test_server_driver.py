"""The server's pieces in one process, without HTTP: the engine driver (concurrent submits, errors,
abort, shutdown), the stop-string hold-back of streamed text, and /metrics in KCache mode."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from conftest import PROMPTS
from kcache_dist import LLM, CompletionOutput, KCacheConfig, RequestOutput, RequestOutputKind, SamplingParams
from kcache_dist.engine.detokenizer import StreamedText, held_back_length
from kcache_dist.server.engine_driver import EngineDriver, RequestStream, ServerDraining
from kcache_dist.server.metrics import render_prometheus

TIMEOUT_S = 60


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


# ---- streamed text ----------------------------------------------------------------------------------
def test_held_back_length():
    assert held_back_length("hello wor", ["world"]) == 3
    assert held_back_length("hello", ["xyz"]) == 0
    assert held_back_length("ab", ["b!", "abc"]) == 2  # the longest candidate wins
    assert held_back_length("abc", ["c"]) == 0  # a one-character stop is never a proper prefix
    assert held_back_length("", ["abc"]) == 0 and held_back_length("abc", [""]) == 0


def test_held_back_length_equals_trying_every_prefix():
    """The hold-back compares only prefixes that end in the text's last character; it must give what
    trying every prefix of every stop string gives (random texts over a small alphabet, so that
    partial matches abound; fresh each run)."""
    def every_prefix(text, stops):
        return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
                   default=0)

    rng = random.Random()
    for _ in range(5000):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 10)))
        stops = ["".join(rng.choice("ab ") for _ in range(rng.randint(0, 7))) for _ in range(rng.randint(0, 3))]
        assert held_back_length(text, stops) == every_prefix(text, stops), (text, stops)


def test_streamed_pieces_add_up_to_the_cut_text():
    """Cumulative texts as the engine reports them; the stop string "END" is cut at the end."""
    cumulative = ["Hel", "Hello E", "Hello EN", "Hello ENx", "Hello ENx E", "Hello ENx "]
    tracker = StreamedText(["END"])
    pieces = [tracker.next_piece(t, finished=False) for t in cumulative[:-1]]
    pieces.append(tracker.next_piece(cumulative[-1], finished=True))
    assert pieces == ["Hel", "lo ", "", "ENx", " ", ""]
    assert "".join(pieces) == cumulative[-1]


def test_request_stream_joins_delta_outputs_that_piled_up():
    def delta(text: str, token: int, finish_reason=None) -> RequestOutput:
        return RequestOutput("r", "Hi", [7], [CompletionOutput(0, text, [token], finish_reason)],
                             finished=finish_reason is not None)

    async def scenario():
        queue = asyncio.Queue()
        stream = RequestStream("r", queue, driver=None, output_kind=RequestOutputKind.DELTA)
        queue.put_nowait(delta("He", 1))
        queue.put_nowait(delta("llo", 2))
        first = await stream.__anext__()
        assert (first.outputs[0].text, first.outputs[0].token_ids, stream.num_output_tokens) == ("Hello", [1, 2], 2)
        queue.put_nowait(delta(" you", 3))
        queue.put_nowait(delta("", 4, "stop"))
        last = await stream.__anext__()
        assert (last.outputs[0].text, last.outputs[0].token_ids, last.finished) == (" you", [3, 4], True)
        assert last.outputs[0].finish_reason == "stop" and stream.num_output_tokens == 4 and stream.finished

    run(scenario())


# ---- the driver -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kcache_llm(tiny_llama_dir) -> LLM:
    small = KCacheConfig(mode="kcache", top_n=4, dense_layers=1, sink_tokens=2, recent_window=4)
    return LLM(device="cpu", model=tiny_llama_dir, kcache=small)


def test_driver_batches_concurrent_requests_and_reports_kcache_metrics(kcache_llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].text for o in kcache_llm.generate(PROMPTS, params)]
    engine = kcache_llm.engine
    fetched_before = engine.runner.kv_cache.v_rows_fetched
    driver = EngineDriver(engine).start()

    async def one(i: int, prompt: str) -> str:
        stream = await driver.submit(prompt, params, f"r{i}")
        return (await stream.final_output()).outputs[0].text

    async def all_requests():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        assert run(all_requests()) == expected
    finally:
        assert driver.shutdown(timeout_s=TIMEOUT_S)
    stats = driver.stats()
    assert stats.kcache_mode == "kcache"
    assert stats.num_generation_tokens_total == 24 * len(PROMPTS)
    assert stats.num_finished_total == {"length": len(PROMPTS)}
    assert stats.host_v_blocks_total == stats.device_cache_blocks_total > 0
    assert stats.host_v_blocks_in_use == stats.device_cache_blocks_in_use == 0
    rows = engine.runner.kv_cache.v_rows_fetched - fetched_before
    assert rows > 0
    v_row_bytes = engine.model_config.head_dim * engine.dtype.itemsize  # V rows of the model's dtype here
    assert stats.v_bytes_fetched_total == engine.runner.kv_cache.v_rows_fetched * v_row_bytes
    text = render_prometheus(stats, "tiny")
    assert f'kcache_dist_v_bytes_fetched_total{{model_name="tiny"}} {stats.v_bytes_fetched_total}' in text
    assert 'kcache_dist_cache_mode_info{model_name="tiny",kcache_mode="kcache"} 1' in text


def test_driver_delta_requests_as_the_server_submits_them(kcache_llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = kcache_llm.generate(PROMPTS, params)
    delta = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    driver = EngineDriver(kcache_llm.engine).start()

    async def one(i: int, prompt: str):
        stream = await driver.submit(prompt, delta, f"d{i}")
        return await stream.final_output(), stream.num_output_tokens

    async def all_requests():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        got = run(all_requests())
    finally:
        assert driver.shutdown(timeout_s=TIMEOUT_S)
    assert [(o.outputs[0].text, o.outputs[0].token_ids) for o, _ in got] == \
        [(o.outputs[0].text, o.outputs[0].token_ids) for o in expected]
    assert [n for _, n in got] == [24] * len(PROMPTS)
    stats = driver.stats()
    assert stats.num_generation_tokens_total == 24 * len(PROMPTS)
    assert stats.num_prompt_tokens_total == sum(len(o.prompt_token_ids) for o in expected)  # each prompt once


def test_driver_rejects_bad_requests_aborts_and_stops_accepting(tiny_llama_dir):
    engine = LLM(device="cpu", model=tiny_llama_dir, max_model_len=128).engine
    driver = EngineDriver(engine).start()
    long_run = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def scenario():
        with pytest.raises(ValueError, match="prompt is 200 tokens long but max_model_len is 128"):
            await driver.submit([1] * 200, long_run, "too-long")
        stream = await driver.submit("Hello", long_run, "to-abort")
        first = await stream.__anext__()
        assert not first.finished
        stream.abort()
        last = first
        async for last in stream:
            pass
        assert last.outputs[0].finish_reason == "abort" and len(last.outputs[0].token_ids) < 100
        in_flight = await driver.submit("Hello", SamplingParams(temperature=0, max_tokens=8), "in-flight")
        driver.stop_accepting()
        with pytest.raises(ServerDraining):
            await driver.submit("Hello", long_run, "late")
        return await in_flight.final_output()

    try:
        drained = run(scenario())
    finally:
        assert driver.shutdown(timeout_s=TIMEOUT_S)
    assert drained.outputs[0].finish_reason == "length" and len(drained.outputs[0].token_ids) == 8
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert driver.stats().num_finished_total == {"abort": 1, "length": 1}


def test_shutdown_timeout_aborts_what_still_runs(tiny_llama_dir):
    engine = LLM(device="cpu", model=tiny_llama_dir).engine
    driver = EngineDriver(engine).start()

    async def start_one():
        stream = await driver.submit("Hello", SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "r")
        await stream.__anext__()

    run(start_one())
    assert driver.shutdown(timeout_s=0.01) is False  # it was still running: aborted
    assert not driver.alive and engine.block_manager.num_used_blocks == 0
