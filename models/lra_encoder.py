"""The Long Range Arena encoder: embeddings, pre-norm Transformer blocks with any attention
method, pooling, classifier (Tay et al. 2021; as in Nystromformer's PyTorch LRA code).

    tokens [B, T] -> embed + learned positions -> L x (x + Attn(LN(x)); x + MLP(LN(x)))
                  -> LN -> mean over real tokens (or the CLS token) -> Linear -> logits
The dual encoder (Retrieval) encodes both documents with the same encoder and classifies
[u, v, u * v, u - v] (LRA's combination of the two encodings).
"""
from __future__ import annotations

import torch
import torch.nn as nn

import methods


class Attention(nn.Module):
    def __init__(self, dim, heads, head_dim, method_cfg, max_seq_len, dropout):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.out = nn.Linear(heads * head_dim, dim)
        self.method = methods.build(method_cfg, num_heads=heads, head_dim=head_dim,
                                    max_seq_len=max_seq_len)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask, causal=False):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = self.method(q, k, v, causal=causal, key_padding_mask=key_padding_mask)  # [B, H, T, d]
        return self.drop(self.out(o.transpose(1, 2).reshape(B, T, -1)))


class Block(nn.Module):
    def __init__(self, dim, heads, head_dim, mlp_dim, method_cfg, max_seq_len, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim, method_cfg, max_seq_len, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x, key_padding_mask, causal=False):
        x = x + self.attn(self.ln1(x), key_padding_mask, causal)
        return x + self.mlp(self.ln2(x))


class LRAEncoder(nn.Module):
    """Token (byte, pixel) classifier. ``method``: the composed method config of every layer;
    ``pooling``: ``mean`` over real tokens or ``cls``."""

    def __init__(self, method, vocab_size: int, num_classes: int, max_len: int, dim: int = 64,
                 depth: int = 2, heads: int = 2, head_dim: int = 32, mlp_dim: int = 128,
                 dropout: float = 0.1, pooling: str = "mean", pad_id: int = 0, cls_id: int | None = None,
                 dual: bool = False, causal: str | bool = "auto", **_ignored):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if pooling == "cls" and cls_id is None:
            raise ValueError("pooling='cls' needs the task's cls_id")
        self.pooling, self.pad_id, self.cls_id, self.dual = pooling, pad_id, cls_id, dual
        n = max_len + (1 if pooling == "cls" else 0)
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(n, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, head_dim, mlp_dim, method, n, dropout)
                                    for _ in range(depth))
        m0 = self.blocks[0].attn.method
        # auto: bidirectional, unless the method is causal only (MInference, NSA, SparseK)
        self.causal = (not m0.supports_noncausal) if causal == "auto" else bool(causal)
        for b in self.blocks[1:]:  # e.g. Linformer's layerwise sharing
            if hasattr(b.attn.method, "share_parameters_with"):
                b.attn.method.share_parameters_with(self.blocks[0].attn.method)
        self.norm = nn.LayerNorm(dim)
        feat = 4 * dim if dual else dim
        self.head = nn.Sequential(nn.Linear(feat, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, num_classes))

    @property
    def method(self):
        """The attention method of the first layer (what the record describes)."""
        return self.blocks[0].attn.method

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, dim] pooled features."""
        tokens = tokens.long()
        if self.pooling == "cls":
            tokens = torch.cat([torch.full_like(tokens[:, :1], self.cls_id), tokens], 1)
        keep = tokens != self.pad_id  # [B, T]
        x = self.drop(self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        kpm = None if bool(keep.all()) else keep
        for b in self.blocks:
            x = b(x, kpm, self.causal)
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        w = keep.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, tokens: torch.Tensor, tokens2: torch.Tensor | None = None) -> torch.Tensor:
        if self.dual:
            if tokens2 is None:
                raise ValueError("the dual encoder needs two documents")
            u, v = self.encode(tokens), self.encode(tokens2)
            return self.head(torch.cat([u, v, u * v, u - v], -1))
        return self.head(self.encode(tokens))
