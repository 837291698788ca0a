"""PyramidKV: SnapKV's selection with budgets decreasing with depth (a pyramid).

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache
Compression based on Pyramidal Information Funneling" (2024), Sec. 3.2; official code
Zefan-Cai/KVCache-Factory (``pyramidkv_utils.py``); the budget as kvpress's ``PyramidKVPress``
computes it (defaults beta 20, window 64, kernel 5), which always applies the ratio.

With m layers, L prefill tokens, observation window w and a = L (1 - ratio) (the average
budget), the top layer's share is min = a / beta and the bottom's max = 2a - min; when
max >= L - w, max = L - w and min = 2a - max. Layer l keeps

    k_l = round(max - l (max - min) / (m - 1))          (one layer: round(max))

tokens, the mean over layers a; when not L >= max >= min >= w (short prompts, a large
beta) every layer keeps max(1, round(a)), SnapKV's budget (kvpress's fallback). Each layer
keeps its k_l tokens by SnapKV's votes (``methods.snapkv``: the window first). The layer is
``layer_idx`` of ``num_layers`` (hyperparameters: runner=decode measures one layer; inside a model,
``models.hf_decode`` sets both per layer from the model: ``set_layer``).
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

    def set_layer(self, layer_idx: int, num_layers: int) -> None:
        """Layer ``layer_idx`` of a model of ``num_layers`` layers (the model's count replaces the
        config's ``num_layers``: the pyramid spans the model's depth)."""
        if int(num_layers) < 1:
            raise ValueError(f"PyramidKV: num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        super().set_layer(layer_idx, num_layers)

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        a, w = length * (1.0 - self.ratio), self.window_size
        m, layer = self.num_layers, self.layer_idx if layer_idx is None else int(layer_idx)
        lo = a / self.beta
        hi = 2 * a - lo
        if hi >= length - w:
            hi = length - w
            lo = 2 * a - hi
        if not (length >= hi >= lo >= w):
            return max(1, round(a))
        steps = (hi - lo) / (m - 1) if m > 1 else 0.0
        return max(1, round(hi - layer * steps))


__all__ = ["PyramidKV"]
