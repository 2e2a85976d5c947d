"""The architecture facts the engine needs, read from a Hugging Face `config.json`.

Both spellings of rotary settings are read: `rope_theta` + `rope_scaling` (older checkpoints) and
`rope_parameters` (transformers 5); where both are given, `rope_scaling` wins, as in transformers.
Defaults follow transformers' configs: `hidden_act` silu (others are refused), Llama-3 rope's
`original_max_position_embeddings` = `max_position_embeddings`, Mistral's (and Qwen2's, when
`use_sliding_window`) `sliding_window` 4096 when the key is absent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_SLIDING_WINDOW = 4096  # transformers' MistralConfig and Qwen2Config


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a Llama-family decoder (totals over all tensor-parallel ranks)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    total_num_heads: int
    total_num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    sliding_window: Optional[int]
    checkpoint_dtype: Optional[str]
    eos_token_ids: tuple[int, ...]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K plus V per token over all layers and KV heads, at 1 byte per element."""
        return 2 * self.num_hidden_layers * self.total_num_kv_heads * self.head_dim


def load_model_config(model_dir: str) -> ModelConfig:
    """Read `model_dir/config.json` (and `generation_config.json` for EOS ids if present)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else None
        what = f"found: {', '.join(found) or 'nothing'}" if found is not None else "the directory does not exist"
        raise FileNotFoundError(f"no config.json in model directory '{model_dir}' ({what})")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {path}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {hidden_act!r} in {path}; supported: silu")
    num_heads = _get(raw, path, "num_attention_heads")
    hidden = _get(raw, path, "hidden_size")
    head_dim = raw.get("head_dim") or hidden // num_heads
    attention_bias = bool(raw.get("attention_bias", False))
    is_qwen2 = arch == "Qwen2ForCausalLM"
    sliding_window = raw.get("sliding_window", DEFAULT_SLIDING_WINDOW) if arch != "LlamaForCausalLM" else None
    if is_qwen2 and (not raw.get("use_sliding_window", False)
                     or raw.get("max_window_layers", 28) >= _get(raw, path, "num_hidden_layers")):
        sliding_window = None  # Qwen2 slides only in the layers from max_window_layers on
    return ModelConfig(
        architecture=arch,
        vocab_size=_get(raw, path, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(raw, path, "intermediate_size"),
        num_hidden_layers=_get(raw, path, "num_hidden_layers"),
        total_num_heads=num_heads,
        total_num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(raw, path),
        max_position_embeddings=_get(raw, path, "max_position_embeddings"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_proj_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=sliding_window,
        checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        eos_token_ids=_eos_token_ids(raw, model_dir),
    )


def _get(raw: dict[str, Any], path: str, key: str) -> Any:
    if key not in raw:
        raise ValueError(f"{path} has no '{key}'")
    return raw[key]


def _rope_config(raw: dict[str, Any], path: str) -> RopeConfig:
    # as transformers: rope_scaling wins, and then its theta is its own or the top-level one
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r} in {path}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                      "original_max_position_embeddings") if k in params}
    if rope_type == "llama3":
        kwargs.setdefault("original_max_position_embeddings", _get(raw, path, "max_position_embeddings"))
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def _eos_token_ids(raw: dict[str, Any], model_dir: str) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
