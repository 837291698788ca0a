"""SparQ Attention: approximate scores from a few query components, then exact attention on the
top-k keys, plus a mean-value correction.

Ribar, Chelombiev, Hudlass-Galley, Blake, Luschi, Orr, "SparQ Attention: Bandwidth-Efficient
LLM Inference" (ICML 2024), Sec. 3 and Alg. 1; the authors' gpt-fast implementation
(Graphcore, ``sparq_attn``, ``SparQArgs``, ``RunningVMean``, ``DoubleKVCache``).

A decode query q (head dim D) over the cache's S keys K and values V, per query head:

 1. i1 = the r indices of largest |q_i|; approximate scores from those components only,
        s^ = softmax(q[i1] . K[:, i1]^T / tau),   tau = sqrt(D * ||q[i1]||_1 / ||q||_1)
 2. i2 = the k positions of largest s^; exact attention on them,
        y = softmax(q . K[i2]^T / sqrt(D)) V[i2]
 3. the mass the approximation gives the top k, alpha = sum_{j in i2} s^_j, interpolates with the
    mean value v_bar of all S values (mean-value reallocation):
        out = alpha * y + (1 - alpha) * v_bar

Defaults as the official code: r and k set for a compression ratio of 8 (``ratio``):
r = round(D / ratio), k = round(S_max / (2 ratio)) with S_max the cache's capacity (the official
``max_seq_length``); ``r`` and ``k`` set explicitly override them. Reallocation on, the value mean
kept as a running mean over every token (prefill and decode), and K stored twice
(``k_mode=store_twice``: a K^T copy, so that step 1 reads r contiguous rows; ``store_once``
reads the same columns of K: the same numbers, a strided read, and no copy held). A k larger
than the cache is clamped to it (``min(k, S)``, as the official code does; ``last_step
["clamped"]``). The prefill is dense (SDPA, as the official ``_prefill``).

Bytes per step (``last_step``): the r components of every key read by step 1 (each component
counted once per KV head group), the value mean, and the k selected K/V rows.

Implementation: step 1 multiplies the query with its other D - r components zeroed by K^T (the
same sums as q[i1] . K[:, i1], in the cache's dtype for fp16 and bf16, the softmax in fp32): it
streams every component of K^T where a kernel of the method reads only the r rows, so its time
is an upper bound of step 1's (the bytes above are the method's); step 2's exact attention is
``methods.decode.select_then_attend`` (the Triton gather kernel on CUDA).
"""
from __future__ import annotations

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection, select_then_attend

K_MODES = ("store_twice", "store_once")


class SparQ(DensePrefill, DecodePath, AttentionMethod):
    name = "sparq"
    # what the README's method table says (python -m analysis.readme)
    paper = "Ribar et al. 2024"
    kind = "sparse decode (approximate scores), training-free"
    # the test's reference follows the official sparq_attn: tau, top-k, lerp with the value mean
    official_test = "tests/test_decode.py::test_sparq_decode_against_algorithm_1"
    exact = True  # the prefill is dense; the decode selects keys
    impls = ("reference",)

    def __init__(self, ratio: int = 8, r: int | None = None, k: int | None = None, reallocation: bool = True,
                 k_mode: str = "store_twice", impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if ratio < 1:
            raise ValueError(f"SparQ: ratio must be >= 1, got {ratio}")
        if k_mode not in K_MODES:
            raise ValueError(f"SparQ: k_mode must be one of {list(K_MODES)}, got {k_mode!r}")
        self.r = max(1, round(self.head_dim / ratio)) if r is None else int(r)
        if not 1 <= self.r <= self.head_dim:
            raise ValueError(f"SparQ: r must be in [1, head_dim={self.head_dim}], got {self.r}")
        if k is not None and k < 1:
            raise ValueError(f"SparQ: k must be >= 1, got {k}")
        self.ratio, self.k, self.reallocation, self.k_mode = int(ratio), k, bool(reallocation), k_mode

    def top_k(self, cache: KVCache) -> int:
        """k for this cache: the set value, else round(capacity / (2 ratio)) (at least 1)."""
        return int(self.k) if self.k is not None else max(1, round(cache.capacity / (2 * self.ratio)))

    def cost(self, tq, tk, causal) -> Cost:
        copies = 3 if self.k_mode == "store_twice" else 2
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=copies * self.num_kv_heads * tk * self.head_dim * 2.0)

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"k_mode": self.k_mode, "reallocation": self.reallocation}

    def build_index(self, cache: KVCache) -> None:
        if self.k_mode == "store_twice":
            cache.aux["kt"] = cache.k.transpose(-1, -2).contiguous()  # [B, Hkv, D, capacity]
        if self.reallocation:
            dt = torch.float64 if cache.dtype == torch.float64 else torch.float32
            cache.aux["v_mean"] = cache.values().to(dt).mean(2, keepdim=True)  # [B, Hkv, 1, D]

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        if self.k_mode == "store_twice":
            cache.aux["kt"][:, :, :, cache.length - 1] = k_t[:, :, 0]
        if self.reallocation:  # the official RunningVMean: (n * mean + v) / (n + 1)
            n = cache.seen - 1
            vm = cache.aux["v_mean"]
            cache.aux["v_mean"] = (n * vm + v_t.to(vm.dtype)) / (n + 1)

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        B, H, _, D = q_t.shape
        Hkv, S, r = cache.num_kv_heads, cache.length, self.r
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        q = q_t[:, :, 0].to(dt)  # [B, H, D]
        absq = q.abs()
        top_abs, i1 = absq.topk(r, dim=-1)  # [B, H, r]
        tau = torch.sqrt(D * top_abs.sum(-1, keepdim=True) / absq.sum(-1, keepdim=True))  # [B, H, 1]
        # q[i1] . K[:, i1] as the query with its other components zeroed, times K^T: the same sums,
        # and nothing sized by the cache but the score vector (no gathered copy of r rows per head)
        q_r = torch.zeros_like(q).scatter(-1, i1, q.gather(-1, i1)).to(cache.dtype).view(B, Hkv, H // Hkv, D)
        kt = cache.aux["kt"][..., :S] if self.k_mode == "store_twice" else cache.keys().transpose(-1, -2)
        s_hat = torch.softmax((q_r @ kt).view(B, H, S).to(dt) / tau, dim=-1)  # [B, H, S]
        s_top, i2 = s_hat.topk(min(self.top_k(cache), S), dim=-1)  # [B, H, k]
        return Selection(slots=i2, clamped=self.top_k(cache) > S, extra={"alpha": s_top.sum(-1), "i1": i1})

    def step_info(self, cache: KVCache, sel: Selection) -> dict:
        """Adds step 1's read (counted here, outside the timed phases): the distinct components
        of each KV head's group over every key, and the value mean."""
        B, Hkv, D, S = cache.batch, cache.num_kv_heads, cache.head_dim, cache.length
        comp = torch.zeros(B, Hkv, D, dtype=torch.bool, device=cache.device)
        comp.scatter_(2, sel.extra["i1"].reshape(B, Hkv, -1), True)
        sel.index_bytes = float(comp.sum()) * S * cache.k.element_size()
        if self.reallocation:
            sel.index_bytes += cache.aux["v_mean"].numel() * cache.aux["v_mean"].element_size()
        return super().step_info(cache, sel)

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        y = select_then_attend(q_t, cache, sel)
        if not self.reallocation:
            return y
        alpha = sel.extra["alpha"].view(*y.shape[:2], 1, 1)
        v_bar = cache.aux["v_mean"].repeat_interleave(self.num_heads // cache.num_kv_heads, 1)
        return (alpha * y.to(alpha.dtype) + (1 - alpha) * v_bar.to(alpha.dtype)).to(q_t.dtype)


__all__ = ["SparQ"]
