"""StreamingLLM as a press: after the prefill each KV head keeps the first ``num_sink`` tokens
(the attention sinks) and the most recent ones, n = max(1, int(L (1 - ratio))) in all.

Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks"
(ICLR 2024), Sec. 3.2; kvpress's ``StreamingLLMPress`` (n_sink 4, the official start_size).
Unlike ``methods.streaming_llm`` (a fixed window, a rolling buffer at every step, and the same
pattern in the prefill) the prefill here is exact and the budget is a share of the prompt;
decode tokens are appended and kept.
"""
from __future__ import annotations

import torch

from methods.decode import KVCache
from methods.press import Press


class StreamingLLMPress(Press):
    name = "streaming_llm_press"
    # what the README's method table says (python -m analysis.readme)
    paper = "Xiao et al. 2024"
    kind = "KV-cache compression (press): sinks + recent, training-free"
    official_test = None

    def __init__(self, ratio: float = 0.5, num_sink: int = 4, impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        if num_sink < 0:
            raise ValueError(f"StreamingLLMPress: num_sink must be >= 0, got {num_sink}")
        self.num_sink = int(num_sink)

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "num_sink": self.num_sink}

    def scores(self, cache: KVCache, q) -> torch.Tensor:
        L = cache.length
        s = torch.arange(L, dtype=torch.float32, device=cache.device)  # more recent ranks higher
        s[:min(self.num_sink, L)] = float("inf")
        return s.expand(cache.batch, cache.num_kv_heads, L)


__all__ = ["StreamingLLMPress"]
