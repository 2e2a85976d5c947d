"""The OpenAI-compatible server, started as a real subprocess (`launch/serve.py`) on a free
127.0.0.1 port with a tiny random model, talked to with the official `openai` client (and raw
httpx where a client would not send such a request). Every wait is bounded by a timeout."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

import httpx
import openai
import pytest

from conftest import PROMPTS, save_tiny_model
from kcache_dist import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_SCRIPT = os.path.join(ROOT, "launch", "serve.py")
API_KEY = "test-key"
MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0


# ---- a server process ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python launch/serve.py ARGS --port <free>` with its log in a file (a pipe could fill and
    block the server). `launcher` replaces `python` to start it as a job, e.g.
    ["deepspeed", "--num_gpus", "2"] or ["mpirun", "-np", "2", sys.executable]; the job runs in
    its own process group, which `stop` ends."""

    def __init__(self, args: list[str], log_path: str, port: Optional[int] = None,
                 launcher: Sequence[str] = (sys.executable,), env: Optional[dict] = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([*launcher, SERVE_SCRIPT, *args, "--port", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                        start_new_session=True)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """/metrics as {name or name{extra labels}: value}, without the model_name label."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")
                values[key] = float(value)
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        try:  # what a launcher left behind (the deepspeed command does not pass SIGTERM on)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout_s} s: {what}")


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """The conftest tiny Llama, with room for long streams (4096 positions)."""
    return save_tiny_model(str(tmp_path_factory.mktemp("serve_llama")), tokenizer_dir, "LlamaForCausalLM",
                           max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(["--model", model_dir, "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                          "--api-key", API_KEY], str(tmp_path_factory.mktemp("logs") / "server.log"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def offline(model_dir) -> LLM:
    return LLM(device="cpu", model=model_dir, max_model_len=MAX_MODEL_LEN)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


# ---- basics -------------------------------------------------------------------------------------
def test_health_models_and_metrics(server, client, model_dir):
    assert httpx.get(server.base_url + "/health", timeout=10).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [model_dir]
    metrics = server.metrics()
    assert metrics['kcache_dist_cache_mode_info{kcache_mode="full"}'] == 1
    assert metrics["kcache_dist_host_v_blocks_in_use"] == 0 and metrics["kcache_dist_v_bytes_fetched_total"] == 0
    assert metrics["kcache_dist_device_cache_blocks_total"] > 0


def test_greedy_completions_equal_offline_generate(client, offline, model_dir):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = offline.generate(PROMPTS, params)
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model=model_dir, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        streamed = client.completions.create(model=model_dir, prompt=prompt, max_tokens=12, temperature=0,
                                             stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
        assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason
    # token ids as the prompt
    ids = expected[1].prompt_token_ids
    got = client.completions.create(model=model_dir, prompt=ids, max_tokens=12, temperature=0)
    assert got.choices[0].text == expected[1].outputs[0].text


def test_greedy_chat_equals_offline_chat(client, offline, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    got = client.chat.completions.create(model=model_dir, messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model=model_dir, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)


def test_stop_strings_cut_the_text_also_when_streamed(client, offline, model_dir):
    prompt = PROMPTS[2]
    full = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].isascii()
                and full[i:i + 2].strip())
    expected = full[:full.index(stop)]
    got = client.completions.create(model=model_dir, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert (got.choices[0].text, got.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model=model_dir, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_seeded_sampling_is_reproducible(client, model_dir):
    def sample(seed: int) -> str:
        return client.completions.create(model=model_dir, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    assert sample(7) == sample(7)


# ---- many clients, disconnects -------------------------------------------------------------------
def test_sixteen_concurrent_streaming_clients(server, offline, model_dir):
    num_clients = 16
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(num_clients)]
    max_tokens = [20 + i for i in range(num_clients)]
    expected = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                          for m in max_tokens])
    before = server.metrics()

    async def one_client(client: openai.AsyncOpenAI, prompt: str, max_tokens: int):
        stream = await client.completions.create(model=model_dir, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=REQUEST_TIMEOUT_S) as client:
            return await asyncio.wait_for(asyncio.gather(*(one_client(client, p, m)
                                                            for p, m in zip(prompts, max_tokens))), 120)

    results = asyncio.run(all_clients())
    for (text, finish, usage), want, m in zip(results, expected, max_tokens):
        assert (finish, usage.completion_tokens) == ("length", m)
        assert text == want.outputs[0].text
    after = server.metrics()
    tokens = after["kcache_dist_generation_tokens_total"] - before["kcache_dist_generation_tokens_total"]
    steps = after["kcache_dist_token_steps_total"] - before["kcache_dist_token_steps_total"]
    assert tokens == sum(max_tokens) and steps < tokens / 2  # they were batched together
    wait_until(lambda: server.metrics()["kcache_dist_device_cache_blocks_in_use"] == 0, 10, "blocks freed")


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, client, model_dir):
    aborted_before = server.metrics()['kcache_dist_requests_finished_total{finish_reason="abort"}']
    stream = client.completions.create(model=model_dir, prompt=PROMPTS[1], max_tokens=MAX_MODEL_LEN - 50,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces = [next(stream) for _ in range(3)]
    assert all(p.choices[0].finish_reason is None for p in pieces)
    running = server.metrics()
    assert running["kcache_dist_requests_running"] == 1 and running["kcache_dist_device_cache_blocks_in_use"] > 0
    stream.close()  # the client goes away mid-stream
    metrics = wait_until(lambda: (m := server.metrics())["kcache_dist_device_cache_blocks_in_use"] == 0 and m,
                         10, "the aborted request's blocks freed")
    assert metrics["kcache_dist_requests_running"] == 0
    assert metrics['kcache_dist_requests_finished_total{finish_reason="abort"}'] == aborted_before + 1


# ---- bad requests ---------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (body, param, message fragment)
    ('{"model": MODEL, "prompt": "Hi"', None, "not valid JSON"),
    ('[1, 2]', None, "must be a JSON object"),
    ('{"model": MODEL}', "prompt", "missing required field 'prompt'"),
    ('{"prompt": "Hi"}', "model", "missing required field 'model'"),
    ('{"model": MODEL, "prompt": "Hi", "max_tokens": "ten"}', "max_tokens", "Input should be a valid integer"),
    ('{"model": MODEL, "prompt": 5}', "prompt", "prompt must be a string or a list of token ids"),
    ('{"model": MODEL, "prompt": "Hi", "bogus": 1}', "bogus", "unknown field 'bogus'"),
    ('{"model": MODEL, "prompt": "Hi", "temperature": -1}', "temperature", "temperature must be a number >= 0"),
    ('{"model": MODEL, "prompt": "Hi", "top_p": 1.5}', "top_p", "top_p must be in (0, 1]"),
    ('{"model": MODEL, "prompt": "Hi", "max_tokens": 0}', "max_tokens", "max_tokens must be an integer >= 1"),
    ('{"model": MODEL, "prompt": "Hi", "n": 2}', "n", "n must be 1"),
    ('{"model": MODEL, "prompt": "Hi", "stop": [1]}', "stop", "stop must be a string or a list of strings"),
    ('{"model": MODEL, "prompt": "Hi", "stop": 5}', "stop", "stop must be a string or a list of strings, got 5"),
    ('{"model": MODEL, "prompt": "Hi", "stop": ' + json.dumps(["s"] * 17) + '}', "stop",
     "stop holds 17 strings; at most 16 are allowed"),
    ('{"model": MODEL, "prompt": "Hi", "stop": "' + "x" * 257 + '"}', "stop",
     "a stop string is 257 characters long; at most 256 are allowed"),
    ('{"model": MODEL, "prompt": "Hi", "temperature": Infinity}', None, "Infinity is not a JSON number"),
    ('{"model": MODEL, "prompt": "Hi", "max_tokens": ' + "9" * 5000 + '}', None, "not valid JSON: Exceeds the limit"),
    ("[" * 100_000, None, "not valid JSON: nested too deeply"),
    ('{"model": MODEL, "prompt": ""}', "prompt", "prompt is empty"),
    ('{"model": MODEL, "prompt": [1, 99999]}', "prompt", "prompt token ids must be in"),
    ('{"model": MODEL, "prompt": LONG}', "prompt", f"but max_model_len is {MAX_MODEL_LEN}"),
    ('{"model": MODEL, "prompt": [1, 2, 3], "max_tokens": ' + str(MAX_MODEL_LEN - 2) + '}', "max_tokens",
     f"'max_tokens' or 'max_completion_tokens' is too large: {MAX_MODEL_LEN - 2}. This model's maximum context "
     f"length is {MAX_MODEL_LEN} "
     f"tokens and your request has 3 input tokens ({MAX_MODEL_LEN - 2} > {MAX_MODEL_LEN} - 3)"),
]


@pytest.mark.parametrize("body,param,fragment", BAD_REQUESTS, ids=[f for _, _, f in BAD_REQUESTS])
def test_bad_completion_request_gets_400_and_server_keeps_serving(server, client, model_dir, body, param, fragment):
    body = body.replace("MODEL", json.dumps(model_dir)).replace("LONG", json.dumps([1] * MAX_MODEL_LEN))
    response = httpx.post(server.base_url + "/v1/completions", content=body, headers=auth(), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]
    assert client.completions.create(model=model_dir, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_bad_chat_requests_through_the_openai_client(client, model_dir):
    with pytest.raises(openai.BadRequestError, match="temperature must be a number >= 0"):
        client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="messages must hold at least one message"):
        client.chat.completions.create(model=model_dir, messages=[])
    with pytest.raises(openai.BadRequestError, match="content parts must be text parts"):
        client.chat.completions.create(model=model_dir, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])
    with pytest.raises(openai.BadRequestError, match=f"max_model_len is {MAX_MODEL_LEN}") as info:
        client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "Hello " * 2000}])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match=f"This model's maximum context length is {MAX_MODEL_LEN} "
                       "tokens and your request has") as info:
        client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=MAX_MODEL_LEN)
    assert info.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:  # 404, as OpenAI and vLLM answer
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError, match="the model 'no-such-model' does not exist"):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    reply = client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_oversized_body_gets_413(server):
    body = json.dumps({"model": "m", "prompt": "a" * (1 << 20)})
    response = httpx.post(server.base_url + "/v1/completions", content=body, headers=auth(), timeout=30)
    assert response.status_code == 413 and "larger than the server's limit" in response.json()["error"]["message"]


def test_api_key_is_required(server, model_dir):
    wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model_dir, prompt="Hi", max_tokens=2)
    response = httpx.post(server.base_url + "/v1/completions", json={"model": model_dir, "prompt": "Hi"}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200  # probes need no key


# ---- shutdown ---------------------------------------------------------------------------------------
def test_sigterm_drains_the_request_in_flight_then_exits_0(model_dir, tmp_path):
    proc = ServerProcess(["--model", model_dir, "--device", "cpu"], str(tmp_path / "server.log")).wait_ready()
    try:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0,
                               timeout=REQUEST_TIMEOUT_S)
        max_tokens = 1000  # a few seconds of decoding: still running when the signal lands
        stream = client.completions.create(model=model_dir, prompt=PROMPTS[0], max_tokens=max_tokens, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [next(stream)]
        proc.process.send_signal(signal.SIGTERM)
        chunks.extend(stream)  # the request in flight runs to its end
        assert chunks[-1].usage.completion_tokens == max_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert proc.process.wait(timeout=30) == 0
        log = proc.log()
        assert "received SIGTERM: draining" in log and "Waiting for connections to close" in log
        assert "every request finished" in log
        with pytest.raises(httpx.TransportError):
            httpx.get(proc.base_url + "/health", timeout=5)
    finally:
        proc.stop()
