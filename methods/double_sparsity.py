"""Double Sparsity: approximate scores from a few offline-calibrated heavy channels (a label
cache), exact attention on the top tokens.

Yang, Sheng, Gonzalez, Stoica, Zheng, "Post-Training Sparse Attention with Double Sparsity"
(arXiv 2408.07092), Sec. 3 (Alg. 1 and 2); official code andy-yang-1/DoubleSparse
(``config/offline_calibration.py``, ``evaluation/modify_llama.py``, ``models/model.py``).

Offline calibration (``calibrate(samples)``, Sec. 3.2, "channel sparsity"): per query head h
and channel i an outlier statistic over the calibration tokens, for the official default
channel kind ``qk`` the mean magnitude of the channel's contribution to a token's own score,

    c_hi = mean_t |q_ti k_ti|            (k of h's KV head; ``q``: mean |q_ti|; ``k``: mean |k_ti|)

summed over the calibration samples as the official hooks accumulate it; the heavy channels of
head h are the r = D / group_factor channels of largest c_h (``sorted_channel[:, :r]``).

Decode (Alg. 2, "token sparsity"): the cache keeps a label cache beside K and V, each key's heavy
channels per query head, L_hj = k_j[ch_h] (``k_label`` [B, H, S, r] in ``models/model.py``).
A step, per query head h:

 1. approximate scores on the label cache, s^_j = q[ch_h] . L_hj / sqrt(r)
    (``evaluation/modify_llama.py`` scales by sqrt(D // group_factor));
 2. i = the ``token_budget`` positions of largest s^ (``heavy_const``); exact attention over them,
        out = softmax(q . K[i]^T / sqrt(D)) V[i]

Defaults as the official decoding implementation (``models/model.py``: ``heavy_const`` 256,
``heavy_channel_num`` 32 of head dim 128, i.e. group_factor 4, channels ``qk``; the README's
perplexity command also uses group_factor 4) and the label cache in the cache's dtype.
``label_bits`` set to b < 16 rounds the query and key labels as the official evaluation's
``pseudo_quantize`` does (per token, min-max over its r channels, 2^b - 1 levels): it simulates
the quantized label's accuracy; the label cache is still held and counted at the cache's dtype.
The prefill is dense (the official code runs its first, dense forward for prompts). A budget
of at least the cache reads every key (clamped, as Quest and SparQ here;
``last_step["clamped"]``). Model-level choices not part of one layer: the official evaluation
keeps the first two layers dense.

The label scores are computed in the cache's dtype (as the official code's), the top k taken
in fp32; the exact attention is ``methods.decode.select_then_attend`` (the Triton gather
kernel on CUDA).

Bytes per step (``last_step``): the label rows of every held key (r channels per query head),
and the selected K/V rows. Held: K, V and the label cache (H x r per token).
"""
from __future__ import annotations

import hashlib
import math

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection, top_k_selection

CHANNELS = ("qk", "q", "k")


def pseudo_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The official evaluation's ``pseudo_quantize``: per row (last dim) min-max to 2^bits - 1
    levels and back."""
    top = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    rng = hi - lo
    rng = torch.where(rng == 0, torch.ones_like(rng), rng)
    scale = top / rng
    return torch.round((x - lo) * scale).clamp(0, top) / scale + lo


class DoubleSparsity(DensePrefill, DecodePath, AttentionMethod):
    name = "double_sparsity"
    # what the README's method table says (python -m analysis.readme)
    paper = "Yang et al. 2024"
    kind = "sparse decode (offline heavy channels, label cache), training-free"
    # the test's reference follows offline_calibration.py (qk outliers) and model.py (label scores, top-k)
    official_test = "tests/test_decode_selection.py::test_double_sparsity_decode_against_the_official_label_scores"
    exact = True  # the prefill is dense; the decode selects keys
    impls = ("reference",)
    needs_calibration = True

    def __init__(self, group_factor: int = 4, channels: int | None = None, token_budget: int = 256,
                 channel: str = "qk", label_bits: int | None = None, impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if group_factor < 1 or self.head_dim % group_factor:
            raise ValueError(f"DoubleSparsity: group_factor must be >= 1 and divide head_dim={self.head_dim}, "
                             f"got {group_factor}")
        self.r = self.head_dim // group_factor if channels is None else int(channels)
        if not 1 <= self.r <= self.head_dim:
            raise ValueError(f"DoubleSparsity: channels must be in [1, head_dim={self.head_dim}], got {self.r}")
        if token_budget < 1:
            raise ValueError(f"DoubleSparsity: token_budget must be >= 1, got {token_budget}")
        if channel not in CHANNELS:
            raise ValueError(f"DoubleSparsity: channel must be one of {list(CHANNELS)}, got {channel!r}")
        if label_bits is not None and not 1 <= label_bits <= 15:
            raise ValueError(f"DoubleSparsity: label_bits must be in [1, 15] or null (unquantized), got {label_bits}")
        self.group_factor, self.token_budget, self.channel = int(group_factor), int(token_budget), channel
        self.label_bits = None if label_bits is None else int(label_bits)
        self.register_buffer("heavy", None)  # [H, r] channel indices per query head, from calibrate
        self.register_buffer("channel_stats", None)  # [H, D] the outlier statistic
        self._fingerprint = None

    def cost(self, tq, tk, causal) -> Cost:
        label = self.num_heads * tk * self.r * 2.0
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2 + label)

    # ---- calibration: heavy channels ------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, samples) -> None:
        """Heavy channels per query head from calibration (q, k) pairs (``offline_calibration.py``:
        each sample adds its mean over tokens; channels sorted by the sum, largest first)."""
        pairs = self.calibration_pairs(samples)
        H, D = self.num_heads, self.head_dim
        stats = torch.zeros(H, D, dtype=torch.float64)
        for q, k in pairs:
            q, k = q.detach().to(torch.float64).cpu(), k.detach().to(torch.float64).cpu()
            kr = k.repeat_interleave(H // k.shape[1], 1)  # [B, H, T, D]
            x = {"qk": q * kr, "q": q, "k": kr}[self.channel]
            stats += x.abs().mean((0, 2))
        self.channel_stats = stats
        device = pairs[0][0].device
        self.heavy = torch.sort(stats, stable=True, dim=-1, descending=True).indices[:, :self.r].contiguous().to(device)
        self._fingerprint = hashlib.sha1(self.heavy.cpu().numpy().tobytes()).hexdigest()[:12]

    def calibrated(self) -> bool:
        return self.heavy is not None

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"channels": self.r, "label_bits": self.label_bits, "heavy": self._fingerprint}

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        """The heavy channels of x [B, Hx, T, D] per query head: [B, H, T, r] (KV heads repeated)."""
        B, Hx, T, D = x.shape
        H = self.num_heads
        xr = x.repeat_interleave(H // Hx, 1)
        lab = xr.gather(-1, self.heavy.view(1, H, 1, self.r).expand(B, H, T, self.r))
        return lab if self.label_bits is None else pseudo_quantize(lab, self.label_bits)

    def build_index(self, cache: KVCache) -> None:
        B, C = cache.batch, cache.capacity
        cache.aux["k_label"] = torch.zeros(B, self.num_heads, C, self.r, dtype=cache.dtype, device=cache.device)
        cache.aux["k_label"][:, :, :cache.length] = self._labels(cache.keys())

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        cache.aux["k_label"][:, :, cache.length - 1:cache.length] = self._labels(k_t)

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        S = cache.length
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        ql = self._labels(q_t).to(cache.dtype)  # [B, H, 1, r]
        lab = cache.aux["k_label"][:, :, :S]  # [B, H, S, r], read in place
        s_hat = (ql @ lab.transpose(-1, -2))[:, :, 0].to(dt) / math.sqrt(self.r)  # [B, H, S]
        index_bytes = float(cache.batch * self.num_heads * S * self.r * cache.k.element_size())
        return top_k_selection(s_hat, self.token_budget, index_bytes=index_bytes, clamped=self.token_budget > S)


__all__ = ["DoubleSparsity", "pseudo_quantize"]
