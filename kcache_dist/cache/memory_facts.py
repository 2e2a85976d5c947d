"""The facts the memory planner needs, read on this process: GPU memory, the GPU's NUMA node,
that node's available memory, the locked-memory limit and how many local ranks share the node.

Every reader works on a machine without a GPU and returns None where a fact does not apply; the
readers of files take `sysfs_root` / `proc_root`, so tests can point them at fake trees.

GPU memory: `torch.cuda.mem_get_info` (what the CUDA allocator will meet). NVML's figures, read
by PCI bus id where the library loads, are kept beside it as a cross-check: a gap in free memory
is logged, and the planner uses torch's. The totals differ by design (on an H100, NVML said
85520809984 bytes, torch 85017493504: NVML counts memory the driver reserves); free agreed to
the byte.

Available memory of the GPU's node, the choice made here:
  * one node with memory (or the GPU's node unknown): /proc/meminfo MemAvailable, the kernel's
    own estimate of what can be allocated without swapping. The per-node sysfs file adds nothing
    there, and in sandboxed kernels it can disagree with /proc/meminfo (a 24 GB machine was seen
    reporting an 8 GB node 0).
  * several nodes: /sys/devices/system/node/node<N>/meminfo MemFree + Active(file) +
    Inactive(file) + SReclaimable — free pages plus the page cache and slab the kernel can
    reclaim on that node (shmem sits on the anonymous lists, so it is not counted) — capped by
    MemAvailable, since a node cannot give more than the machine.
  Readings are a snapshot. Where memory is added after boot (MemTotal starts small and grows, as
  on the H200 machines), read the facts as late as possible: after the weights are loaded, just
  before planning.

Locked memory: the soft RLIMIT_MEMLOCK of this process (None when unlimited). It is a
per-process limit, so the planner does not split it among ranks; it only counts when the knob
`memlock_limits_pinning` says the pool's pinning is charged to it (cudaHostRegister was measured
not to be: see planner.py).

Ranks sharing the node: local rank r is taken to drive CUDA device r (as `init_parallel` sets it).
A local rank whose GPU's node cannot be read (e.g. each process sees only its own GPU through
CUDA_VISIBLE_DEVICES) is counted as sharing the node: fewer bytes per rank, never more.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from typing import Callable, Optional

from .host_pool import available_host_bytes
from .numa import gpu_numa_node, pci_bus_id
from .planner import DeviceMemoryFacts, HostMemoryFacts

logger = logging.getLogger(__name__)

# torch and NVML read free memory at different moments and NVML counts some driver reservations
# differently; a gap beyond this is worth a warning (something else is allocating, or the two
# calls see different devices, e.g. under MIG).
NVML_FREE_GAP_WARNING_BYTES = 512 << 20
NODE_RECLAIMABLE_FIELDS = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")


@dataclass(frozen=True)
class GpuMemoryReading:
    """One device's memory as torch sees it, with NVML's reading where available (else None)."""

    total_bytes: int
    free_bytes: int
    nvml_total_bytes: Optional[int] = None
    nvml_free_bytes: Optional[int] = None


def _nvml_memory(device_index: int) -> Optional[tuple[int, int]]:
    """(total, free) bytes of the device from NVML, or None (no library, no driver, no match)."""
    bus_id = pci_bus_id(device_index)
    if bus_id is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound on machines without a GPU driver
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByPciBusId(f"0000{bus_id}".upper())  # NVML: 8-digit domain
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def read_gpu_memory(device_index: int) -> Optional[GpuMemoryReading]:
    """Total and free bytes of CUDA device `device_index` now; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free_bytes, total_bytes = torch.cuda.mem_get_info(device_index)
    nvml = _nvml_memory(device_index)
    reading = GpuMemoryReading(int(total_bytes), int(free_bytes), *(nvml or (None, None)))
    if nvml is not None and abs(nvml[1] - free_bytes) > NVML_FREE_GAP_WARNING_BYTES:
        logger.warning("cuda:%d free memory: torch says %d bytes, NVML %d bytes; planning with torch's",
                       device_index, free_bytes, nvml[1])
    return reading


def device_memory_facts(device_index: int, weight_bytes: int,
                        activation_peak_bytes: int) -> Optional[DeviceMemoryFacts]:
    """This rank's `DeviceMemoryFacts` (read free memory after the weights are loaded and the
    profiled forward ran, with `torch.cuda.empty_cache()` called); None without CUDA."""
    reading = read_gpu_memory(device_index)
    if reading is None:
        return None
    return DeviceMemoryFacts(total_bytes=reading.total_bytes, free_bytes=reading.free_bytes,
                             weight_bytes=int(weight_bytes), activation_peak_bytes=int(activation_peak_bytes),
                             device_index=device_index)


def cpu_device_facts(cache_budget_bytes: int) -> DeviceMemoryFacts:
    """Facts for a run on the CPU, where the "device" cache budget is a fixed number of bytes
    (`cpu_kv_cache_gb`): plan with gpu_memory_utilization=1 so the budget is exactly this."""
    return DeviceMemoryFacts(total_bytes=int(cache_budget_bytes), free_bytes=int(cache_budget_bytes),
                             weight_bytes=0, activation_peak_bytes=0, device_index=-1)


def _parse_node_list(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5) (the kernel's list format)."""
    nodes: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        nodes.extend(range(int(first), int(last or first) + 1))
    return tuple(nodes)


def nodes_with_memory(sysfs_root: str = "/sys") -> Optional[tuple[int, ...]]:
    """NUMA nodes that have memory (has_memory, else online), or None where sysfs does not say."""
    base = os.path.join(sysfs_root, "devices/system/node")
    for name in ("has_memory", "online"):
        try:
            with open(os.path.join(base, name)) as f:
                return _parse_node_list(f.read())
        except (OSError, ValueError):
            continue
    return None


def read_node_meminfo(node: int, sysfs_root: str = "/sys") -> Optional[dict[str, int]]:
    """The kB fields of /sys/devices/system/node/node<N>/meminfo, in bytes ({"MemFree": ...});
    None if the file is missing."""
    path = os.path.join(sysfs_root, f"devices/system/node/node{node}/meminfo")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in lines:
        words = line.split()  # "Node 0 MemFree: 4989896 kB"
        if len(words) == 5 and words[4] == "kB" and words[2].endswith(":"):
            fields[words[2][:-1]] = int(words[3]) * 1024
    return fields


def node_available_bytes(node: Optional[int], sysfs_root: str = "/sys", proc_root: str = "/proc") -> Optional[int]:
    """Bytes NUMA node `node` can still give (see the module docstring for the choice); None
    when neither sysfs nor /proc says."""
    machine_available = available_host_bytes(os.path.join(proc_root, "meminfo"))
    nodes = nodes_with_memory(sysfs_root)
    if node is None or nodes is None or len(nodes) <= 1:
        return machine_available
    fields = read_node_meminfo(node, sysfs_root)
    if not fields or "MemFree" not in fields:
        return machine_available
    node_estimate = sum(fields.get(name, 0) for name in NODE_RECLAIMABLE_FIELDS)
    return node_estimate if machine_available is None else min(node_estimate, machine_available)


def memlock_limit_bytes() -> Optional[int]:
    """Soft RLIMIT_MEMLOCK of this process in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def ranks_sharing_node(numa_node: Optional[int], local_world_size: int,
                       node_of_local_rank: Callable[[int], Optional[int]]) -> int:
    """Local ranks whose GPU hangs off `numa_node` (this rank included). With the node unknown,
    all local ranks; a rank whose node is unknown counts as sharing."""
    if numa_node is None:
        return local_world_size
    count = sum(1 for r in range(local_world_size) if node_of_local_rank(r) in (None, numa_node))
    return max(1, count)


def _gpu_numa_node_or_none(device_index: int) -> Optional[int]:
    try:
        return gpu_numa_node(device_index)
    except Exception:  # a device this process cannot see
        return None


def host_memory_facts(device_index: Optional[int], local_world_size: int = 1, sysfs_root: str = "/sys",
                      proc_root: str = "/proc",
                      node_of_device: Callable[[int], Optional[int]] = _gpu_numa_node_or_none) -> HostMemoryFacts:
    """This rank's `HostMemoryFacts`. device_index: its CUDA device (None on CPU: node unknown).
    local_world_size: ranks on this host, local rank r driving device r. node_of_device: the NUMA
    node of a CUDA device (tests inject one)."""
    numa_node = node_of_device(device_index) if device_index is not None else None
    sharing = ranks_sharing_node(numa_node, local_world_size, node_of_device)
    return HostMemoryFacts(numa_node=numa_node, node_available_bytes=node_available_bytes(numa_node, sysfs_root,
                                                                                          proc_root),
                           memlock_limit_bytes=memlock_limit_bytes(), ranks_on_node=sharing)


def gather_memory_facts(device_index: Optional[int], weight_bytes: int, activation_peak_bytes: int,
                        local_world_size: Optional[int] = None) -> tuple[Optional[DeviceMemoryFacts], HostMemoryFacts]:
    """Both facts of this rank. local_world_size None: from `kcache_dist.parallel.current_state()`.
    The device facts are None without CUDA (use `cpu_device_facts` there)."""
    if local_world_size is None:
        from ..parallel import current_state

        local_world_size = current_state().local_world_size
    device = None
    if device_index is not None:
        device = device_memory_facts(device_index, weight_bytes, activation_peak_bytes)
    host = host_memory_facts(device_index if device is not None else None, local_world_size)
    logger.info("memory facts: %s; %s", device, host)
    return device, host
