"""NUMA placement: which node a GPU hangs off, and binding a host buffer's pages to a node.

The GPU's node comes from NVML's memory affinity, else from sysfs
(/sys/bus/pci/devices/<bus id>/numa_node); None when neither knows (one-node machines often say -1).
Binding uses the mbind system call with MPOL_PREFERRED, so pages go to that node while it has
room and an exhausted node does not crash the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Optional

logger = logging.getLogger(__name__)

MPOL_PREFERRED = 1
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}


def pci_bus_id(device_index: int) -> Optional[str]:
    """'0000:3b:00.0' (sysfs spelling) of a CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def node_from_nvml(bus_id: str) -> Optional[int]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver / library: the caller falls back to sysfs
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(f"0000{bus_id}".upper())
        words = pynvml.nvmlDeviceGetMemoryAffinity(handle, 4, pynvml.NVML_AFFINITY_SCOPE_NODE)
        nodes = [64 * w + b for w, word in enumerate(words) for b in range(64) if word >> b & 1]
        return nodes[0] if len(nodes) == 1 else None
    except Exception:
        return None


def node_from_sysfs(bus_id: str, sysfs_root: str = "/sys") -> Optional[int]:
    try:
        with open(os.path.join(sysfs_root, "bus/pci/devices", bus_id, "numa_node")) as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def gpu_numa_node(device_index: int) -> Optional[int]:
    """The NUMA node local to CUDA device `device_index`, or None if unknown or no CUDA."""
    bus_id = pci_bus_id(device_index)
    if bus_id is None:
        return None
    node = node_from_nvml(bus_id)
    return node if node is not None else node_from_sysfs(bus_id)


def bind_to_node(address: int, num_bytes: int, node: int) -> bool:
    """Ask the kernel to place the (not yet touched) pages of [address, address + num_bytes) on `node`.
    False (and a warning) where this machine's system call number is unknown; OSError if it fails."""
    if not 0 <= node < 64:
        raise ValueError(f"NUMA node {node} is outside the 0..63 this binding supports")
    number = _SYS_MBIND.get(platform.machine())
    if number is None:
        logger.warning("mbind: unknown system call number on %s; host pool left unbound", platform.machine())
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_ulong(1 << node)
    result = libc.syscall(number, ctypes.c_void_p(address), ctypes.c_ulong(num_bytes), MPOL_PREFERRED,
                          ctypes.byref(mask), ctypes.c_ulong(65), 0)  # the kernel reads maxnode - 1 bits
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind of {num_bytes} bytes to NUMA node {node} failed: {os.strerror(err)}")
    return True


def pages_per_node(address: int, num_bytes: int, sample_pages: int = 64) -> dict[int, int]:
    """Where pages of a buffer actually are: {node: pages} over up to `sample_pages` pages
    (move_pages with no target nodes only reports)."""
    page = os.sysconf("SC_PAGE_SIZE")
    count = max(1, min(sample_pages, num_bytes // page))
    step = max(page, (num_bytes // count) // page * page)
    pages = (ctypes.c_void_p * count)(*[address + i * step for i in range(count)])
    status = (ctypes.c_int * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    sys_move_pages = {"x86_64": 279, "aarch64": 239}.get(platform.machine())
    if sys_move_pages is None or libc.syscall(sys_move_pages, 0, ctypes.c_ulong(count), pages, None, status, 0) != 0:
        return {}
    counts: dict[int, int] = {}
    for s in status:
        counts[s] = counts.get(s, 0) + 1
    return counts
