"""benchmarks/host_budget.py: `--host-memory-gb auto` and its argument checks."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from host_budget import AUTO, auto_host_memory_gb, host_memory_gb_arg, resolve_host_memory_gb  # noqa: E402

GIB = 1 << 30


def test_argument_takes_auto_or_a_positive_number():
    assert host_memory_gb_arg("auto") == AUTO
    assert host_memory_gb_arg("12.5") == 12.5
    for bad in ("0", "-3", "nan", "lots"):
        with pytest.raises(argparse.ArgumentTypeError) as info:
            host_memory_gb_arg(bad)
        assert str(info.value) == f"expected 'auto' or a number of GiB > 0, got {bad!r}"


def test_auto_is_a_fraction_of_the_node_split_over_its_ranks():
    # No GPU: the node is unknown, so all 4 local ranks share it: 0.8 x 100 GiB / 4 = 20 GiB.
    assert auto_host_memory_gb(None, 4, node_available_bytes=100 * GIB) == 20
    assert auto_host_memory_gb(None, 1, node_available_bytes=100 * GIB) == 80
    assert auto_host_memory_gb(None, 3, node_available_bytes=10 * GIB) == 2  # 2.67 GiB, whole GiB down
    assert auto_host_memory_gb(None, 8, node_available_bytes=GIB) == 1  # never below 1 GiB


def test_resolve_keeps_numbers_and_sizes_auto_from_this_machine():
    from kcache_dist.cache.host_pool import available_host_bytes
    from kcache_dist.parallel import init_parallel, shutdown_parallel

    cpu = torch.device("cpu")
    assert resolve_host_memory_gb(7.0, cpu) == 7.0
    init_parallel(1, device_type="cpu")
    try:
        before = available_host_bytes()
        got = resolve_host_memory_gb(AUTO, cpu)
        after = available_host_bytes()
    finally:
        shutdown_parallel()
    low, high = sorted((before, after))
    assert int(0.8 * low) // GIB - 1 <= got <= int(0.8 * high) // GIB + 1
