"""Well-known model shapes by name, as model directories without weights.

    model_dir = write_shape_dir("llama3-8b", out_dir)     # config.json + a placeholder tokenizer
    LLMEngine(EngineConfig(model=model_dir, load_format="random", ...))

A shape is the model's Hugging Face config.json, verbatim in what the engine reads (dimensions,
heads, rope, vocabulary, limits). With `load_format="random"` the engine draws the weights on the
device, so a 16 GB model needs no file beyond the few written here. The tokenizer is a
placeholder: one word-level token per id ("<t123>"), enough for the engine to detokenize
token-id prompts and their outputs; its text means nothing.

Shapes:
  llama3-8b   Llama-3.1-8B (the dimensions of Llama-3-8B; 128K positions, llama3 rope scaling)
  llama2-7b   Llama-2-7b (multi-head attention: 32 KV heads; 4K positions)
  qwen2-7b    Qwen2-7B (28 heads, 4 KV heads, q/k/v bias; 128K positions)
  tiny-llama  a 12-layer Llama of hidden size 64 for CPU runs (GQA, 8K positions)
  tiny-qwen2  the same as Qwen2 (q/k/v bias, tied embeddings)
"""

from __future__ import annotations

import json
import os
from typing import Any

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
          "pretraining_tp": 1, "use_cache": True, "tie_word_embeddings": False}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "use_sliding_window": False}

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"},
    "llama2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                  "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"},
    "qwen2-7b": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_position_embeddings": 131072, "max_window_layers": 28, "sliding_window": 131072,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                 "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"},
    "tiny-llama": {**_LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32"},
    "tiny-qwen2": {**_QWEN2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 8192, "max_window_layers": 12, "sliding_window": 8192,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
                   "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32"},
}


def shape_config(name: str) -> dict[str, Any]:
    """The config.json contents of shape `name` (a copy)."""
    try:
        return json.loads(json.dumps(NAMED_SHAPES[name]))
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; named shapes: {', '.join(NAMED_SHAPES)}") from None


def write_shape_dir(name: str, out_dir: str) -> str:
    """Write config.json and the placeholder tokenizer of shape `name` into `out_dir`; returns it."""
    config = shape_config(name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    write_placeholder_tokenizer(out_dir, config["vocab_size"], config["eos_token_id"])
    return out_dir


def write_placeholder_tokenizer(out_dir: str, vocab_size: int, eos_token_id: int) -> None:
    """A fast tokenizer with one word-level token "<tI>" per id I < vocab_size, EOS = "<t{eos}>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    eos = f"<t{eos_token_id}>"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, unk_token=eos)
    fast.save_pretrained(out_dir)
