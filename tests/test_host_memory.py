"""Host-memory placement helpers: the GPU's NUMA node from sysfs, binding and locating pages."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch

from kcache_dist.cache.host_pool import HostPool
from kcache_dist.cache.numa import bind_to_node, node_from_sysfs, pages_per_node


def test_node_from_sysfs(tmp_path):
    dev = tmp_path / "bus/pci/devices/0000:3b:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("1\n")
    assert node_from_sysfs("0000:3b:00.0", str(tmp_path)) == 1
    (dev / "numa_node").write_text("-1\n")  # one-node machines report -1
    assert node_from_sysfs("0000:3b:00.0", str(tmp_path)) is None
    assert node_from_sysfs("0000:00:00.0", str(tmp_path)) is None


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/node/node0"), reason="no NUMA node 0 in sysfs")
def test_bound_pages_land_on_the_node():
    size = 64 * mmap.PAGESIZE
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    bind_to_node(address, size, 0)
    mapping.write(b"\x01" * size)  # first touch places the pages
    assert pages_per_node(address, size) == {0: 64}
    with pytest.raises(OSError, match="mbind of 4096 bytes to NUMA node 63 failed"):
        bind_to_node(address, 4096, 63)  # not a node of this machine


def test_cpu_pool_views_are_aligned_and_bounded():
    shape = (3, 2, 5, 7)
    pool = HostPool(HostPool.bytes_for([shape, shape], torch.bfloat16), torch.device("cpu"))
    a, b = pool.take(shape, torch.bfloat16), pool.take(shape, torch.bfloat16)
    assert a.shape == b.shape == shape and b.data_ptr() - a.data_ptr() == 4096 and not pool.pinned
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.sum() == a.numel()
    with pytest.raises(ValueError, match="host pool of 8192 bytes cannot hold another 420 bytes"):
        pool.take(shape, torch.bfloat16)


def test_available_host_bytes(tmp_path):
    from kcache_dist.cache.host_pool import available_host_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n")
    assert available_host_bytes(str(meminfo)) == 2048 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert available_host_bytes(str(meminfo)) is None
    assert available_host_bytes(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("huge_pages", [True, False])
def test_pool_mapping_for_huge_pages(monkeypatch, huge_pages):
    """The pinned-pool path with CUDA's register call stubbed (it runs on any machine): advised for
    huge pages, the buffer starts on a 2 MiB boundary, views still work, and the smaps reading of
    its huge-page backing is a number (0 where the kernel gave none)."""
    import kcache_dist.cache.host_pool as host_pool

    registered = []
    monkeypatch.setattr(host_pool, "_register", lambda address, num_bytes: registered.append((address, num_bytes)) or 0)
    monkeypatch.setattr(host_pool, "_unregister", lambda address, mapping: None)
    monkeypatch.setattr(host_pool, "gpu_numa_node", lambda index: None)
    num_bytes = 6 * host_pool.HUGE_PAGE_BYTES + 4096
    pool = HostPool(num_bytes, torch.device("cuda", 0), huge_pages=huge_pages)
    address = pool._buffer.data_ptr()
    assert pool.pinned and registered == [(address, num_bytes)]
    assert pool.huge_pages == (huge_pages and hasattr(mmap, "MADV_HUGEPAGE"))
    if pool.huge_pages:
        assert address % host_pool.HUGE_PAGE_BYTES == 0
    view = pool.take((3, host_pool.HUGE_PAGE_BYTES // 2), torch.bfloat16)
    view.fill_(3.0)
    assert view.float().mean().item() == 3.0
    backed = pool.huge_page_bytes()
    assert backed is None or 0 <= backed <= num_bytes + host_pool.HUGE_PAGE_BYTES
    print("huge-page backed bytes:", backed)
    pool.close()


def test_pool_that_cannot_be_bound_to_its_node_says_so_and_works(monkeypatch, caplog):
    """A refused mbind (some containers' seccomp profiles) leaves the pool unbound with a warning
    (numa_node None), and a machine whose mbind number is unknown too; the pool still works."""
    import kcache_dist.cache.host_pool as host_pool

    monkeypatch.setattr(host_pool, "_register", lambda address, num_bytes: 0)
    monkeypatch.setattr(host_pool, "_unregister", lambda address, mapping: None)
    monkeypatch.setattr(host_pool, "gpu_numa_node", lambda index: 1)

    def refused(address, num_bytes, node):
        raise OSError(1, f"mbind of {num_bytes} bytes to NUMA node {node} failed: Operation not permitted")

    for bind, warning in ((refused, "not bound to the GPU's NUMA node 1 ([Errno 1] mbind of 8192 bytes to NUMA node 1 "
                                    "failed: Operation not permitted)"), (lambda *a: False, None)):
        monkeypatch.setattr(host_pool, "bind_to_node", bind)
        caplog.clear()
        with caplog.at_level("WARNING", logger=host_pool.logger.name):
            pool = HostPool(2 * 4096, torch.device("cuda", 0), huge_pages=False)
        assert pool.numa_node is None and pool.pinned
        assert (warning is None) or any(warning in r.getMessage() for r in caplog.records)
        view = pool.take((2, 4096), torch.uint8)
        view.fill_(7)
        assert int(view.sum()) == 7 * 8192
        pool.close()
