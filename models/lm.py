"""A small GPT-style decoder LM with any attention method per layer.

    tokens -> embedding -> L x (x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))) -> RMSNorm -> logits
Rotary position embeddings (Su et al. 2021) on q and k; grouped-query K/V (``num_kv_heads``);
causal attention through the method. ``generate`` prefills the prompt through the method
and decodes with a KV cache; methods without a decode path (all but dense) fall back to
dense attention over the cache at decode time, and ``decode_fallback`` says so; sliding window
decodes with its window.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from methods.base import masked_attention


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of [B, H, T, D] by angle pos * base^(-2i/D)."""
    d = x.shape[-1] // 2
    inv = base ** (-torch.arange(d, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]  # [T, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class LMBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim, mlp_dim, method_cfg, max_len):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.n1, self.n2 = RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.method = methods.build(method_cfg, num_heads=heads, head_dim=head_dim,
                                    num_kv_heads=kv_heads, max_seq_len=max_len)
        self.up = nn.Linear(dim, 2 * mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def qkv(self, x, pos):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return rope(q, pos), rope(k, pos), v

    def mlp(self, x):
        a, b = self.up(self.n2(x)).chunk(2, -1)
        return self.down(F.silu(a) * b)

    def forward(self, x, cache=None, pos0: int = 0, dense_decode: bool = False):
        B, T, _ = x.shape
        pos = torch.arange(pos0, pos0 + T, device=x.device)
        q, k, v = self.qkv(self.n1(x), pos)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if dense_decode:  # a decode step: the method's own where it has one, else dense over the cache
            o = self.method.decode(q, k, v) if getattr(self.method, "supports_decode", False) \
                else masked_attention(q, k, v)
        else:
            o = self.method(q, k, v, causal=True)
        x = x + self.o(o.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(x)


class DecoderLM(nn.Module):
    """``method``: the composed method config of every layer; keys the task adds that a decoder
    does not use (num_classes, pad_id, cls_id) are ignored."""

    def __init__(self, method, vocab_size: int, max_len: int, dim: int = 256, depth: int = 4,
                 heads: int = 4, num_kv_heads: int | None = None, head_dim: int = 64,
                 mlp_dim: int = 683, tie_embeddings: bool = True, embed_std: float = 0.02, **_ignored):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        # GPT-2's 0.02 by default (small logits at the start); the other layers keep PyTorch's
        # init, so the token signal starts small beside them: MQAR (recall of a token's
        # identity) learns only with a larger embed_std (conf/experiment/mqar/default.yaml)
        nn.init.normal_(self.embed.weight, std=float(embed_std))
        self.causal = True
        self.blocks = nn.ModuleList(LMBlock(dim, heads, num_kv_heads or heads, head_dim, mlp_dim,
                                            method, max_len) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.decode_fallback: str | None = None

    @property
    def method(self):
        """The attention method of the first layer (what the record describes)."""
        return self.blocks[0].method

    def forward(self, tokens: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> logits [B, T, vocab]; with ``select`` (bool [B, T]) only the selected
        positions' logits, [N, vocab] in row-major order (a loss on a few positions, e.g. MQAR's
        answers, then skips the vocabulary projection everywhere else)."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's window of {self.max_len}")
        if select is not None and select.shape != tokens.shape:
            raise ValueError(f"select has shape {tuple(select.shape)}, the tokens {tuple(tokens.shape)}")
        x = self.embed(tokens.long())
        for b in self.blocks:
            x = b(x)
        if select is not None:
            x = x[select]
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache: [B, T] -> [B, max_new_tokens]."""
        if prompt.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({prompt.shape[1]}) + {max_new_tokens} new tokens exceed the "
                             f"model's window of {self.max_len}")
        caches = [{} for _ in self.blocks]
        x = self.embed(prompt.long())
        for b, c in zip(self.blocks, caches):
            x = b(x, cache=c)
        nxt = self.head(self.norm(x[:, -1:])).argmax(-1)
        out, pos = [nxt], prompt.shape[1]
        exact = all(type(b.method).__name__ == "Dense" or getattr(b.method, "supports_decode", False)
                    for b in self.blocks)
        self.decode_fallback = None if exact else "dense"
        for _ in range(max_new_tokens - 1):
            x = self.embed(nxt)
            for b, c in zip(self.blocks, caches):
                x = b(x, cache=c, pos0=pos, dense_decode=True)
            nxt = self.head(self.norm(x)).argmax(-1)
            out.append(nxt)
            pos += 1
        return torch.cat(out, 1)
