"""PoNet: token mixing by multi-granularity pooling instead of attention (non-causal only).

Tan, Chen, Wang, Zhang, Zheng and Ling, "PoNet: Pooling Network for Efficient Token Mixing in
Long Sequences" (ICLR 2022, arXiv 2110.02442), Sec. 3: three poolings of the tokens, coarse to
fine, fused with each token. Per head, with Q, K, O the head's projections of the tokens and
S, L two further projections of the whole width (H * d):

    GA  (global aggregation, two stages)
        g_bar = mean_i Q_i                                  average pooling of the queries
        g     = sum_j softmax_j(g_bar . K_j / sqrt(d)) K_j  g_bar attends to every token (K as values)
    SMP (segment max-pooling)   s_i = max_{j in seg(i)} S_j
    LMP (local max-pooling)     l_i = max_{|j - i| <= 1} L_j  (a window of 3, stride 1)
    fusion                      o_i = (g + s_i) * O_i + l_i   (* elementwise: GA and SMP interact
                                                               with the token, LMP is added)

The official LRA code (lxchtan/PoNet, ``examples/LRA/code/attention.py`` and
``attention_ponet.py``) is the default and fixes what the paper leaves open: Q = W_q X, K = W_k X
and O = W_v X (the layer's value projection is the fusion's O; the GA's values are K), S and L
are full-width linear maps of X, segments are ``T // segment_num + 1`` consecutive tokens,
padded tokens are left out of the mean, the GA softmax and both max-poolings (filled with
-10000), and a padded token's output is zero.

In attnbench's contract (q, k, v of each head): Q = q, K = k, O = v, and S, L are this method's
own linear maps (with bias, PyTorch's default initialisation as in the official code) of the
concatenated heads of v, which is W_v X: with H * d equal to the model width (the LRA encoder's
2 x 32 = 64) and W_v invertible, they span the official S = W_s X and L = W_l X. The maps
have weights: the method is trained from scratch (``training_free = False``).

Not causal: the paper defines PoNet for encoders (the global mean and the segment maxima look at
the whole sequence; the official code sets ``is_decoder = False``, "Decoder is not yet
implemented"), so causal=True is refused, and so is Tq != Tk (the fusion mixes each token with
its own projections). ``segment_num``: 64 (the official LRA config for ListOps and Retrieval;
32 for Image, 1 for Pathfinder, 4096 for Text).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import (
    AttentionInputError,
    AttentionMethod,
    Cost,
    check_int,
    dense_flops,
    repeat_kv,
)

FILL = -10000.0  # the official code's fill for padded tokens before a max-pool


class PoNet(AttentionMethod):
    name = "ponet"
    # what the README's method table says (python -m analysis.readme)
    paper = "Tan et al. 2022"
    kind = "pooling token mixer (global, segment, local)"
    official_test = "tests/test_combiner_ponet.py::test_ponet_matches_the_official_code"
    supports_causal = False
    trainable = True  # the S and L projections
    training_free = False
    fixed_head_dim = True  # S and L are (H * d) x (H * d) maps

    def __init__(self, segment_num: int = 64, local_window: int = 3, **structural):
        super().__init__(**structural)
        check_int("PoNet", "segment_num", segment_num)
        check_int("PoNet", "local_window", local_window)
        if local_window % 2 == 0:
            raise ValueError(f"PoNet: local_window must be odd (a window centred on the token), got {local_window}")
        self.segment_num, self.local_window = segment_num, local_window
        width = self.num_heads * self.head_dim
        self.segment = nn.Linear(width, width)
        self.local = nn.Linear(width, width)

    @property
    def real_kernel(self) -> bool:
        return True  # O(T) work: poolings, no score matrix

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        if causal is True or (type(causal).__name__ == "bool_" and bool(causal)):
            raise AttentionInputError(
                "PoNet is not causal: causal=True is not supported (the paper defines it for encoders: "
                "the global average and the segment max-pooling see the whole sequence)")
        super().check_inputs(q, k, v, causal, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        if tq and tk and tq != tk:
            raise AttentionInputError(
                f"PoNet mixes each token with its own projections: it needs as many queries as keys "
                f"(Tq == Tk), got Tq={tq} and Tk={tk}")

    def segment_len(self, t: int) -> int:
        return t // self.segment_num + 1  # the official get_segment_index

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, T, D = q.shape
        odt = q.dtype
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.to(dt)
        k, v = repeat_kv(k, H // k.shape[1]).to(dt), repeat_kv(v, H // v.shape[1]).to(dt)
        real = (torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding_mask is None
                else key_padding_mask)
        r4 = real[:, None, :, None]  # [B, 1, T, 1]
        # GA: the mean of the real queries attends to every real token, K as values
        g_bar = (q * r4).sum(2) / r4.sum(2).clamp_min(1)  # [B, H, D]
        a = torch.einsum("bhd,bhjd->bhj", g_bar, k) / math.sqrt(D)
        a = torch.softmax(a.masked_fill(~real[:, None], float("-inf")), -1).nan_to_num(0.0)
        g = torch.einsum("bhj,bhjd->bhd", a, k)  # [B, H, D]
        # S and L: linear maps of the concatenated heads of v, padded tokens filled for the max
        x = v.transpose(1, 2).reshape(B, T, H * D)
        fill = ~real[..., None]
        seg_in = F.linear(x, self.segment.weight.to(dt), self.segment.bias.to(dt)).masked_fill(fill, FILL)
        loc_in = F.linear(x, self.local.weight.to(dt), self.local.bias.to(dt)).masked_fill(fill, FILL)
        # SMP: the max over each segment of segment_len consecutive tokens, back to its tokens
        n = self.segment_len(T)
        nseg = math.ceil(T / n)
        seg = F.pad(seg_in, (0, 0, 0, nseg * n - T), value=FILL).view(B, nseg, n, H * D).amax(2)
        s = seg.repeat_interleave(n, 1)[:, :T]  # [B, T, H*D]
        # LMP: the max over a window centred on each token (stride 1)
        w = self.local_window
        loc = F.max_pool1d(loc_in.transpose(1, 2), w, stride=1, padding=w // 2).transpose(1, 2)
        s = s.view(B, T, H, D).transpose(1, 2)
        loc = loc.view(B, T, H, D).transpose(1, 2)
        out = (g[:, :, None, :] + s) * v + loc
        return out.masked_fill(~r4, 0.0).to(odt)  # a padded token's output is zero

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        width = h * d
        flops = (2 * 2.0 * tk * width * width  # the S and L maps
                 + h * 6.0 * tk * d  # GA: the mean, the scores, the weighted sum
                 + 2.0 * tk * width * self.local_window + 4.0 * tk * width)  # poolings, fusion
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
