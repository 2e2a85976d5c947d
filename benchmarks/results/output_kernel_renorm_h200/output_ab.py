"""Output kernel before/after the renormalising running-max change: same inputs, max difference and
device time (CUDA events, alternating, medians). Run from the repo root with the kernel before the
change (`git show 734ada9^:kcache_dist/kcache/triton_kcache.py`) saved as
kcache_dist/kcache/_old_triton_kcache.py: `python output_ab.py OUT_DIR`."""
import json, os, statistics, sys
import torch
from kcache_dist.kcache import triton_kcache as new
from kcache_dist.kcache import _old_triton_kcache as old
from kcache_dist.kcache.selection import SelectionSpec

dev = torch.device("cuda")
HKV, G, D, BS = 8, 4, 128, 256
res = []


def t(fn, n=20):
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    fn(); torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n


for B, C, top_n, renorm in [(157, 8192, 1024, True), (64, 32768, 1024, True), (32, 8192, 256, True), (157, 8192, 1024, False)]:
    torch.manual_seed(0)
    nb = B * C // BS
    kc = torch.randn(nb, HKV, BS, D, dtype=torch.bfloat16, device=dev)
    bt = torch.arange(nb, dtype=torch.int32, device=dev).view(B, -1)
    q = torch.randn(B, HKV * G, D, dtype=torch.bfloat16, device=dev)
    sl = torch.full((B,), C, dtype=torch.int64, device=dev)
    spec = SelectionSpec(top_n, 4, 128, renorm, "max")
    sel = new.score_and_select(q, kc, bt, sl, C, spec, D ** -0.5)
    vfar = torch.randn(B * HKV, top_n, D, dtype=torch.bfloat16, device=dev)
    vhot = torch.randn(B, HKV, 132, D, dtype=torch.bfloat16, device=dev)
    slots = torch.arange(B, device=dev)
    for parts in (1, 2):
        f_new = lambda: new.sparse_output(sel, vfar, vhot, sl, slots, spec, HKV * G, parts=parts)
        f_old = lambda: old.sparse_output(sel, vfar, vhot, sl, slots, spec, HKV * G, parts=parts)
        a, b = f_new().float(), f_old().float()
        diff = ((a - b).norm() / b.norm()).item()
        tn, to = [], []
        for _ in range(5):
            to.append(t(f_old)); tn.append(t(f_new))
        r = dict(B=B, C=C, top_n=top_n, renorm=renorm, parts=parts, rel_diff=diff, nan=bool(a.isnan().any()),
                 old_ms=statistics.median(to), new_ms=statistics.median(tn))
        r["new_over_old"] = r["new_ms"] / r["old_ms"]
        print(r, flush=True)
        res.append(r)
    del kc, sel, vfar
    torch.cuda.empty_cache()
json.dump(dict(card=torch.cuda.get_device_name(0), results=res), open(os.path.join(sys.argv[1], "output_ab.json"), "w"), indent=1)
