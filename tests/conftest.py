"""Shared fixtures: tiny random-weight checkpoints saved the way Hugging Face saves them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Attention is computed over keys and values; "
    "the cache holds them for every token. Long contexts need a lot of memory, so the values may "
    "live in host memory while the keys stay on the GPU. 0123456789 Hello, world! Once upon a time "
    "there was a small model that answered questions about caches, batches and tokens."
)

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model",
    "Long contexts need a lot of memory, so the values may live in host memory while the keys stay",
]


def _train_tokenizer(out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    _train_tokenizer(path)
    return path


def save_tiny_model(out_dir: str, tokenizer_dir: str, architecture: str, seed: int = 0, **overrides) -> str:
    """A 2-layer random model of `architecture` with the test tokenizer, saved as safetensors."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config, AutoModelForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.1, eos_token_id=0, bos_token_id=0, architectures=[architecture])
    common.update(overrides)
    config_cls = {"LlamaForCausalLM": LlamaConfig, "Qwen2ForCausalLM": Qwen2Config,
                  "MistralForCausalLM": MistralConfig}[architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**common), dtype=torch.float32)
    with torch.no_grad():  # make biases and norms non-trivial so that loading them is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> str:
    """Llama with GQA and Llama-3 rope scaling."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), tokenizer_dir, "LlamaForCausalLM",
                           rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer_dir) -> str:
    """Qwen2 with q/k/v bias and tied embeddings."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")), tokenizer_dir, "Qwen2ForCausalLM",
                           tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, tokenizer_dir) -> str:
    """Mistral with an explicit head_dim that is not hidden_size / num_heads."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_mistral")), tokenizer_dir, "MistralForCausalLM",
                           head_dim=32, sliding_window=None)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The embedded default model (converted once into the user cache)."""
    from kcache_dist.default_model import default_model_dir as convert_or_find

    return convert_or_find()
