"""Rows as float8 e4m3 with a float32 scale per row: the copy of K that `kcache.scoring_keys="fp8"`
keeps in device memory to score and pick the far positions (the exact K lives in host memory), and
the V rows that `kcache.host_values="fp8"` keeps in host memory (their scales in device memory).

A row (one position of one KV head, head_dim values) is divided by amax / 448 (448 is e4m3's
largest finite value, so the row's largest magnitude lands on it exactly) and rounded to e4m3;
multiplying back by the scale restores it within e4m3's precision: 1/16 of the value (3 mantissa
bits), or 2^-10 of the scale for values under 2^-6 of it (e4m3's subnormals).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_DTYPE = torch.float32


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., D] (any float dtype) -> (fp8 rows [..., D] float8_e4m3fn, scales [...] float32)."""
    scales = rows.float().abs().amax(-1).clamp(min=torch.finfo(SCALE_DTYPE).tiny) / FP8_MAX
    return (rows.float() / scales[..., None]).to(FP8_DTYPE), scales


def dequantize_rows(fp8_rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(fp8 rows [..., D], scales [...]) -> rows [..., D] float32."""
    return fp8_rows.float() * scales[..., None]


def fp8_rounded(rows: torch.Tensor) -> torch.Tensor:
    """rows [..., D] as the fp8 copy holds them: quantized and back, in rows' dtype."""
    return dequantize_rows(*quantize_rows(rows)).to(rows.dtype)
