"""PyramidKV: SnapKV's selection with budgets decreasing with depth (a pyramid).

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache
Compression based on Pyramidal Information Funneling" (2024), Sec. 3.2; official code
Zefan-Cai/KVCache-Factory (``PyramidKVCluster``); kvpress's ``PyramidKVPress`` (beta 20).

With m layers and an average budget a = L (1 - ratio) tokens per (batch, KV head), the top
layer keeps k_{m-1} = a / beta and the bottom k_0 = 2a - k_{m-1}, the layers between on the
arithmetic sequence

    k_l = k_0 - l (k_0 - k_{m-1}) / (m - 1)      (rounded; the mean over layers is a)

(when k_0 would exceed L: k_0 = L and k_{m-1} = 2a - L, so the mean stays a; one layer: a).
Each layer keeps its k_l tokens by SnapKV's votes (``methods.snapkv``: observation window 64,
kernel 5, average pooling). The layer is ``layer_idx`` of ``num_layers`` (hyperparameters:
runner=decode measures one layer; a model sets ``layer_idx`` per layer).
"""
from __future__ import annotations

from methods.snapkv import SnapKV


class PyramidKV(SnapKV):
    name = "pyramidkv"
    # what the README's method table says (python -m analysis.readme)
    paper = "Cai et al. 2024"
    official_test = None

    def __init__(self, ratio: float = 0.5, beta: float = 20.0, num_layers: int = 32, layer_idx: int = 0,
                 window_size: int = 64, kernel_size: int = 5, pooling: str = "avg", impl: str = "reference",
                 **structural):
        super().__init__(ratio=ratio, window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                         impl=impl, **structural)
        if beta < 1 or num_layers < 1 or not 0 <= layer_idx < num_layers:
            raise ValueError(f"PyramidKV: beta must be >= 1, num_layers >= 1 and 0 <= layer_idx < num_layers, "
                             f"got {beta}, {num_layers}, {layer_idx}")
        self.beta, self.num_layers, self.layer_idx = float(beta), int(num_layers), int(layer_idx)

    def decode_params(self) -> dict:
        return {**super().decode_params(), "beta": self.beta, "num_layers": self.num_layers,
                "layer_idx": self.layer_idx}

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        a = length * (1.0 - self.ratio)
        m, layer = self.num_layers, self.layer_idx if layer_idx is None else int(layer_idx)
        if m == 1:
            return max(1, int(a))
        lo = a / self.beta
        hi = 2 * a - lo
        if hi > length:
            hi, lo = float(length), 2 * a - length
        return max(1, min(length, round(hi - layer * (hi - lo) / (m - 1))))


__all__ = ["PyramidKV"]
