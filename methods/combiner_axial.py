"""Combiner-Axial: full attention through an axial (row-major) factorization.

Ren, Dai, Dai, Yang, Leskovec, Schuurmans and Dai, "Combiner: Full Attention Transformer with
Sparse Computation Cost" (NeurIPS 2021, arXiv 2107.05768), Sec. 3 (Eq. 5-7, the direct and local
expectations under one normaliser; see methods/combiner.py) and Sec. 4.2 (Combiner-Axial). The
sequence is laid out as a matrix of rows of m = ``row_len`` positions (i = row * m + col).

    A(x_i) = sum_{j in Omega_i^0} exp(q_i . k_j) / Z_i * v_j
           + sum_{r in R_i} exp(q_i . k~_r) / Z_i * sum_{j in row r} q(j | r, col(i)) v_j
    Z_i    = sum_{j in Omega_i^0} exp(q_i . k_j) + sum_{r in R_i} exp(q_i . k~_r)
    q(j | r, c) = softmax_{j in row r}(q_{(r, c)} . k_j)     (row r's attention from its column-c query)

Omega_i^0 is i's own row (causal: up to i); each other row r in R_i is a region (causal: the
earlier rows, each complete). Row r is seen by i through the position (r, col(i)) of i's column:
its query q_{(r,c)} gives the local expectation (row r's ordinary row attention output at
(r, c)), and its key summary k~_r is the abstraction. Every visible key gets a positive weight:
full attention, O(T (m + T / m)) per head.

This follows the official code (google-research/combiner; the JAX ``-model axial`` is
``_SelfAttAxialRowmajor``, the TF ``AxialRowMajorLM`` is ``axial_rowmajor``, ``max_seg_len=128``),
with q scaled by d^-1/2 once. The key summary is the code's ``row_summary``: ``none`` (default
here) keeps k~_r = k_{(r, c)}; ``wsum`` is k~_r = sum_j q(j | r, c) k_j. The official configs
use ``proj``, a learned projection (dense, residual with the layer input, LayerNorm, dense) of
row r's attention output; it needs the layer input and weights an attention method does not
have, so it is not offered. Non-causal, the code keeps every row as a region, i's own row
included (``noncausal_regions=all``, default); ``others`` leaves i's own row out of R_i.
Defaults: m = 128; ``row_len=null`` takes m = ceil(sqrt(T)).

Harness readings: the last row may be shorter; padded keys are left out of every set and
softmax; a row is a region for i only if it holds a real key and the position (r, col(i))
standing for it is in the sequence (a shorter last row) and, with ``row_summary=none``, a real
key (a padded key cannot be the row's key). So, non-causal, a shorter last row is seen only
by the queries of the columns it has: full attention needs T a multiple of m there, as in
the official code.
Queries of other positions are used (q_{(r,c)}), so Tq == Tk (self-attention) is required; a
decode step over a cache is refused and there is no decode path (models decode dense after a
Combiner-Axial prefill). No weights of its own, but it reshapes attention: ``training_free``
is False (the fidelity task measures it in a pretrained model).
"""
from __future__ import annotations

import torch

from methods.base import AttentionInputError, AttentionMethod, Cost, check_int, dense_flops
from methods.combiner import REGIONS, pair_counts, seen_regions, side, split_spans

SUMMARIES = ("none", "wsum")


class CombinerAxial(AttentionMethod):
    name = "combiner_axial"
    # what the README's method table says (python -m analysis.readme)
    paper = "Ren et al. 2021"
    kind = "full attention, factorized (Combiner-Axial)"
    official_test = "tests/test_combiner_axial.py::test_combiner_axial_matches_the_official_code"
    training_free = False

    def __init__(self, row_len: int | None = 128, row_summary: str = "none", noncausal_regions: str = "all",
                 **structural):
        super().__init__(**structural)
        if row_len is not None:
            check_int("CombinerAxial", "row_len", row_len)
        if row_summary not in SUMMARIES:
            raise ValueError(f"CombinerAxial: row_summary must be one of {SUMMARIES}, got {row_summary!r}")
        if noncausal_regions not in REGIONS:
            raise ValueError(f"CombinerAxial: noncausal_regions must be one of {REGIONS}, got {noncausal_regions!r}")
        self.row_len, self.row_summary, self.noncausal_regions = row_len, row_summary, noncausal_regions

    @property
    def real_kernel(self) -> bool:
        return True  # only the T x (m + T / m) factorized scores and the row attentions are computed

    def row(self, t: int) -> int:
        return side(self.row_len, t)

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        if tq and tk and tq != tk:
            raise AttentionInputError(
                f"CombinerAxial uses the queries of every row: it needs as many queries as keys "
                f"(self-attention, Tq == Tk), got Tq={tq} and Tk={tk}")

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, T, D = q.shape
        odt, m = q.dtype, min(self.row(T), T)
        q, k, v, real = split_spans(q, k, v, key_padding_mask, m)
        n = real.shape[2]
        ok_key = real[:, :, :, None, :]  # [B, 1, n, 1(query col), m(key col)]
        # row attention of every position over its whole row: the local expectations
        logits = torch.einsum("bhrid,bhrjd->bhrij", q, k)  # [B, H, n, m, m]
        probs = torch.softmax(logits.masked_fill(~ok_key, float("-inf")), -1).nan_to_num(0.0)
        row_out = torch.einsum("bhrij,bhrjd->bhrid", probs, v)  # [B, H, n(row), m(col), D]
        key_row = k if self.row_summary == "none" else torch.einsum("bhrij,bhrjd->bhrid", probs, k)
        # direct expectation: i's own row (causal: up to i)
        ok_direct = ok_key
        if causal:
            ok_direct = ok_direct & torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        direct = logits.masked_fill(~ok_direct, float("-inf"))
        # regions: row r seen through (r, col(i))
        region = torch.einsum("bhqcd,bhrcd->bhqcr", q, key_row)  # [B, H, n(query row), m(col), n(region row)]
        ok_rows = seen_regions(n, causal, self.noncausal_regions, q.device)  # earlier rows only when causal
        has_key = real.any(-1)  # [B, 1, n]
        # the position (r, c) standing for row r: in the sequence (its query exists) and, with
        # row_summary none, a real key; its row holds a real key. [B, 1, m(col), n(region row)]
        src = (torch.arange(n * m, device=q.device) < T).view(1, 1, n, m) & has_key[..., None]
        ok_src = (src if self.row_summary == "wsum" else src & real).transpose(2, 3)
        ok_region = ok_rows[None, None, :, None, :] & ok_src[:, :, None]
        region = region.masked_fill(~ok_region, float("-inf"))
        p = torch.softmax(torch.cat([direct, region], -1), -1)
        anything = torch.cat([ok_direct.expand_as(direct), ok_region.expand_as(region)], -1).any(-1, keepdim=True)
        p = p.masked_fill(~anything, 0.0)  # rows with nothing visible: zeros
        out = (torch.einsum("bhqij,bhqjd->bhqid", p[..., :m], v)
               + torch.einsum("bhqcr,bhrcd->bhqcd", p[..., m:], row_out))
        return out.reshape(B, H, n * m, D)[:, :, :T].to(odt)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        m = min(self.row(tk), max(tk, 1))
        direct, regions, lens = pair_counts(tk, m, causal, self.noncausal_regions)
        rows = sum(x * x for x in lens)  # every position's attention over its whole row
        flops = h * (4.0 * d * (direct + regions) + 4.0 * d * rows
                     + (2.0 * d * rows if self.row_summary == "wsum" else 0.0))
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
