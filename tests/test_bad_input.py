"""Bad input is refused with a ValueError that says what is wrong, and nothing is queued."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from kcache_dist import LLM, EngineConfig, KCacheConfig, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(device="cpu", model=tiny_llama_dir, max_model_len=64)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match=r"^prompt is empty: give at least one token$"):
        llm.generate("", SamplingParams())
    with pytest.raises(ValueError, match=r"^prompt is empty: give at least one token$"):
        llm.generate([[]], SamplingParams())


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match=r"^prompt is 64 tokens long but max_model_len is 64 \(the prompt and "
                                         r"at least one generated token must fit\)$"):
        llm.generate([[5] * 64], SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], SamplingParams())
    assert not llm.engine.has_unfinished_requests()


def test_prompt_token_ids_that_are_no_list(llm):
    for prompt, got in (({"prompt_token_ids": 5}, "int"), ({"prompt_token_ids": "1 2"}, "str"),
                        ({"prompt_token_ids": np.array([[1, 2]])}, "a 2-D array")):
        with pytest.raises(ValueError, match=f"^'prompt_token_ids' must be a list of token ids, got {got}$"):
            llm.generate(prompt, SamplingParams())
    with pytest.raises(ValueError, match="^a prompt must be a string or a list of token ids, got a 0-D array$"):
        llm.generate(np.array(5), SamplingParams())
    bad_first_id = r"^prompt token ids must be integers; got (np\.)?True_? \(bool_?\) at position 0$"
    with pytest.raises(ValueError, match=bad_first_id):
        llm.generate([np.bool_(True), 1], SamplingParams())  # one prompt with a bad id, not a batch
    assert not llm.engine.has_unfinished_requests()


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match=r"^prompt token ids must be in \[0, 400\); got \[400, -1\]$"):
        llm.generate([[1, 400, -1]], SamplingParams())


def test_numpy_token_ids_are_token_ids(llm):
    """numpy's integers are token ids: a 1-D array or a list of them is one prompt (a
    2-D array a batch), run as the same list of Python ints."""
    params = SamplingParams(temperature=0, max_tokens=3)
    want = llm.generate([1, 2, 3], params)[0].outputs[0].token_ids
    for prompt in (np.array([1, 2, 3]), [np.int64(1), np.int32(2), np.uint16(3)],
                   {"prompt_token_ids": np.array([1, 2, 3], dtype=np.int32)}):
        [out] = llm.generate(prompt, params)
        assert out.prompt_token_ids == [1, 2, 3] and all(type(t) is int for t in out.prompt_token_ids)
        assert out.outputs[0].token_ids == want
    assert [o.prompt_token_ids for o in llm.generate(np.array([[1, 2, 3], [4, 5, 6]]), params)] == [[1, 2, 3],
                                                                                                      [4, 5, 6]]
    request_id = llm.engine.add_request(np.array([7, 8], dtype=np.int64), params)
    assert llm.engine.abort_request(request_id).prompt_token_ids == [7, 8]
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("token_ids, message", [
    ([1, 1.5, 2], r"got 1\.5 \(float\) at position 1"),
    ([1.5, 2], r"got 1\.5 \(float\) at position 0"),
    ([1, "2"], r"got '2' \(str\) at position 1"),
    ([1, 2, True], r"got True \(bool\) at position 2"),
    ([3, None], r"got None \(NoneType\) at position 1"),
    (np.array([1.0, 2.0]), r"got 1\.0 \(float\) at position 0"),
])
def test_token_ids_that_are_not_integers(llm, token_ids, message):
    message = r"^prompt token ids must be integers; " + message + "$"
    for prompt in (token_ids, [token_ids], {"prompt_token_ids": token_ids}):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, SamplingParams())
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(token_ids, SamplingParams())
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
    ({"temperature": -0.1}, "temperature must be a number >= 0, got -0.1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -2}, r"top_k must be an integer >= -1 \(-1 or 0 disable it\), got -2"),
    ({"n": 2}, r"n must be 1 \(one completion per request\), got 2"),
    ({"stop": [""]}, "stop must hold non-empty strings, got ''"),
    ({"stop": 5}, "stop must be a string or a list of strings, got int"),
    ({"stop": b"end"}, "stop must be a string or a list of strings, got bytes"),
    ({"stop": [1]}, "stop must hold non-empty strings, got 1"),
    ({"stop": ["a", 3]}, "stop must hold non-empty strings, got 3"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of integers, got int"),
    ({"stop_token_ids": "12"}, "stop_token_ids must be a list of integers, got str"),
    ({"stop_token_ids": np.array([[1, 2]])}, "stop_token_ids must be a list of integers, got ndarray"),
    ({"stop_token_ids": [2, 1.5]}, "stop_token_ids must hold integers >= 0, got 1.5"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must hold integers >= 0, got -1"),
    ({"seed": 1.5}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None, got 1.5"),
    ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None, got 18446744073709551616"),
    ({"output_kind": 1}, r"output_kind must be a RequestOutputKind \(CUMULATIVE, DELTA or FINAL_ONLY\), got 1"),
    ({"output_kind": "DELTA"}, r"output_kind must be a RequestOutputKind \(CUMULATIVE, DELTA or FINAL_ONLY\), "
                               r"got 'DELTA'"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        SamplingParams(**kwargs)


def test_stop_and_stop_token_ids_take_any_iterable():
    """As vLLM (which takes list(stop)): sets, ranges, generators, numpy arrays; numpy's integers
    become Python ints."""
    for stop_token_ids in (np.array([2, 7]), [np.int64(2), np.uint8(7)], (2, 7), range(2, 8, 5), {2, 7},
                           (t for t in (2, 7))):
        params = SamplingParams(stop_token_ids=stop_token_ids)
        assert sorted(params.stop_token_ids) == [2, 7] and all(type(t) is int for t in params.stop_token_ids)
    for stop in ({"a", "b"}, (s for s in "ab"), np.array(["a", "b"]), {"a": 1, "b": 2}.keys()):
        assert sorted(SamplingParams(stop=stop).stop) == ["a", "b"]


def test_unknown_config_keys():
    with pytest.raises(ValueError, match=r"^unknown key 'max_batch' in EngineConfig; allowed keys: model, "):
        EngineConfig.from_dict({"max_batch": 4})
    with pytest.raises(ValueError, match=r"^unknown key 'kcache.topn' in KCacheConfig; allowed keys: mode, top_n, "):
        EngineConfig.from_dict({"kcache": {"topn": 4}})
    with pytest.raises(ValueError, match=r"^unknown LLM argument\(s\) max_batch; allowed: model, dtype, kcache, "):
        LLM(max_batch=4)


@pytest.mark.parametrize("values, message", [
    ({"dtype": "int8"}, "invalid value for 'dtype': 'int8'; allowed: auto | float32 | float16 | bfloat16 | fp32"),
    ({"kcache": {"mode": "sparse"}}, "invalid value for 'kcache.mode': 'sparse'; allowed: full | kcache"),
    ({"kcache": {"top_n": 0}}, "invalid value for 'kcache.top_n': 0; allowed: an integer >= 1"),
    ({"kcache": {"group_reduce": "mean"}}, "invalid value for 'kcache.group_reduce': 'mean'; allowed: max | sum"),
    ({"kcache": {"row_cache_factor": 0.5}},
     r"invalid value for 'kcache.row_cache_factor': 0.5; allowed: null \(2 on CUDA, 0 on CPU\), 0 \(no row cache\) "
     r"or a number >= 1"),
    ({"kcache": {"scoring_keys": "int8"}}, "invalid value for 'kcache.scoring_keys': 'int8'; allowed: model | fp8"),
    ({"kcache": {"scoring_keys": "fp8", "renormalize": False}},
     "kcache.scoring_keys='fp8' needs kcache.renormalize=true: the picked positions are weighed by their exact K, "
     "which the positions not picked have only in host memory$"),
    ({"kcache": {"host_values": "int8"}}, "invalid value for 'kcache.host_values': 'int8'; allowed: model | fp8"),
    ({"kcache": {"host_values": "fp8", "scoring_keys": "fp8"}},
     "kcache.host_values='fp8' does not combine with kcache.scoring_keys='fp8' yet: choose one of them$"),
    ({"gpu_memory_utilization": 1.5}, r"invalid value for 'gpu_memory_utilization': 1.5; allowed: a number in \(0, 1\]"),
    ({"max_num_seqs": 0}, "invalid value for 'max_num_seqs': 0; allowed: an integer >= 1"),
    ({"parallel": {"tensor_parallel_size": "2"}},
     "invalid value for 'parallel.tensor_parallel_size': '2'; allowed: an integer >= 1"),
    ({"parallel": {"all_reduce": "nvls"}}, "invalid value for 'parallel.all_reduce': 'nvls'; allowed: nccl | two_shot"),
    ({"kcache": 3}, "invalid value for 'kcache': expected an object, got 3"),
])
def test_invalid_config_values(values, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        EngineConfig.from_dict(values)


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "gpt2")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^unsupported architecture 'GPT2LMHeadModel' in .*config.json; "
                                         r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM$"):
        LLM(device="cpu", model=str(model_dir))


def test_missing_files(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^model directory '.*nowhere' does not exist"):
        LLM(device="cpu", model=str(tmp_path / "nowhere"))
    no_config = shutil.copytree(tiny_llama_dir, tmp_path / "no_config")
    os.remove(no_config / "config.json")
    with pytest.raises(FileNotFoundError, match=r"^no config.json in model directory '.*no_config' \(found: "
                                                r".*model.safetensors"):
        LLM(device="cpu", model=str(no_config))
    no_weights = shutil.copytree(tiny_llama_dir, tmp_path / "no_weights")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"^no \*.safetensors files in model directory '.*no_weights' "
                                                r"\(found: .*config.json"):
        LLM(device="cpu", model=str(no_weights))


def test_model_longer_than_its_positions(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"^max_model_len=1024 exceeds the model's max_position_embeddings=512$"):
        LLM(device="cpu", model=tiny_llama_dir, max_model_len=1024)


def test_cache_too_small_for_one_sequence(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"^num_kv_blocks=3 holds 48 tokens, fewer than one sequence of "
                                         r"max_model_len=64 needs \(4 blocks of 16 tokens\); raise num_kv_blocks to at "
                                         r"least 4 or lower max_model_len to at most 48$"):
        LLM(device="cpu", model=tiny_llama_dir, max_model_len=64, num_kv_blocks=3)
    with pytest.raises(ValueError, match=r"^the KV cache cannot hold one sequence of max_model_len=512 \(32 blocks of "
                                         r"16 tokens\) on rank 0 \(CPU, NUMA node unknown\)\. CPU cache memory is short "
                                         r"by 251407 bytes \(0.00 GiB\): cpu_kv_cache_gb allows 10737 bytes but the "
                                         r"cache needs 262144 bytes = 32 blocks x 8192 bytes\. What fits: "
                                         r"max_model_len <= 16; otherwise raise cpu_kv_cache_gb\.$"):
        LLM(device="cpu", model=tiny_llama_dir, max_model_len=512, cpu_kv_cache_gb=1e-5)


def test_host_memory_too_small_for_one_sequence(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"^the KV cache cannot hold one sequence of max_model_len=512 \(2 blocks of "
                                         r"256 tokens\) on rank 0 \(CPU, NUMA node unknown\)\. Host memory is short by "
                                         r"\d+ bytes .* No max_model_len fits: raise host_memory_gb\.$"):
        LLM(device="cpu", model=tiny_llama_dir, host_memory_gb=1e-6, kcache=KCacheConfig(mode="kcache", dense_layers=1))


def test_kcache_dense_layers_beyond_the_model(tiny_llama_dir):
    with pytest.raises(ValueError, match=r"^kcache.dense_layers=3 exceeds the model's 2 layers$"):
        LLM(device="cpu", model=tiny_llama_dir, kcache=KCacheConfig(mode="kcache", dense_layers=3))


def test_host_memory_gb_flag(capsys):
    from kcache_dist.server.cli_args import build_parser, engine_config_from_args

    parser = build_parser()
    assert engine_config_from_args(parser.parse_args([])).host_memory_gb == "auto"
    assert engine_config_from_args(parser.parse_args(["--host-memory-gb", "48"])).host_memory_gb == 48.0
    assert engine_config_from_args(parser.parse_args(["--host-memory-gb", "auto"])).host_memory_gb == "auto"
    for bad in ("0", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--host-memory-gb", bad])
        assert (f"argument --host-memory-gb: invalid value for 'host_memory_gb': {bad!r}; allowed: auto | a number > 0"
                in capsys.readouterr().err)


def test_server_without_its_http_packages_stops_before_the_engine(monkeypatch, capsys):
    """Every rank checks, before any joins the job: no rank waits on a rank 0 that cannot serve."""
    from kcache_dist.server import entrypoint

    assert entrypoint.missing_http_packages() == []  # installed here
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "fastapi" else find_spec(name))
    with pytest.raises(SystemExit) as exit_info:
        entrypoint.main(["--device", "cpu"])
    assert exit_info.value.code == 2
    assert ("the server needs the package(s) fastapi, which this Python cannot import; install kcache_dist with its "
            "dependencies (pip install -e .)") in capsys.readouterr().err


def test_scoring_keys_flag(capsys):
    from kcache_dist.server.cli_args import build_parser, engine_config_from_args

    parser = build_parser()
    args = parser.parse_args(["--kcache-mode", "kcache", "--scoring-keys", "fp8"])
    assert engine_config_from_args(args).kcache.scoring_keys == "fp8"
    assert engine_config_from_args(parser.parse_args([])).kcache.scoring_keys == "model"
    with pytest.raises(SystemExit):
        parser.parse_args(["--scoring-keys", "int8"])
    assert "argument --scoring-keys: invalid choice: 'int8' (choose from 'model', 'fp8')" in capsys.readouterr().err
    args = parser.parse_args(["--kcache-mode", "kcache", "--host-values", "fp8"])
    assert engine_config_from_args(args).kcache.host_values == "fp8"
    assert engine_config_from_args(parser.parse_args([])).kcache.host_values == "model"
