"""StreamingLLM: attention sinks plus a rolling window of recent keys.

Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks"
(ICLR 2024), Sec. 3.2 and Fig. 4; official code mit-han-lab/streaming-llm (``StartRecentKVCache``,
``--start_size 4 --recent_size 2000``).

Each query at position i attends to the first ``num_sink`` tokens (the attention sinks) and to
the ``window`` most recent tokens, itself included:

    allowed(i, j) = j <= i  and  (j < num_sink  or  i - j < window)

At decode time the KV cache keeps exactly those tokens and evicts the rest (``SinkWindowDecode``:
a rolling buffer of num_sink + window slots), so the cache stays the same size however long the
stream; the prefill computes the same pattern (each prompt token sees what a streamed token
would), so that decoding at position i gives the prefill's row i. Defaults as the official code:
4 sinks, 2000 recent tokens. Causal only.

Not part of one attention layer: the paper assigns positions within the cache (RoPE applied to
the cached keys at their slot's position, not the text's); here q and k arrive with their
positions applied, as a model gives them.
"""
from __future__ import annotations

from methods import masks
from methods.base import Cost, SparseMethod
from methods.decode import SinkWindowDecode


class StreamingLLM(SinkWindowDecode, SparseMethod):
    name = "streaming_llm"
    # what the README's method table says (python -m analysis.readme)
    paper = "Xiao et al. 2024"
    kind = "sparse (sinks + window), training-free"
    official_test = None
    supports_noncausal = False
    static_mask = True
    supports_decode = True  # models.lm's decode steps keep the pattern (SparseMethod.decode)

    def __init__(self, num_sink: int = 4, window: int = 2000, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        if num_sink < 0 or window < 1:
            raise ValueError(f"StreamingLLM: num_sink must be >= 0 and window >= 1, got {num_sink}, {window}")
        self.num_sink, self.window = int(num_sink), int(window)
        self.decode_sinks, self.decode_window = self.num_sink, self.window

    def mask_mod(self, q, k, causal):
        off, s, w = k.shape[2] - q.shape[2], self.num_sink, self.window

        def sink_window(b, h, q_idx, kv_idx):
            return (kv_idx < s) | (q_idx + off - kv_idx < w)

        return sink_window

    def flex_layout(self, q, k, causal, block):
        """The sink columns (``flex.columns``) and the band q - k < window (``flex.band``)."""
        import torch

        from methods.kernels import flex

        tq, tk = q.shape[2], k.shape[2]
        s_any, s_full = flex.columns(torch.arange(tk, device=q.device) < self.num_sink, block, tq)
        w_any, w_full = flex.band(tq, tk, block, -(2**40), self.window - 1, q.device)
        return s_any | w_any, s_full | w_full

    def prefill_output(self, q, k, v):
        return self(q, k, v, causal=True)

    def pairs(self, tq: int, tk: int) -> int:
        """Allowed causal pairs, counted in closed form per query."""
        n, off = 0, tk - tq
        for i in range(tq):  # O(T)
            p = i + off
            local = min(self.window, p + 1)
            n += local + max(0, min(self.num_sink, p + 1 - local))
        return n

    def cost(self, tq, tk, causal) -> Cost:
        pairs = self.pairs(tq, tk)
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim,
                    density=pairs / masks.causal_pairs(tq, tk),
                    kv_bytes=2.0 * self.num_kv_heads * min(tk, self.num_sink + self.window) * self.head_dim * 2)


__all__ = ["StreamingLLM"]
