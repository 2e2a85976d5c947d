"""Load a Hugging Face checkpoint into a model, tensor by tensor.

`load_weights` takes (HF name, tensor) pairs: `iterate_checkpoint(model_dir)` for a local
safetensors checkpoint (lazy slices), or `random_weights.random_checkpoint(...)` for random values
of a model's shape. Each tensor is handed to its parameter's `weight_loader`, which reads only the
part this rank holds.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Iterator

from safetensors import safe_open
from torch import nn


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's *.safetensors files: those named by model.safetensors.index.json if it exists."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index_path} names files that are missing: {', '.join(map(os.path.basename, missing))}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        found = sorted(os.listdir(model_dir))
        raise FileNotFoundError(f"no *.safetensors files in model directory '{model_dir}' "
                                f"(found: {', '.join(found) or 'nothing'})")
    return files


def iterate_checkpoint(model_dir: str) -> Iterator[tuple[str, object]]:
    """(name, lazy slice) for every tensor of the checkpoint."""
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Any]], source: str = "checkpoint") -> None:
    """Fill every parameter of `model` from `weights`, (HF name, full tensor or lazy slice) pairs
    such as `iterate_checkpoint(model_dir)`; error on anything missing. `source` names the weights
    in error messages."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = name, None
        for ckpt_name, (module_name, shard) in packed.items():
            if f".{ckpt_name}." in name:
                target, shard_id = name.replace(f".{ckpt_name}.", f".{module_name}."), shard
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"{source} tensor '{name}' matches no parameter of {type(model).__name__}")
        param.weight_loader(param, tensor, shard_id)
        del tensor  # hold no full tensor while the next one is read or drawn
        loaded.add(f"{target}:{shard_id}")
    expected = set()
    for name in params:
        module_name = name.split(".")[-2]
        shards = [s for (m, s) in packed.values() if m == module_name] or [None]
        expected.update(f"{name}:{s}" for s in shards)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{source} lacks weights for: {', '.join(missing[:10])}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
