"""Twilight: an adaptive decode budget, by top-p pruning of the keys a base selector chose.

Lin, Tang, Yang, Wang, Tang, Tian, Stoica, Han, Gao, "Twilight: Adaptive Attention Sparsity with
Hierarchical Top-p Pruning" (NeurIPS 2025, arXiv 2502.02770), Sec. 4 ("Select-then-Prune");
official code tsinghua-ideal/Twilight (``twilight/pyimpl/attention.py``, ``quantize.py``,
``top_p.py``, the top-p mask kernel ``TopPReturnMaskKernel`` in ``csrc/include/sampling.cuh``,
``benchmark/configs/config_quest_twi.json``).

A decode step, per query head:

 1. Selector: the base method (Quest by default; Double Sparsity) chooses candidates C with its
    own, conservative, budget (``token_budget``).
 2. Weight estimator: each key is also held quantized to b bits per channel (min-max per token,
    the official ``min_max_per_token_quant_kv``: scale s_j = (max_i k_ji - min_i k_ji) / (2^b - 1),
    code c_ji = round((k_ji - min_i k_ji) / s_j)), and the attention weights over the candidates
    are estimated from the dequantized keys k^_j = c_j s_j + min_i k_ji:
        p^_j = softmax_{j in C}(q . k^_j / sqrt(D))
 3. Pruner (top-p): the smallest set of candidates, by decreasing p^, whose estimated mass
    reaches p (the kernel's binary search keeps {j : p^_j > t} for the largest t with
    sum_{p^_j > t} p^_j >= p; without ties, the same set):
        I = argmin_{I in C} |I|  subject to  sum_{j in I} p^_j >= p
 4. Exact attention over I (``use_estimated_weights_in_attn`` false):
        out = softmax(q . K[I]^T / sqrt(D)) V[I]

|I| (the budget) varies per step and head: ``last_step["budget"]`` is its mean over batch and
query heads (``budget_base``: the candidates' count before pruning), recorded per step by
``runner=decode``.

Defaults as the official Quest configuration (``config_quest_twi.json``): Quest with chunk (page)
size 16 and token budget 8192, 4-bit weight estimation, p = 0.85. ``base_kw`` passes further
hyperparameters to the base (Double Sparsity's ``group_factor``, ...); a base that needs
calibration makes Twilight need it (``calibrate`` is the base's). The prefill is the base's
(dense for both). Model-level: the official configuration skips the first two layers.

Bytes per step (``last_step``): the base's index read, the quantized rows of the candidates
(b/8 bytes per channel plus the scale and minimum, each (batch, KV head, key) once), and the
K/V rows kept after pruning. Held: the base's cache plus the b-bit keys (packed 8/b per byte)
and their per-token scale and minimum.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from methods.base import AttentionMethod, Cost
from methods.decode import DecodePath, KVCache, Selection, gather_heads

BASES = ("quest", "double_sparsity")
QUANT_BITS = (1, 2, 4, 8)


def quantize_rows(k: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantization of each row (last dim) of k to ``bits`` bits: (codes packed 8/bits
    per byte as uint8, scale, minimum), scale and minimum [..., 1] in k's dtype."""
    top = 2 ** bits - 1
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    x = k.to(dt)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-9) / top
    codes = torch.round((x - lo) / scale).clamp(0, top).to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(per, device=k.device, dtype=torch.uint8) * bits
    packed = (codes.view(*codes.shape[:-1], -1, per) << shifts).sum(-1, dtype=torch.uint8)
    return packed, scale.to(k.dtype), lo.to(k.dtype)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    """The rows ``quantize_rows`` packed, back in ``dtype``: code * scale + minimum."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    codes = codes.view(*packed.shape[:-1], packed.shape[-1] * per)
    return codes.to(dtype) * scale.to(dtype) + lo.to(dtype)


class Twilight(DecodePath, AttentionMethod):
    name = "twilight"
    # what the README's method table says (python -m analysis.readme)
    paper = "Lin et al. 2025"
    kind = "sparse decode (top-p pruning of a base selector), training-free"
    # the test's reference follows attention.py: base candidates, 4-bit estimated weights, top-p mask
    official_test = "tests/test_decode_selection.py::test_twilight_decode_against_select_then_prune"
    exact = True  # the prefill is dense; the decode selects keys
    impls = ("reference",)

    def __init__(self, base: str = "quest", token_budget: int = 8192, page_size: int = 16, top_p: float = 0.85,
                 quant_bits: int = 4, base_kw: dict | None = None, impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if base not in BASES:
            raise ValueError(f"Twilight: base must be one of {list(BASES)}, got {base!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"Twilight: top_p must be in (0, 1], got {top_p}")
        if quant_bits not in QUANT_BITS or self.head_dim % (8 // quant_bits):
            raise ValueError(f"Twilight: quant_bits must be one of {list(QUANT_BITS)} with 8 / quant_bits dividing "
                             f"head_dim={self.head_dim}, got {quant_bits}")
        kw = {"token_budget": int(token_budget), **dict(base_kw or {})}
        shape = dict(num_heads=self.num_heads, head_dim=self.head_dim, num_kv_heads=self.num_kv_heads,
                     max_seq_len=self.max_seq_len)
        if base == "quest":
            from methods.quest import Quest

            # the official Twilight's Quest (twilight/pyimpl/quest.py, quest_selector): plain top pages
            self.base = Quest(page_size=int(page_size), **{"keep_last_page": False, **kw}, **shape)
        else:
            from methods.double_sparsity import DoubleSparsity

            self.base = DoubleSparsity(**kw, **shape)
        self.base_name, self.top_p, self.quant_bits = base, float(top_p), int(quant_bits)
        self.token_budget, self.page_size = int(token_budget), int(page_size)

    @property
    def real_kernel(self) -> bool:
        return True  # the prefill is dense (nothing skipped); decode gathers only the keys kept

    # ---- prefill: the base's (exact) ---------------------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        return self.base.attend(q, k, v, causal, key_padding_mask)

    def prefill_output(self, q, k, v):
        return self.base.prefill_output(q, k, v)  # dense through SDPA: no [L, L] matrix at long prompts

    def cost(self, tq, tk, causal) -> Cost:
        c = self.base.cost(tq, tk, causal)
        quantized = self.num_kv_heads * tk * (self.head_dim * self.quant_bits / 8 + 2 * 2)
        return dataclasses.replace(c, kv_bytes=c.kv_bytes + quantized)

    # ---- calibration: the base's ----------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return self.base.needs_calibration

    def calibrate(self, samples) -> None:
        self.base.calibrate(samples)

    def calibrated(self) -> bool:
        return self.base.calibrated()

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"base": self.base.signature(), "quant_bits": self.quant_bits}  # top_p is read per step

    def build_index(self, cache: KVCache) -> None:
        self.base.build_index(cache)
        B, Hkv, C, D = cache.k.shape
        per = 8 // self.quant_bits
        cache.aux["kq_codes"] = torch.zeros(B, Hkv, C, D // per, dtype=torch.uint8, device=cache.device)
        cache.aux["kq_scale"] = torch.zeros(B, Hkv, C, 1, dtype=cache.dtype, device=cache.device)
        cache.aux["kq_min"] = torch.zeros_like(cache.aux["kq_scale"])
        self._quantize(cache, 0, cache.length)

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        self.base.update_index(cache, k_t, v_t)
        self._quantize(cache, cache.length - 1, cache.length)

    def _quantize(self, cache: KVCache, a: int, b: int) -> None:
        codes, scale, lo = quantize_rows(cache.k[:, :, a:b], self.quant_bits)
        cache.aux["kq_codes"][:, :, a:b], cache.aux["kq_scale"][:, :, a:b], cache.aux["kq_min"][:, :, a:b] = (
            codes, scale, lo)

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        base = self.base.select(q_t, cache)  # 1. the base's candidates
        slots = base.slots
        valid = torch.ones_like(slots, dtype=torch.bool) if base.valid is None else base.valid
        B, H, n = slots.shape
        D, S = cache.head_dim, cache.length
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        # 2. estimated weights from the b-bit keys of the candidates
        k_hat = dequantize_rows(gather_heads(cache.aux["kq_codes"][:, :, :S], slots),
                                gather_heads(cache.aux["kq_scale"][:, :, :S], slots),
                                gather_heads(cache.aux["kq_min"][:, :, :S], slots), self.quant_bits, dt)
        est = (k_hat @ q_t.to(dt).transpose(-1, -2))[..., 0] / math.sqrt(D)  # [B, H, n]
        p_hat = torch.softmax(est.masked_fill(~valid, float("-inf")), -1)
        # 3. top-p: by decreasing weight, keep a candidate while the mass before it is below p
        p_sorted, order = p_hat.sort(-1, descending=True)
        keep_sorted = (p_sorted.cumsum(-1) - p_sorted) < self.top_p
        keep = torch.zeros_like(valid).scatter(-1, order, keep_sorted) & valid
        return Selection(slots=slots, valid=keep, index_bytes=base.index_bytes, clamped=base.clamped,
                         extra={"budget": keep.sum(-1), "budget_base": valid.sum(-1), "candidates": valid})

    def step_info(self, cache: KVCache, sel: Selection) -> dict:
        """Adds the b-bit rows the estimator read (each candidate's once per (batch, KV head),
        counted here, outside the timed phases) and the step's budget: keys kept per query head
        (mean over batch and heads), and the base's candidates before pruning."""
        B, Hkv, S, D = cache.batch, cache.num_kv_heads, cache.length, cache.head_dim
        hit = torch.zeros(B, Hkv, S, dtype=torch.bool, device=cache.device)
        hit.scatter_(2, sel.slots.clamp(0, S - 1).reshape(B, Hkv, -1), sel.extra["candidates"].reshape(B, Hkv, -1))
        row = D * self.quant_bits / 8 + 2 * cache.aux["kq_scale"].element_size()
        sel.index_bytes += float(hit.sum()) * row
        info = super().step_info(cache, sel)
        info["budget"] = float(sel.extra["budget"].double().mean())
        info["budget_base"] = float(sel.extra["budget_base"].double().mean())
        return info


__all__ = ["Twilight", "quantize_rows", "dequantize_rows"]
