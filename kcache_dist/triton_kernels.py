"""The Triton kernel modules of the project where Triton is importable.

Each layer with a Triton kernel dispatches the same way: CUDA tensors (of the kinds the kernel
takes) go to the kernel module when it imports, everything else to the layer's torch reference.
`kernel_module` is that import, done once per module by Python's import system.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


def kernel_module(name: str) -> Optional[ModuleType]:
    """The module `kcache_dist.<name>` (e.g. "layers.triton_rmsnorm"), or None where it cannot be
    imported (no Triton): the caller's torch reference runs then."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
