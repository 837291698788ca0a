"""Random eviction: the floor every press is measured against (kvpress's ``RandomPress``).

Each (batch, KV head) keeps n = max(1, int(L (1 - ratio))) of its L prefill tokens drawn
uniformly without replacement (a generator seeded by ``seed`` and the layer index, so a run
is repeatable and the heads draw independently).
"""
from __future__ import annotations

import torch

from methods.decode import KVCache
from methods.press import Press


class RandomPress(Press):
    name = "random_press"
    # what the README's method table says (python -m analysis.readme)
    paper = "- (baseline)"
    kind = "KV-cache compression (press): random eviction, the floor"
    official_test = None

    def __init__(self, ratio: float = 0.5, seed: int = 0, impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        self.seed = int(seed)

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "seed": self.seed}

    def scores(self, cache: KVCache, q) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1000003 * int(self.layer_idx))
        return torch.rand(cache.batch, cache.num_kv_heads, cache.length, generator=g).to(cache.device)


__all__ = ["RandomPress"]
