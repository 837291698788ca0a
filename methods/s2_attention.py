"""S2-Attention: heterogeneous context sharding among heads (strided shards plus a local window).

Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024),
Sec. 3 (the "vertical stride + local" pattern of its DKernel; the same kernel serves
Phi-3-small's block-sparse layers).

The sequence is cut into blocks of ``block_size`` tokens. With query block i and key block j
(block indices of the query's and the key's positions), head h keeps the pair when

    local:   i - j < local_blocks                       (causal; |i - j| < local_blocks else)
    shard:   (j + shift(h) + 1) mod vert_stride == 0    (every vert_stride-th block)

    shift(h) = h * max(1, vert_stride // num_heads)     (heterogeneous heads; 0 if homo_head)

so each head attends to its own strided shard of the context, and the heads together cover
every block once num_heads >= vert_stride (the sharding of the paper's Sec. 3.2); the local
window keeps the nearest ``local_blocks`` blocks dense. Causal attention keeps, as the
official layout does, only key blocks at or before the query block, and inside them only keys
at or before the query. The non-causal form (symmetric window, shards on both sides) is this
module's reading: the paper's kernel is causal.

Defaults follow the official layout (``get_sparse_attn_mask`` of the DKernel / Phi-3-small:
block 64, 16 local blocks, vertical stride 8, heterogeneous heads). The shard is per query
head (as the official layout, which is built for the query heads); under grouped-query
attention the KV heads are shared by the query heads of a group. The pattern depends on the
shape only: its block mask is cached (``static_mask``), and ``impl=triton`` visits only the
listed key tiles with ``methods.kernels.block_sparse``.
"""
from __future__ import annotations

import math

import torch

from methods import masks
from methods.base import Cost, SparseMethod


class S2Attention(SparseMethod):
    name = "s2_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Lin et al. 2024"
    kind = "sparse (per-head strided shards)"
    official_test = None
    static_mask = True
    impls = ("reference", "flex", "triton")
    triton_backward = True  # the block-sparse kernel has one

    def __init__(self, block_size: int = 64, local_blocks: int = 16, vert_stride: int = 8,
                 homo_head: bool = False, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        for n, val in (("block_size", block_size), ("local_blocks", local_blocks), ("vert_stride", vert_stride)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"S2Attention: {n} must be an integer >= 1, got {val!r}")
        self.block_size, self.local_blocks, self.vert_stride = block_size, local_blocks, vert_stride
        self.homo_head = bool(homo_head)

    def shifts(self) -> torch.Tensor:
        """[H] offset of each head's shard (in blocks)."""
        step = 0 if self.homo_head else max(1, self.vert_stride // self.num_heads)
        return torch.arange(self.num_heads) * step

    def mask_mod(self, q, k, causal):
        off, bs = k.shape[2] - q.shape[2], self.block_size
        shift = self.shifts().to(q.device)
        loc, vs = self.local_blocks, self.vert_stride

        def s2_mask(b, h, q_idx, kv_idx):
            qb, kb = (q_idx + off) // bs, kv_idx // bs
            d = qb - kb
            local = (d < loc) & (d >= 0) if causal else d.abs() < loc
            shard = (kb + shift[h] + 1) % vs == 0
            if causal:
                shard = shard & (d >= 0)
            return local | shard

        return s2_mask

    def flex_layout(self, q, k, causal, block):
        """The block layout (``layout``) at FlexAttention's ``block`` (``flex.coarsen``); None
        where block_size does not divide it."""
        from methods.kernels import flex

        T, bs = q.shape[2], self.block_size
        return flex.coarsen(self.layout(math.ceil(T / bs), causal, q.device), bs, bs, block, T, T)

    def layout(self, n: int, causal: bool, device=None) -> torch.Tensor:
        """[H, n, n] bool: the key blocks of each query block (Tq == Tk = n blocks)."""
        i = torch.arange(n, device=device).view(1, n, 1)
        j = torch.arange(n, device=device).view(1, 1, n)
        shift = self.shifts().to(device).view(-1, 1, 1)
        d = i - j
        local = (d >= 0) & (d < self.local_blocks) if causal else d.abs() < self.local_blocks
        shard = (j + shift + 1) % self.vert_stride == 0
        lay = local | shard
        return lay & (d >= 0) if causal else lay

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        bs, T = self.block_size, q.shape[2]
        key = (math.ceil(T / bs), T, causal, str(q.device))
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            plans.clear()
            lay = self.layout(key[0], causal, q.device).unsqueeze(0)
            plans[key] = bsk.inside_first(*bsk.layout_to_lists(lay), block_m=bs, block_n=bs, causal=causal,
                                          tq=T, tk=T)
        idx, cnt, nin = plans[key]
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=bs, block_n=bs, causal=causal,
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, bs, bs, q.shape[0], q.shape[1])

    def cost(self, tq, tk, causal) -> Cost:
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        pairs = self._pairs(tq, tk, causal)
        return Cost(flops=4.0 * self.num_heads * pairs * self.head_dim, density=pairs / dense_pairs,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    def _pairs(self, tq, tk, causal) -> float:
        """Kept pairs per head, exact: per query block, its queries times the kept key blocks'
        sizes, less (causal) the keys after each query inside its own block."""
        bs, off = self.block_size, tk - tq
        nk = math.ceil(tk / bs)
        sizes = torch.full((nk,), float(bs), dtype=torch.float64)
        sizes[-1] = tk - (nk - 1) * bs
        lay = self.layout(nk, causal).double()  # [H, nk, nk] over positions
        pos = torch.arange(off, tk)  # query positions
        qb = pos // bs
        nq = torch.bincount(qb, minlength=nk).double()  # queries per block
        total = float(((lay @ sizes) * nq).sum()) / self.num_heads
        if causal:  # the own block (always kept) holds keys after the query
            total -= float((sizes[qb] - (pos - qb * bs + 1)).sum())
        return total
