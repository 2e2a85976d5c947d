"""benchmarks/host_step.py on a tiny batch: every sequence decodes together, and the block-table
delta sent to the workers is smaller than the whole plan."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import host_step  # noqa: E402


def test_host_step_runs_on_a_small_batch(tmp_path):
    out = tmp_path / "host_step.json"
    result = host_step.main(["--batch", "6", "--prompt-tokens", "1000", "--max-model-len", "1100", "--steps", "3",
                             "--out", str(out)])
    assert result["batch"] == 6 and result["blocks_per_table"] == 63  # 1000 + 5 decoded tokens in 16-token blocks
    assert 0 < result["decode_step_ms"]["min"] <= result["decode_step_ms"]["median"]
    assert result["plan_bytes"]["block_table_delta"] < result["plan_bytes"]["whole"]
    assert out.exists()
