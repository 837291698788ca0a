"""The attention operation alone (model=attn_op, what runner=kernel measures): the method,
built for inputs of ``batch_size`` x ``num_heads`` query heads (``num_kv_heads`` key/value
heads, grouped-query attention when it divides num_heads) x ``head_dim``."""
from __future__ import annotations

import torch.nn as nn

import methods


class AttentionOp(nn.Module):
    def __init__(self, method, batch_size: int, num_heads: int, head_dim: int, max_seq_len: int,
                 num_kv_heads: int | None = None):
        super().__init__()
        self.batch_size, self.num_heads, self.head_dim = batch_size, num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.method = methods.build(method, num_heads=num_heads, head_dim=head_dim,
                                    num_kv_heads=self.num_kv_heads, max_seq_len=max_seq_len)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Hkv, D) of the inputs."""
        return self.batch_size, self.num_heads, self.num_kv_heads, self.head_dim

    def forward(self, q, k, v, causal: bool = False):
        return self.method(q, k, v, causal=causal)
