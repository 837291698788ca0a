"""SpargeAttn: block selection by compressed (mean-pooled) q/k attention with self-similarity
checks, and the optional second-stage skip of PV products by the online-softmax bound.

Zhang et al., "SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference"
(ICML 2025, arXiv 2502.18137), Sec. 3.2-3.4 and Alg. 1.

Stage 1 (selective token compression, Sec. 3.3). Q is cut into blocks of ``block_q`` rows,
K into blocks of ``block_k``. For a block X with rows x_1..x_n, its self-similarity is the
mean cosine similarity of its rows, s(X) = mean_{a,b} x_a . x_b / (|x_a| |x_b|) (diagonal
included), and its compressed token the mean row. The compressed map is

    S^ = q^ k^T / sqrt(D),  P^[i] = softmax(S^[i])  over the key blocks that are self-similar
                                                      (s(K_j) > sim_threshold) and causal
    M[i, j] = 1 for the fewest key blocks j (by P^[i, j], descending) whose cumulative
              probability stays within cdf_threshold (TopCdf; at least one block), and
    M[i, :] = 1 when s(Q_i) <= sim_threshold,  M[:, j] = 1 when s(K_j) <= sim_threshold
              (blocks that are not self-similar are not represented well by their mean:
              they are always computed), M[:, 0] = 1 with attention_sink.

K is smoothed first (its mean over the tokens subtracted, as the official code does before
pooling and the similarity; the softmax of a row does not change). The causal map keeps key
block j for query block i when j's first key is at or before i's last query.
Stage 2 (sparse warp online softmax, Sec. 3.4), ``pv_skip``: the visited key blocks of a
query block are processed in order with FlashAttention's online softmax; with m_local the
block's row maxima and m_new the running maxima after it, the product P~ V of the block is
skipped when max over the block's rows of (m_local - m_new) < -pv_threshold (its weights are
below exp(-pv_threshold) of the running maximum; the running sum l still counts them). This
module decides per query block (the paper: per GPU warp) and counts in natural-log units of
the scaled scores; the stage runs as a blockwise reference loop (``impl=reference`` only).

Defaults are the official ``spas_sage2_attn_meansim_cuda``'s: blocks 128 x 64,
sim_threshold (simthreshd1) 0.6, cdf_threshold (cdfthreshd) 0.98, pv_threshold (pvthreshd) 50,
attention_sink off; pv_skip is off by default (the issue asks for it as an option; the
official kernel always applies it, so with pv_threshold 50 its effect is negligible).
``block_map(q, k, causal)`` is the index-building step on its own, timed into ``last_index_ms`` under ``index_timing(True)``; every call
sets ``last_density`` (and ``last_pv_skipped``, the share of visited blocks whose PV product
was skipped, under ``pv_skip``). ``impl=triton`` runs the map's tiles with
``methods.kernels.block_sparse`` (Tq == Tk).
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod, repeat_kv, timed_index


class SpargeAttn(SparseMethod):
    name = "sparge"
    # what the README's method table says (python -m analysis.readme)
    paper = "Zhang et al. 2025"
    kind = "sparse (data-dependent blocks)"
    official_test = None
    has_index = True  # the index step is timed apart under index_timing
    impls = ("reference", "flex", "triton")

    def __init__(self, block_q: int = 128, block_k: int = 64, sim_threshold: float = 0.6,
                 cdf_threshold: float = 0.98, pv_threshold: float = 50.0, pv_skip: bool = False,
                 smooth_k: bool = True, attention_sink: bool = False, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for n, val in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"SpargeAttn: {n} must be an integer >= 1, got {val!r}")
        if not 0 < cdf_threshold <= 1:
            raise ValueError(f"SpargeAttn: cdf_threshold must be in (0, 1], got {cdf_threshold!r}")
        if not -1 <= sim_threshold <= 1:
            raise ValueError(f"SpargeAttn: sim_threshold (a cosine similarity) must be in [-1, 1], "
                             f"got {sim_threshold!r}")
        if pv_threshold < 0:
            raise ValueError(f"SpargeAttn: pv_threshold must be >= 0, got {pv_threshold!r}")
        if pv_skip and self.impl != "reference":
            raise ValueError("SpargeAttn: pv_skip runs as a blockwise reference loop: use impl=reference")
        self.block_q, self.block_k = block_q, block_k
        self.sim_threshold, self.cdf_threshold = float(sim_threshold), float(cdf_threshold)
        self.pv_threshold, self.pv_skip = float(pv_threshold), bool(pv_skip)
        self.smooth_k, self.attention_sink = bool(smooth_k), bool(attention_sink)
        self.last_pv_skipped: float | None = None

    # ---- stage 1: the block map ------------------------------------------------------------
    def _blocks(self, x, bs, dt):
        """Mean rows [B, H, n, D] and self-similarity [B, H, n] of blocks of bs rows."""
        B, H, T, D = x.shape
        n = math.ceil(T / bs)
        xp = torch.nn.functional.pad(x.to(dt), (0, 0, 0, n * bs - T)).view(B, H, n, bs, D)
        size = torch.full((n,), float(bs), dtype=dt, device=x.device)
        size[-1] = T - (n - 1) * bs
        mean = xp.sum(3) / size.view(1, 1, n, 1)
        unit = xp / xp.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)  # padded rows stay 0
        sim = unit.sum(3).pow(2).sum(-1) / size.pow(2)  # mean of the Gram matrix = |sum of units|^2 / n^2
        return mean, sim

    def causal_blocks(self, tq, tk, device=None) -> torch.Tensor:
        """[nq, nk] bool: key block j's first key at or before query block i's last query."""
        nq, nk = math.ceil(tq / self.block_q), math.ceil(tk / self.block_k)
        last = torch.clamp((torch.arange(nq, device=device) + 1) * self.block_q, max=tq) - 1 + (tk - tq)
        return (torch.arange(nk, device=device) * self.block_k).view(1, nk) <= last.view(nq, 1)

    def block_map(self, q, k, causal):
        """The block map (below): the index-building step, timed into ``last_index_ms`` under
        ``methods.base.index_timing(True)`` (no sync otherwise)."""
        with timed_index(self, q):
            return self._block_map(q, k, causal)

    @torch.no_grad()
    def _block_map(self, q, k, causal) -> torch.Tensor:
        """[B, H, nq, nk] bool: the key blocks each query block computes (stage 1)."""
        B, H, tq, D = q.shape
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        if self.smooth_k:
            k = k.to(dt) - k.to(dt).mean(2, keepdim=True)
        pq, simq = self._blocks(q, self.block_q, dt)
        pk, simk = self._blocks(k, self.block_k, dt)
        rep = H // k.shape[1]
        pk, simk = repeat_kv(pk, rep), repeat_kv(simk.unsqueeze(-1), rep).squeeze(-1)
        goodq, goodk = simq > self.sim_threshold, simk > self.sim_threshold  # self-similar blocks
        s = pq @ pk.transpose(-1, -2) / math.sqrt(D)  # [B, H, nq, nk]
        s = s.masked_fill(~goodk.unsqueeze(-2), float("-inf"))
        cm = self.causal_blocks(tq, k.shape[2], q.device) if causal else None
        if cm is not None:
            s = s.masked_fill(~cm, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        srt = p.sort(-1, descending=True)
        n = (srt.values.cumsum(-1) <= self.cdf_threshold).sum(-1, keepdim=True).clamp_min(1)  # TopCdf
        pick = torch.zeros_like(p, dtype=torch.bool).scatter_(
            -1, srt.indices, torch.arange(p.shape[-1], device=q.device).view(1, 1, 1, -1) < n)
        bmap = pick | ~goodk.unsqueeze(-2) | ~goodq.unsqueeze(-1)
        if self.attention_sink:
            bmap[..., 0] = True
        return bmap & cm if cm is not None else bmap

    def mask_mod(self, q, k, causal):
        bmap = self.block_map(q, k, causal)
        self._bmap = bmap  # reused by flex_layout (called after mask_mod for the same inputs)
        bq, bk = self.block_q, self.block_k

        def sparge_mask(b, h, q_idx, kv_idx):
            return bmap[b, h, q_idx // bq, kv_idx // bk]

        return sparge_mask

    def flex_layout(self, q, k, causal, block):
        """The block map (``mask_mod``'s index) at FlexAttention's ``block`` (``flex.coarsen``);
        None where block_q or block_k does not divide it."""
        from methods.kernels import flex

        return flex.coarsen(self._bmap, self.block_q, self.block_k, block, q.shape[2], k.shape[2])

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        idx, cnt = bsk.layout_to_lists(self.block_map(q, k, causal))
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, block_m=self.block_q, block_n=self.block_k,
                                         causal=causal, key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, self.block_q, self.block_k, q.shape[0], q.shape[1])

    # ---- stage 2: the PV skip (reference loop) ---------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        self.last_pv_skipped = None
        if not self.pv_skip:
            return super().attend(q, k, v, causal, key_padding_mask)
        self.last_path, self._compiled = "reference", False
        return self._pv_skip_attention(q, k, v, causal, key_padding_mask)

    def _pv_skip_attention(self, q, k, v, causal, key_padding_mask):
        B, H, tq, D = q.shape
        tk, bq, bk = k.shape[2], self.block_q, self.block_k
        nq, nk = math.ceil(tq / bq), math.ceil(tk / bk)
        bmap = self.block_map(q, k, causal)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        rep = H // k.shape[1]
        qb = torch.nn.functional.pad(q.to(dt), (0, 0, 0, nq * bq - tq)).view(B, H, nq, bq, D)
        kk = torch.nn.functional.pad(repeat_kv(k, rep).to(dt), (0, 0, 0, nk * bk - tk))
        vv = torch.nn.functional.pad(repeat_kv(v, rep).to(dt), (0, 0, 0, nk * bk - tk))
        qpos = (torch.arange(nq * bq, device=q.device) + tk - tq).view(nq, bq, 1)
        kpm = key_padding_mask if key_padding_mask is not None else torch.ones(B, tk, dtype=torch.bool,
                                                                                  device=q.device)
        kpm = torch.nn.functional.pad(kpm, (0, nk * bk - tk)).view(B, 1, 1, 1, nk * bk)
        m = torch.full((B, H, nq, bq), float("-inf"), dtype=dt, device=q.device)
        l, acc = torch.zeros_like(m), torch.zeros(B, H, nq, bq, D, dtype=dt, device=q.device)
        visited = skipped = 0.0
        for j in range(nk):
            ks, vs = kk[:, :, j * bk:(j + 1) * bk], vv[:, :, j * bk:(j + 1) * bk]
            s = torch.einsum("bhnqd,bhkd->bhnqk", qb, ks) / math.sqrt(D)
            kpos = torch.arange(j * bk, (j + 1) * bk, device=q.device).view(1, 1, bk)
            ok = bmap[..., j].view(B, H, nq, 1, 1) & kpm[..., j * bk:(j + 1) * bk]
            if causal:
                ok = ok & (kpos <= qpos)
            s = s.masked_fill(~ok, float("-inf"))
            m_local = s.amax(-1)
            m_new = torch.maximum(m, m_local)
            live = m_new > float("-inf")
            gap = torch.where(live, m_local - m_new, float("-inf"))  # <= 0
            # [B, H, nq]: a block that reaches some row, every row far below its running maximum
            skip = (gap.amax(-1) < -self.pv_threshold) & (m_local > float("-inf")).any(-1)
            scale = torch.where(live, torch.exp(m - m_new), 0.0)
            p = torch.where(live.unsqueeze(-1), torch.exp(s - m_new.unsqueeze(-1)), 0.0)
            l = l * scale + p.sum(-1)
            pv = torch.where(skip.view(B, H, nq, 1, 1), 0.0, p @ vs.unsqueeze(2))
            acc = acc * scale.unsqueeze(-1) + pv
            m = m_new
            visit = bmap[..., j]
            visited += float(visit.sum())
            skipped += float((visit & skip).sum())
        out = (acc / torch.where(l == 0, 1.0, l).unsqueeze(-1)).reshape(B, H, nq * bq, D)[:, :, :tq]
        mod = self.mask_mod(q, k, causal)
        if causal:
            mod = masks.and_masks(mod, masks.causal(tk - tq))
        if key_padding_mask is not None:
            mod = masks.and_masks(mod, masks.key_padding(key_padding_mask))
        pairs = float(B * H * (masks.causal_pairs(tq, tk) if causal else tq * tk))
        self.last_density = float(masks.materialize(mod, B, H, tq, tk, device=q.device).sum()) / pairs
        self.last_pv_skipped = skipped / max(visited, 1.0)
        return out.to(q.dtype)

    def cost(self, tq, tk, causal) -> Cost:
        """The last call's density (data-dependent; dense before the first call), and the
        compression's pooled QK^T."""
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        density = self.last_density if self.last_density is not None else 1.0
        nq, nk = math.ceil(tq / self.block_q), math.ceil(tk / self.block_k)
        index = 2.0 * nq * nk * self.head_dim + 2.0 * (tq * self.block_q + tk * self.block_k) * self.head_dim
        return Cost(flops=self.num_heads * (4.0 * density * dense_pairs * self.head_dim + index),
                    density=density, kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)
