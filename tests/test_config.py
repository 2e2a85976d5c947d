"""Config dataclasses: frozen, JSON round trip, every shipped ds_configs file loads."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import pytest

from kcache_dist import EngineConfig, KCacheConfig, LLM, ParallelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def test_configs_are_frozen():
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kcache.top_n = 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json"))))
def test_shipped_configs_load_and_round_trip(path):
    config = EngineConfig.from_json(path)
    with open(path) as f:
        raw = json.load(f)
    for key, value in raw.items():
        got = getattr(config, key)
        assert (dataclasses.asdict(got) if dataclasses.is_dataclass(got) else got) == \
            ({**dataclasses.asdict(type(got)()), **value} if dataclasses.is_dataclass(got) else value)
    assert EngineConfig.from_dict(config.to_dict()) == config


def test_json_file_with_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"dtype": "bf16", "kcache": {"mode": "kcache", "top_n": 64},
                                "parallel": {"tensor_parallel_size": 2}}))
    config = EngineConfig.from_json(path, max_num_seqs=8)
    assert config.dtype == "bfloat16" and config.max_num_seqs == 8
    assert config.kcache == KCacheConfig(mode="kcache", top_n=64)
    assert config.parallel == ParallelConfig(tensor_parallel_size=2)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"c.json: not valid JSON"):
        EngineConfig.from_json(path)


def test_llm_keywords_override_the_config_file(tiny_llama_dir, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_num_seqs": 3, "max_model_len": 100, "dtype": "bfloat16"}))
    llm = LLM(device="cpu", model=tiny_llama_dir, config=str(path), max_model_len=80)
    assert (llm.config.max_num_seqs, llm.config.max_model_len, llm.config.dtype) == (3, 80, "bfloat16")
    assert llm.engine.max_model_len == 80


def test_row_cache_factor_defaults_by_device_and_context(tiny_llama_dir):
    """None until the device and max_model_len are known: on CUDA 2 x top_n below 16K tokens, 4 x
    from there; none on CPU (host memory is the device's)."""
    default = KCacheConfig(mode="kcache")
    assert default.row_cache_factor is None
    assert default.for_device("cuda", 8192).row_cache_factor == 2.0
    assert default.for_device("cuda", 16383).row_cache_factor == 2.0
    assert default.for_device("cuda", 16384).row_cache_factor == 4.0
    assert default.for_device("cuda", 131072).row_cache_factor == 4.0
    assert default.for_device("cpu", 8192).row_cache_factor == 0
    assert default.for_device("cpu", 32768).row_cache_factor == 0
    explicit = KCacheConfig(mode="kcache", row_cache_factor=1.5)
    assert explicit.for_device("cuda", 32768) is explicit and explicit.for_device("cpu", 8192) is explicit
    with pytest.raises(ValueError, match=r"kcache.row_cache_factor is None until the device is known"):
        default.row_cache_rows
    llm = LLM(device="cpu", model=tiny_llama_dir, kcache=dataclasses.replace(default, dense_layers=1))
    assert llm.config.kcache.row_cache_factor == 0 and llm.engine.runner.kv_cache.row_cache is None


def test_engine_picks_the_default_row_cache_factor_for_its_max_model_len(tiny_llama_dir, monkeypatch, caplog):
    """The engine resolves a None row_cache_factor with its device and its resolved max_model_len
    (given, or the model's max_position_embeddings), and says which cache it took."""
    import kcache_dist.config as config_module

    asked = []

    def factor_by_length(device_type, max_model_len):
        asked.append((device_type, max_model_len))
        return 1.5 if max_model_len >= 256 else 0.0

    monkeypatch.setattr(config_module, "default_row_cache_factor", factor_by_length)
    kcache = KCacheConfig(mode="kcache", dense_layers=1)
    caplog.set_level("INFO", logger="kcache_dist.engine.llm_engine")
    short = LLM(device="cpu", model=tiny_llama_dir, max_model_len=128, kcache=kcache)
    assert short.config.kcache.row_cache_factor == 0 and short.engine.runner.kv_cache.row_cache is None
    assert "far-row cache" not in caplog.text  # no cache, nothing to say
    whole = LLM(device="cpu", model=tiny_llama_dir, kcache=kcache)  # the model's 512 positions
    assert whole.config.kcache.row_cache_factor == 1.5 and whole.engine.runner.kv_cache.row_cache is not None
    assert asked == [("cpu", 128), ("cpu", 512)]
    assert (f"far-row cache: 1.5 x top_n = {math.ceil(1.5 * kcache.top_n)} rows per sequence, sparse layer and KV "
            "head (row_cache_factor None: the default on cpu for max_model_len=512)") in caplog.text
