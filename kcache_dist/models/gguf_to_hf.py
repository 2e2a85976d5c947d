"""Convert a llama-architecture GGUF file into a Hugging Face Llama checkpoint directory.

The output directory holds everything ``transformers`` needs to load the model and
its tokenizer without the GGUF file:

* ``model.safetensors``  - every tensor dequantized to float32 by ``gguf.quants.dequantize`` (a Q4_1 / Q8_0 block
  dequantizes exactly into float32, so these weights equal the GGUF's bit for bit);
* ``config.json``        - a ``LlamaConfig`` built from the GGUF metadata;
* ``generation_config.json`` - bos / eos / pad token ids;
* tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, the chat template).

The directory is written under a temporary sibling name and renamed into place at the
end, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path

import numpy as np

PARTIAL_DIR_INFIX = ".partial-"
"""Temporary output directories are named ``.<out_dir name>.partial-<pid>-<random hex>``."""

SUPPORTED_ARCHITECTURE = "llama"

_GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_BLOCK_TENSOR_PATTERN = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<kind>[a-z_]+)\.weight$")


def hf_tensor_name(gguf_tensor_name: str) -> str:
    """Map a llama.cpp tensor name to its Hugging Face Llama name.

    ``"blk.3.attn_q.weight"`` -> ``"model.layers.3.self_attn.q_proj.weight"``,
    ``"token_embd.weight"`` -> ``"model.embed_tokens.weight"``.
    Raises ``KeyError`` for a name that has no Llama counterpart (e.g. ``rope_freqs``).
    """
    block_match = _BLOCK_TENSOR_PATTERN.match(gguf_tensor_name)
    if block_match is not None:
        hf_suffix = _BLOCK_TENSOR_NAMES[block_match["kind"]]
        return f"model.layers.{block_match['layer']}.{hf_suffix}.weight"
    stem, _, suffix = gguf_tensor_name.partition(".")
    if suffix != "weight":
        raise KeyError(gguf_tensor_name)
    return f"{_GLOBAL_TENSOR_NAMES[stem]}.weight"


def undo_rotary_row_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert the row permutation llama.cpp's converter applies to q_proj / k_proj.

    llama.cpp stores each head's rotary pairs interleaved (GPT-J style) instead of
    split in halves (Hugging Face / NeoX style); its converter does
    ``w.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2)``.

    Args:
        weight: ``[num_heads * head_dim, in_features]`` rows as stored in the GGUF
            (a 1-D bias ``[num_heads * head_dim]`` works too).
        num_heads: ``num_attention_heads`` for q_proj, ``num_key_value_heads`` for k_proj.

    Returns:
        ``[num_heads * head_dim, in_features]`` rows in Hugging Face order.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"{rows} rows cannot be split into {num_heads} heads of rotary pairs")
    half_head_dim = rows // num_heads // 2
    interleaved = weight.reshape(num_heads, half_head_dim, 2, *weight.shape[1:])
    return interleaved.swapaxes(1, 2).reshape(weight.shape)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert the llama GGUF file ``gguf_path`` into a Hugging Face directory ``out_dir``.

    ``out_dir`` must not exist yet; its parent is created if needed. The result is
    written into a temporary sibling directory first and renamed into place.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: ``gguf_path`` is not a readable GGUF file, its architecture is not
            llama, or its tensors / metadata do not describe a plain Llama model.
        FileExistsError: ``out_dir`` already exists.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"refusing to overwrite existing directory {out_dir}")

    reader = _open_gguf(gguf_path)
    metadata = _read_metadata(reader, gguf_path)
    config = _llama_config(metadata, reader, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (unlike tempfile.mkdtemp) honours the umask, so the cache is as readable as any other file.
    partial_dir = out_dir.parent / f".{out_dir.name}{PARTIAL_DIR_INFIX}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(partial_dir)
    try:
        safetensors_path = partial_dir / "model.safetensors"
        _write_weights(reader, config, gguf_path, safetensors_path)
        config.save_pretrained(partial_dir)
        # safetensors creates its file with mode 0o600; give it the umask-derived mode config.json got.
        os.chmod(safetensors_path, stat.S_IMODE(os.stat(partial_dir / "config.json").st_mode))
        _write_generation_config(config, partial_dir)
        _write_tokenizer(gguf_path, metadata, config.max_position_embeddings, partial_dir)
        os.rename(partial_dir, out_dir)
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise


def _open_gguf(gguf_path: Path):
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"cannot read GGUF file {gguf_path}: {error}") from error


def _read_metadata(reader, gguf_path: Path) -> dict:
    """GGUF key-value metadata as plain Python values (token lists left out)."""
    skipped_keys = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    metadata = {key: field.contents() for key, field in reader.fields.items() if key not in skipped_keys}
    if "tokenizer.ggml.tokens" in reader.fields:
        metadata["tokenizer.ggml.token_count"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    architecture = metadata.get("general.architecture")
    if architecture != SUPPORTED_ARCHITECTURE:
        raise ValueError(
            f"{gguf_path}: general.architecture is {architecture!r}, only {SUPPORTED_ARCHITECTURE!r} can be converted"
        )
    return metadata


def _float32_value(value: float) -> float:
    """Shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _llama_config(metadata: dict, reader, gguf_path: Path):
    """Build a ``transformers.LlamaConfig`` from GGUF ``llama.*`` / ``tokenizer.*`` metadata."""
    from transformers import LlamaConfig

    def required(key: str):
        if key not in metadata:
            raise ValueError(f"{gguf_path}: metadata key {key!r} is missing")
        return metadata[key]

    unsupported = sorted(key for key in metadata if key.startswith("llama.rope.scaling."))
    if unsupported:
        raise ValueError(f"{gguf_path}: rope scaling is not supported by this converter, found {unsupported}")

    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden_size // num_heads))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"{gguf_path}: partial rotary ({rotary_dim} of {head_dim} head dims) is not Llama")

    tensor_names = {tensor.name for tensor in reader.tensors}
    embedding_rows = [int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"]
    if not embedding_rows:
        raise ValueError(f"{gguf_path}: tensor 'token_embd.weight' is missing")
    vocab_size = embedding_rows[0]

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(required("llama.feed_forward_length")),
        num_hidden_layers=int(required("llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(metadata.get("llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(required("llama.context_length")),
        rms_norm_eps=_float32_value(required("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in tensor_names,
        hidden_act="silu",
        attention_bias=any(name.endswith(".bias") for name in tensor_names),
    )


def _expected_hf_names(config) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for layer in range(config.num_hidden_layers):
        names.update(f"model.layers.{layer}.{suffix}.weight" for suffix in _BLOCK_TENSOR_NAMES.values())
    return names


def _write_weights(reader, config, gguf_path: Path, safetensors_path: Path) -> None:
    """Dequantize every tensor to float32, rename it, un-permute q/k, save as safetensors.

    ``gguf.quants.dequantize`` returns numpy arrays in numpy order (ggml's dims
    reversed), i.e. ``[out_features, in_features]`` - already Hugging Face's layout.
    """
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    if config.attention_bias:
        raise ValueError(f"{gguf_path}: attention biases are not supported by this converter")

    hf_tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        try:
            hf_name = hf_tensor_name(tensor.name)
        except KeyError:
            raise ValueError(f"{gguf_path}: tensor {tensor.name!r} has no Hugging Face Llama counterpart") from None
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected_shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if weight.shape != expected_shape:
            raise ValueError(f"{gguf_path}: {tensor.name} dequantized to {weight.shape}, expected {expected_shape}")
        if ".attn_q." in tensor.name:
            weight = undo_rotary_row_permutation(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = undo_rotary_row_permutation(weight, config.num_key_value_heads)
        hf_tensors[hf_name] = np.ascontiguousarray(weight)

    expected_names = _expected_hf_names(config)
    missing = sorted(expected_names - hf_tensors.keys())
    unexpected = sorted(hf_tensors.keys() - expected_names)
    if missing or unexpected:
        raise ValueError(f"{gguf_path}: tensors missing {missing[:5]} / unexpected {unexpected[:5]} for the config")
    save_file(hf_tensors, str(safetensors_path), metadata={"format": "pt"})


def _write_generation_config(config, out_dir: Path) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)


def _write_tokenizer(gguf_path: Path, metadata: dict, max_length_tokens: int, out_dir: Path) -> None:
    """Save transformers' tokenizer for the GGUF and check the chat template survived."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_chat_template = metadata.get("tokenizer.chat_template")
    if gguf_chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template
    tokenizer.model_max_length = max_length_tokens
    tokenizer.save_pretrained(out_dir)

    saved_tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    if gguf_chat_template and saved_tokenizer.chat_template != gguf_chat_template:
        raise ValueError(f"{gguf_path}: the chat template did not survive saving the tokenizer to {out_dir}")
