"""Test helpers: reference generation with Hugging Face transformers (token ids to compare), and
the common pieces of the Triton kernel tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch


def hf_greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids of each prompt, one prompt at a time (no padding), float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- Triton kernel tests -----------------------------------------------------------------------
HAS_TRITON = importlib.util.find_spec("triton") is not None
cuda_and_triton = pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
KERNEL_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}  # relative error vs reference


def fresh_seed() -> int:
    """A new seed each run, printed so that a failure can be replayed."""
    seed = int(torch.seed() % 2**31)
    print(f"seed {seed}")
    return seed


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_within_ulps(out: torch.Tensor, ref: torch.Tensor, seed: int) -> None:
    """16-bit: every element within 2 ulp of the reference (the spacing of its dtype at the
    reference's magnitude) and all but 1% of them equal (2 allowed in any case: a tiny tensor may hold
    one of the rare neighbouring roundings); float32: within 16 ulp."""
    info = torch.finfo(ref.dtype)
    magnitude = ref.double().abs().clamp(min=info.tiny)  # subnormals: the spacing of the smallest normals
    ulp = torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps
    worst = ((out.double() - ref.double()).abs() / ulp).max().item()
    unequal = (out != ref).sum().item()
    wide = ref.dtype == torch.float32
    assert worst <= (16.0 if wide else 2.0) and (wide or unequal <= max(2, 0.01 * ref.numel())), \
        f"seed {seed}: worst {worst:.2f} ulp, {unequal} of {ref.numel()} unequal ({ref.dtype})"


def run_under_triton_interpreter(script: str, seed: int, timeout_s: float) -> None:
    """Run `script` (Python source that prints "interpreter ok" when its checks pass) in a
    subprocess with TRITON_INTERPRET=1 and no visible GPU, the repository and tests/ importable."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([root, tests_dir, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, \
        f"seed {seed}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
