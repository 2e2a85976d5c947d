"""Host memory for V: page-locked (pinned) and placed on the NUMA node of the rank's GPU.

The buffer is an anonymous mapping bound to the node before its pages are touched, then
registered with CUDA (cudaHostRegister), which pins it and makes it readable by GPU kernels and
copy engines. By default the mapping is 2 MiB-aligned and advised for transparent huge pages
(madvise MADV_HUGEPAGE) before the first touch. Measured on an H200 host (benchmarks/notes/
kcache_triton.md, run 3): the 8.6 GB pool was backed by huge pages in full and was created 1.5-2x
faster, but the zero-copy V gather ran the same as from 4 KiB pages (its slowdown on large pools is
not the host page size). Where the kernel gives no huge pages the pool works with 4 KiB pages.
Without CUDA the pool is ordinary memory, said once in the log.
"""

from __future__ import annotations

import logging
import math
import mmap
import weakref
from typing import Optional

import torch

from .numa import bind_to_node, gpu_numa_node

logger = logging.getLogger(__name__)
GIB = 1 << 30
HUGE_PAGE_BYTES = 2 << 20
_said_unpinned = False


class HostPool:
    """One host buffer, viewed as tensors by `take(shape)` in order. `pinned` says whether CUDA
    registered it; `numa_node` is the node its pages were bound to (None if unbound); `huge_pages`
    whether the buffer was advised for transparent huge pages (`huge_page_bytes()` says how much of
    it the kernel backed with them)."""

    def __init__(self, num_bytes: int, device: torch.device, huge_pages: bool = True):
        global _said_unpinned
        self.num_bytes = num_bytes
        self.numa_node: Optional[int] = None
        self.pinned = False
        self.huge_pages = False
        self._offset = 0
        if device.type != "cuda":
            if not _said_unpinned:
                logger.info("no CUDA device: the host V pool is ordinary (unpinned, unbound) memory")
                _said_unpinned = True
            self._mapping = None
            self._buffer = torch.empty(num_bytes, dtype=torch.uint8)
            return
        available = available_host_bytes()
        if available is not None and num_bytes > available:
            raise RuntimeError(f"the host V pool needs {num_bytes / GIB:.2f} GiB but only {available / GIB:.2f} GiB "
                               "of host memory is available; lower host_memory_gb, max_num_seqs or max_model_len")
        want_huge = huge_pages and hasattr(mmap, "MADV_HUGEPAGE")
        span = -(-max(num_bytes, 1) // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        self._mapping = mmap.mmap(-1, span + HUGE_PAGE_BYTES if want_huge else max(num_bytes, 1),
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(self._mapping, dtype=torch.uint8)
        start = 0
        if want_huge:
            start = -whole.data_ptr() % HUGE_PAGE_BYTES  # a multiple of the 4 KiB page: the mapping is page-aligned
            try:
                self._mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
                self.huge_pages = True
            except OSError as ex:
                logger.info("host V pool: no transparent huge pages (madvise: %s); 4 KiB pages", ex)
        self._buffer = whole[start:start + num_bytes]
        address = self._buffer.data_ptr()
        node = gpu_numa_node(device.index if device.index is not None else torch.cuda.current_device())
        if node is not None:
            try:
                self.numa_node = node if bind_to_node(address, num_bytes, node) else None
            except OSError as error:  # e.g. a container whose seccomp profile refuses mbind
                logger.warning("host V pool: not bound to the GPU's NUMA node %d (%s); its pages go where they are "
                               "first touched, possibly on another node (in a container, allow mbind, e.g. with "
                               "CAP_SYS_NICE)", node, error)
        self._buffer.fill_(0)  # first touch: the pages are placed now, under the binding
        err = _register(address, num_bytes)
        if err != 0:
            raise RuntimeError(f"pinning {num_bytes / GIB:.2f} GiB of host memory for the V pool failed "
                               f"(cudaHostRegister error {err}); lower host_memory_gb, max_num_seqs or "
                               "max_model_len, or raise the locked-memory limit (ulimit -l)")
        self.pinned = True
        # Unregister before the mapping goes: a new mapping at the same address could not be registered.
        self._finalizer = weakref.finalize(self, _unregister, address, self._mapping)
        logger.info("host V pool: %.2f GiB pinned on NUMA node %s%s", num_bytes / GIB, self.numa_node,
                    ", advised for huge pages" if self.huge_pages else "")

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next `shape` tensor of the buffer (aligned to 4 KiB)."""
        num_bytes = math.prod(shape) * dtype.itemsize
        start = -(-self._offset // 4096) * 4096
        if start + num_bytes > self.num_bytes:
            raise ValueError(f"host pool of {self.num_bytes} bytes cannot hold another {num_bytes} bytes")
        self._offset = start + num_bytes
        return self._buffer[start:start + num_bytes].view(dtype).view(shape)

    @property
    def buffer(self) -> torch.Tensor:
        """The whole pool as a flat uint8 tensor: the tensors `take` hands out are views of it."""
        return self._buffer

    @staticmethod
    def bytes_for(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
        """Buffer size that `take` needs for these shapes, alignment included."""
        return sum(-(-math.prod(s) * dtype.itemsize // 4096) * 4096 for s in shapes)

    def huge_page_bytes(self, smaps_path: str = "/proc/self/smaps") -> Optional[int]:
        """Bytes of the buffer's mapping backed by transparent huge pages (AnonHugePages of the
        mappings that overlap it), or None where the kernel does not say."""
        if self._mapping is None:
            return 0
        lo = self._buffer.data_ptr()
        hi = lo + self.num_bytes
        total, overlaps = 0, False
        try:
            with open(smaps_path) as f:
                for line in f:
                    head = line.split(None, 1)[0] if line.strip() else ""
                    if "-" in head and not head.endswith(":"):
                        a, _, b = head.partition("-")
                        overlaps = int(a, 16) < hi and int(b, 16) > lo
                    elif overlaps and head == "AnonHugePages:":
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return total

    @property
    def address(self) -> int:
        """Where the pool starts in this process's address space."""
        return self._buffer.data_ptr()

    def close(self) -> None:
        """Unpin now (also done when the pool is collected)."""
        if self.pinned:
            self._finalizer()
            self.pinned = False


def available_host_bytes(meminfo_path: str = "/proc/meminfo") -> Optional[int]:
    """MemAvailable in bytes, or None where the kernel does not say."""
    try:
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _register(address: int, num_bytes: int) -> int:
    """Pin [address, address + num_bytes) for CUDA; the CUDA error code (0 = success)."""
    return int(torch.cuda.cudart().cudaHostRegister(address, num_bytes, 0))


def _unregister(address: int, mapping: mmap.mmap) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
