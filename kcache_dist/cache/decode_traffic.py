"""The bytes one decode step must move on one rank, and the step time they allow (its roofline).

A decode step reads, on each rank:

    HBM   the weights it multiplies with (`weight_bytes`: every weight matrix, the LM head included,
          not the embedding table, of which it reads only the new tokens' rows), and per sequence
          of length L (the positions attended, the new token included):
            full mode     K and V of every layer:                      2 x layers x L rows
            kcache mode   K of every layer:                            layers x L rows
                          V of the dense layers:                       dense_layers x L rows
                          V of the sink + window of the sparse layers: sparse x hot(L) rows
    PCIe  kcache mode only: the far V rows chosen, from host memory:   sparse x min(top_n, far(L)) rows

and with fp8 scoring keys (`CacheGeometry.fp8_scoring_keys`) a sparse layer's K is read as float8
and a scale per KV head (`sparse_k_bytes_per_token`), the sink + window rows as K and V, and the far
rows fetched as K | V (2 rows each); with fp8 host values (`CacheGeometry.fp8_host_values`) a far
V row is one byte an element (its scale, 4 bytes per KV head read from HBM, is left out);
with a row = one token of one layer's K or V on this rank (num_kv_heads x head_dim x dtype bytes),
hot(L) = the sink and window positions of L, far(L) = the others (`SelectionSpec.split`). This is
the ideal: each byte read once; scores, the selection's scratch, the fetched rows' second read from
HBM and the new token's K/V writes are left out (they are small, or overheads a kernel should hide).

roofline = max(HBM bytes / HBM bandwidth, PCIe bytes / host-to-device bandwidth): the step cannot
be faster than either stream, and can be as fast as the slower one if the two overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..kcache.selection import SelectionSpec
from .planner import CacheGeometry


@dataclass(frozen=True)
class DecodeStepBytes:
    """Bytes of one decode step on one rank, by what they are.

    weight_bytes: weights read (HBM). k_bytes: K of every layer over each sequence's context (HBM).
    dense_v_bytes: V of the layers that keep V in device memory — every layer in full mode (HBM).
    hot_v_bytes: sink + window V rows of the sparse layers, with their K under fp8 scoring keys
    (HBM). far_v_bytes: far V rows fetched from host memory, K | V rows under fp8 scoring keys (PCIe).
    """

    weight_bytes: int
    k_bytes: int
    dense_v_bytes: int
    hot_v_bytes: int
    far_v_bytes: int

    @property
    def hbm_bytes(self) -> int:
        return self.weight_bytes + self.k_bytes + self.dense_v_bytes + self.hot_v_bytes

    @property
    def pcie_bytes(self) -> int:
        return self.far_v_bytes

    def roofline_s(self, hbm_bytes_per_s: float, pcie_bytes_per_s: float) -> float:
        """The shortest step the two bandwidths allow: max(HBM time, PCIe time)."""
        return max(self.hbm_bytes / hbm_bytes_per_s, self.pcie_bytes / pcie_bytes_per_s if self.pcie_bytes else 0.0)

    def bound_by(self, hbm_bytes_per_s: float, pcie_bytes_per_s: float) -> str:
        """"hbm" or "pcie": which stream sets the roofline."""
        pcie_s = self.pcie_bytes / pcie_bytes_per_s if self.pcie_bytes else 0.0
        return "pcie" if pcie_s > self.hbm_bytes / hbm_bytes_per_s else "hbm"


def decode_step_bytes(geometry: CacheGeometry, weight_bytes: int, seq_lens: Sequence[int],
                      spec: SelectionSpec) -> DecodeStepBytes:
    """Bytes a decode step of len(seq_lens) sequences moves on one rank.

    geometry: this rank's cache (mode, layers, dense layers, KV heads of this rank, head_dim, dtype
    bytes). weight_bytes: weight bytes the step reads on this rank. seq_lens [B]: positions each
    sequence attends this step, the new token included. spec: top_n, sink and window (kcache mode;
    ignored in full mode).
    """
    row = geometry.row_bytes
    total_len = sum(seq_lens)
    if geometry.mode == "full":
        k = geometry.num_layers * total_len * row
        return DecodeStepBytes(weight_bytes, k, geometry.num_layers * total_len * row, 0, 0)
    sparse = geometry.num_sparse_layers
    k = total_len * (geometry.dense_layers * row + sparse * geometry.sparse_k_bytes_per_token)
    hot_row = geometry.host_rows_per_token * row  # V, or K | V, in the model's dtype on the device
    far_row = geometry.host_row_bytes  # as the host pool holds it
    hot_rows = far_rows = 0
    for length in seq_lens:
        sink_end, window_start = spec.split(length)
        hot_rows += sink_end + (length - window_start)
        far_rows += min(spec.top_n, window_start - sink_end)
    return DecodeStepBytes(weight_bytes=weight_bytes, k_bytes=k, dense_v_bytes=geometry.dense_layers * total_len * row,
                           hot_v_bytes=sparse * hot_rows * hot_row, far_v_bytes=sparse * far_rows * far_row)
