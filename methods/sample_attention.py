"""SampleAttention: adaptive structured sparsity (local window plus sampled column stripes).

Zhu et al., "SampleAttention: Near-Lossless Acceleration of Long Context LLM Inference with
Adaptive Structured Sparse Attention" (2024, arXiv 2406.15486), Sec. 4: the pattern is a
local window plus column stripes; the stripes are found by a two-stage query-guided KV
filter. Causal only (prefill).

Stage 1 (query-guided attention sampling): n = ceil(row_ratio * Tq) queries, evenly spaced
and ending at the last query, attend causally to every key (exact softmax, Eq. 1); their
attention is summed per key column: a_j = sum_i softmax(q_i K^T / sqrt(D))_j.
Stage 2 (score-based key filtering): the columns are sorted by a_j and the smallest prefix
whose cumulative share reaches the threshold alpha (the paper's cumulative residual attention,
CRA >= alpha, Eq. 3-4) is kept: I_kv, per batch element and head.
The attention then keeps, for query i at position p, the keys j <= p with

    p - j < window          (window = ceil(window_ratio * Tk), the local band)
    or j in I_kv            (the column stripes)

Defaults alpha = 0.95, row_ratio = 0.05, window_ratio = 0.08 are this module's reading of the
paper's evaluation settings (its official code is not available offline). Also a reading: the
stripes alone reach alpha of the sampled mass (the paper counts the window's mass too, so this
keeps at least as many stripes), and the sampled rows are evenly spaced.
``index(q, k)`` is the index-building step on its own, timed into ``last_index_ms`` under ``index_timing(True)``;
every call sets ``last_density`` (the kept share of the causal pairs) and ``last_columns``
(the mean number of stripes per head). ``impl=triton`` runs the vertical-slash kernel of
``methods.kernels.vertical_slash`` (stripes as verticals, the window as the first slashes).
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv, timed_index


class SampleAttention(SparseMethod):
    name = "sample_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zhu et al. 2024"
    kind = "sparse (sampled stripes + window)"
    official_test = None
    has_index = True  # the index step is timed apart under index_timing
    supports_noncausal = False
    impls = ("reference", "flex", "triton")

    def __init__(self, alpha: float = 0.95, row_ratio: float = 0.05, window_ratio: float = 0.08,
                 impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for n, val in (("alpha", alpha), ("row_ratio", row_ratio)):
            if not 0 < val <= 1:
                raise ValueError(f"SampleAttention: {n} must be in (0, 1], got {val!r}")
        if not 0 <= window_ratio <= 1:
            raise ValueError(f"SampleAttention: window_ratio must be in [0, 1], got {window_ratio!r}")
        self.alpha, self.row_ratio, self.window_ratio = float(alpha), float(row_ratio), float(window_ratio)
        self.last_columns: float | None = None
        self._kpm = None

    def sampled_rows(self, tq: int) -> torch.Tensor:
        n = max(1, math.ceil(self.row_ratio * tq))
        return (torch.arange(1, n + 1) * tq) // n - 1  # evenly spaced, the last query included

    def window(self, tk: int) -> int:
        return math.ceil(self.window_ratio * tk)

    def index(self, q, k, key_padding_mask=None):
        """The column stripes (below): the index-building step, timed into ``last_index_ms`` under
        ``methods.base.index_timing(True)`` (no sync otherwise)."""
        with timed_index(self, q):
            return self._index(q, k, key_padding_mask)

    score_bytes = 1 << 30  # sampled scores held at once (the sampled rows are chunked to fit)

    @torch.no_grad()
    def _index(self, q, k, key_padding_mask=None) -> torch.Tensor:
        """[B, H, Tk] bool: the column stripes I_kv (stage 1 and 2)."""
        B, H, tq, D = q.shape
        tk = k.shape[2]
        rows = self.sampled_rows(tq).to(q.device)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        kk = repeat_kv(k, H // k.shape[1]).to(dt)
        a = torch.zeros(B, H, tk, dtype=dt, device=q.device)  # column mass of the sampled rows
        chunk = max(1, self.score_bytes // (4 * B * H * tk))
        for c in range(0, len(rows), chunk):
            r = rows[c:c + chunk]
            s = q[:, :, r].to(dt) @ kk.transpose(-1, -2) / math.sqrt(D)  # [B, H, c, Tk]
            future = torch.arange(tk, device=q.device).view(1, tk) > (r + tk - tq).view(-1, 1)
            s = s.masked_fill(future, float("-inf"))
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask.view(B, 1, 1, tk), float("-inf"))
            a += torch.softmax(s, -1).nan_to_num(0.0).sum(2)
        srt = a.sort(-1, descending=True)
        share = srt.values.cumsum(-1) / a.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        count = ((share < self.alpha).sum(-1, keepdim=True) + 1).clamp(max=tk)  # reaches alpha
        keep = torch.arange(tk, device=q.device).view(1, 1, tk) < count
        cols = torch.zeros(B, H, tk, dtype=torch.bool, device=q.device)
        cols.scatter_(-1, srt.indices, keep)
        self.last_columns = float(count.float().mean())
        return cols

    def mask_mod(self, q, k, causal):
        cols = self.index(q, k, self._kpm)
        self._cols = cols  # reused by flex_layout (called after mask_mod for the same inputs)
        off, w = k.shape[2] - q.shape[2], self.window(k.shape[2])

        def sample_mask(b, h, q_idx, kv_idx):
            return (q_idx + off - kv_idx < w) | cols[b, h, kv_idx]

        return sample_mask

    def flex_layout(self, q, k, causal, block):
        """The sampled key columns (the index ``mask_mod`` built, ``flex.columns``) and the
        local band q - k < window (``flex.band``)."""
        from methods.kernels import flex

        tq, tk = q.shape[2], k.shape[2]
        c_any, c_full = flex.columns(self._cols, block, tq)
        w_any, w_full = flex.band(tq, tk, block, -(2**40), self.window(tk) - 1, q.device)
        return c_any | w_any, c_full | w_full

    def attend(self, q, k, v, causal, key_padding_mask):
        self._kpm = key_padding_mask  # the sampling ignores padded keys
        try:
            return super().attend(q, k, v, causal, key_padding_mask)
        finally:
            self._kpm = self._cols = None  # the index flex_layout reused: not held between calls

    vs_block = 64  # square tile of the vertical-slash kernel

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import vertical_slash as vsk

        if key_padding_mask is not None:
            return None  # the vertical-slash kernel has no padding mask: the flex path
        B, H, T, _ = q.shape
        vert = self.index(q, k)
        slash = (torch.arange(T, device=q.device) < self.window(T)).view(1, 1, T).expand(B, H, T).contiguous()
        plan = vsk.vertical_slash_plan(vert, slash, self.vs_block)
        out = vsk.vertical_slash_attention(q, k, v, vert, slash, self.vs_block, plan=plan)
        return out, vsk.vertical_slash_work(plan)

    def cost(self, tq, tk, causal) -> Cost:
        """The window's pairs plus, for the stripes, the last call's count (data-dependent;
        none before the first call); and the sampling's QK^T."""
        dense_pairs = masks.causal_pairs(tq, tk)
        pairs = masks.window_pairs(tk - tq, tk, self.window(tk)) if self.window(tk) else 0
        if self.last_columns is not None:
            pairs = min(dense_pairs, pairs + tq * self.last_columns)
        pairs = max(pairs, tq)  # at least one key per query
        index = 2.0 * len(self.sampled_rows(tq)) * tk * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * pairs * self.head_dim + index), density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)
