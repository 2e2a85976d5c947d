"""The KCache method on one device, testable alone: scores over all cached K, exact softmax,
per-KV-head top-N selection of far positions, and attention over the selected V rows plus the
sink and the recent window. `reference.py` is the pure-torch definition; kernels must match it."""
