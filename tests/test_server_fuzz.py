"""Property-based fuzzing of the HTTP API (hypothesis): generated request bodies for
/v1/completions and /v1/chat/completions — wrong types, missing and unknown fields, huge and
negative numbers, NaN, odd unicode (lone surrogates included), nested junk, raw bytes — against
one real server. Every answer is below 500 (a 4xx carries an OpenAI-style error body), and the
server is healthy afterwards. Oversized bodies and long prompts are refused with 413 / 400."""

from __future__ import annotations

import collections
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import ServerProcess

MAX_MODEL_LEN = 64  # valid generated requests stay short
MAX_REQUEST_BODY_BYTES = 1 << 16
COMPLETION_CASES = 300
CHAT_CASES = 200
RAW_BODY_CASES = 100
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(["--model", tiny_llama_dir, "--served-model-name", "tiny", "--device", "cpu",
                          "--max-model-len", str(MAX_MODEL_LEN), "--max-request-body-bytes",
                          str(MAX_REQUEST_BODY_BYTES), "--disable-uvicorn-access-log"],
                         str(tmp_path_factory.mktemp("logs") / "server.log"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        yield client


# ---- strategies -------------------------------------------------------------------------------------
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(["", " ", "\x00", "\u202e\u200b", "🦊" * 20, "a\r\nb", "<|endoftext|>", "{{ raise }}", "%s%n"]),
    st.text(st.sampled_from("ab 🦊\u0301"), min_size=300, max_size=900),  # long for the 64-token context
)
numbers = st.one_of(st.integers(-3, 10), st.integers(), st.sampled_from([2 ** 63, -2 ** 63 - 1, 10 ** 40]),
                    st.floats(allow_nan=True, allow_infinity=True))
leaves = st.one_of(st.none(), st.booleans(), numbers, odd_text)
junk = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
                    max_leaves=12)


def maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes junk of any type."""
    return st.one_of(valid, valid, junk)


token_ids = st.lists(st.one_of(st.integers(0, 300), st.integers(-5, 10 ** 6)), max_size=80)
plausible_fields = {  # values of the right type, some of them out of range
    "max_tokens": st.integers(-2, 6),
    "temperature": st.floats(-1, 3, allow_nan=False),
    "top_p": st.one_of(st.floats(0.01, 1.0), st.floats(-0.5, 1.5)),
    "top_k": st.integers(-2, 500),
    "n": st.one_of(st.just(1), st.integers(0, 3)),
    "seed": st.integers(),
    "stop": st.one_of(odd_text, st.lists(odd_text, max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "stop_token_ids": token_ids,
    "skip_special_tokens": st.booleans(),
    "presence_penalty": st.one_of(st.just(0.0), st.floats(-2, 2)),
    "logit_bias": st.one_of(st.just({}), st.dictionaries(odd_text, st.floats(-100, 100), max_size=2)),
    "user": odd_text,
}
junky_fields = {name: maybe(value) for name, value in plausible_fields.items()}
models = st.one_of(st.just("tiny"), st.just("tiny"), odd_text, junk)
prompts = st.one_of(odd_text, token_ids, st.lists(odd_text, max_size=2))
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": odd_text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"])},
                                optional={"content": st.one_of(odd_text, st.lists(text_part, max_size=3)),
                                          "name": odd_text})
junky_message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={"content": maybe(st.one_of(odd_text, st.lists(maybe(text_part), max_size=3))), "name": maybe(odd_text)})
# plausible bodies reach the engine (and often generate); junky ones test the validation
completion_bodies = st.one_of(
    st.fixed_dictionaries({"model": st.just("tiny"), "prompt": prompts}, optional=plausible_fields),
    st.fixed_dictionaries({"model": models},
                          optional={"prompt": maybe(prompts), "echo": maybe(st.booleans()),
                                    "logprobs": maybe(st.integers(-1, 5)), "suffix": maybe(odd_text),
                                    "best_of": maybe(st.integers(0, 3)), **junky_fields, "bogus": junk}))
chat_bodies = st.one_of(
    st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.lists(message, max_size=4)},
                          optional={**plausible_fields, "max_completion_tokens": st.integers(-1, 6)}),
    st.fixed_dictionaries({"model": models},
                          optional={"messages": maybe(st.lists(junky_message, max_size=4)),
                                    "max_completion_tokens": maybe(st.integers(-1, 6)),
                                    "logprobs": maybe(st.booleans()), **junky_fields, "bogus": junk}))


def encode(body) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # NaN/Infinity as Python writes them; surrogates escaped


STATUS_COUNTS: collections.Counter = collections.Counter()  # over every fuzz case, printed at the end


def check_answer(response: httpx.Response) -> None:
    STATUS_COUNTS[response.status_code] += 1
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"


# ---- fuzz ---------------------------------------------------------------------------------------------
@settings(max_examples=COMPLETION_CASES, **FUZZ_SETTINGS)
@given(body=st.one_of(completion_bodies, completion_bodies, completion_bodies, junk))
def test_fuzzed_completion_bodies_never_get_5xx(server, http, body):
    check_answer(http.post("/v1/completions", content=encode(body)))


@settings(max_examples=CHAT_CASES, **FUZZ_SETTINGS)
@given(body=st.one_of(chat_bodies, chat_bodies, chat_bodies, junk))
def test_fuzzed_chat_bodies_never_get_5xx(server, http, body):
    check_answer(http.post("/v1/chat/completions", content=encode(body)))


@settings(max_examples=RAW_BODY_CASES, **FUZZ_SETTINGS)
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_fuzzed_raw_bodies_never_get_5xx(server, http, route, raw, content_type):
    check_answer(http.post(route, content=raw, headers={"Content-Type": content_type}))


def test_server_is_alive_after_the_fuzz(server, http):
    print(f"\nfuzz cases by status: {dict(sorted(STATUS_COUNTS.items()))}")
    assert server.process.poll() is None
    assert http.get("/health").json() == {"status": "ok"}
    reply = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3}).json()
    assert reply["usage"]["completion_tokens"] == 3
    assert "Traceback" not in server.log() and "internal error" not in server.log()


# ---- big bodies, long prompts ------------------------------------------------------------------------
def test_oversized_bodies_are_refused_before_they_are_read(server, http):
    declared = http.post("/v1/completions", content=b"{" + b" " * (8 * MAX_REQUEST_BODY_BYTES) + b"}")
    chunked = http.post("/v1/completions", content=iter([b" " * 4096] * (2 * MAX_REQUEST_BODY_BYTES // 4096)))
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["message"] == (f"request body is larger than the server's limit of "
                                                        f"{MAX_REQUEST_BODY_BYTES} bytes")


@pytest.mark.parametrize("route,key", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_prompt_as_long_as_the_body_limit_is_refused_quickly(server, http, route, key):
    text = "The quick brown fox " * ((MAX_REQUEST_BODY_BYTES - 200) // 20)
    value = text if key == "prompt" else [{"role": "user", "content": text}]
    start = time.perf_counter()
    response = http.post(route, json={"model": "tiny", key: value})
    elapsed_s = time.perf_counter() - start
    print(f"\n{route}: a {len(text)}-character prompt refused in {elapsed_s:.3f} s")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == key
    assert f"but max_model_len is {MAX_MODEL_LEN}" in response.json()["error"]["message"]


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"model": "tiny", "prompt": "\ud800"}),  # once a 500: the tokenizer cannot encode it
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a\udfffb"}]}),
    ("/v1/completions", {"model": "\udc00", "prompt": "Hi"}),
])
def test_lone_surrogates_are_refused_with_400(server, http, route, body):
    response = http.post(route, content=encode(body))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == ("the request body holds a lone UTF-16 surrogate escape "
                                                    "(\\ud800-\\udfff without its pair): strings must be valid "
                                                    "Unicode")
