"""FastGen: adaptive KV-cache compression, each head's policy chosen by profiling its prefill.

Ge, Zhang, Liu, Zhang, Han, Gao, "Model Tells You What to Discard: Adaptive KV Cache
Compression for LLMs" (ICLR 2024), Sec. 3.2-3.3, Eq. 1-2. No official code is public: the
recovery measure and the ratios below are our reading of the paper.

Policies (Sec. 3.3), each a set of tokens kept, as the paper's hybrid ladder of growing cost:

    C_special                                special tokens (``special``; default: the first token)
    C_special + C_punct                      ... and punctuation (``punct``)
    C_special + C_punct + C_frequent         ... and the r_f L tokens of largest accumulated attention
    C_special + C_punct + C_frequent + C_local   ... and the r_l L most recent tokens
    C_full                                   every token

Profiling (Eq. 2): with the causal attention map A [L, L] of the prefill (the query heads of
a KV head averaged), each (batch, KV head) takes the cheapest policy C whose kept tokens
recover a share T of the attention,

    sum_{i, j in C} A_ij / sum_{i, j} A_ij  >=  T        (``recovery``; full always does)

(our reading of Eq. 2's |A - softmax(Q K_C^T)| <= 1 - T as recovered attention mass). Token
classes come from the tokens, which one attention layer does not see: ``set_token_classes``
gives the special and punctuation masks [B, L] before the prefill (inside a model,
``models.hf_decode`` passes the prompt's ids and the tokenizer's special and punctuation
ids to ``set_tokens``); without them the first token is special and there is no punctuation. Heads
keep different counts: each (batch, KV head) then holds its own rows (``methods.press.PressCache``),
so ``bytes_held``, measured from the tensors, is what the per-head policies keep. The policy
per head is in ``press_details()``. Decode tokens are appended and kept (the paper
also applies each head's policy to new tokens: not done here).

What the profile cannot see: a retrieval head spends almost all of its prompt attention on
the first token and reads the needle only at answer time, so it recovers T on the prompt
with a cheap policy and loses the needle. On SmolLM2-135M (a 1024-token needle, recovery
0.95) layer 18's KV head 2 put 0.86 and 0.51 of two query heads' answer-row attention on the
needle but 0.4% over the prompt rows; it got special+punct+frequent and kept 1 of the
needle's 15 tokens, and the answer failed with 96% of the cache kept (the same with the
question in the prefill).
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionInputError
from methods.decode import KVCache
from methods.press import Press

POLICIES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")


class FastGen(Press):
    name = "fastgen"
    # what the README's method table says (python -m analysis.readme)
    paper = "Ge et al. 2024"
    kind = "KV-cache compression (press): per-head policy by profiling"
    official_test = None

    def __init__(self, recovery: float = 0.95, frequent_ratio: float = 0.3, local_ratio: float = 0.3,
                 impl: str = "reference", **structural):
        super().__init__(ratio=None, impl=impl, **structural)
        for n, x in (("recovery", recovery), ("frequent_ratio", frequent_ratio), ("local_ratio", local_ratio)):
            if not 0.0 < x <= 1.0:
                raise ValueError(f"FastGen: {n} must be in (0, 1], got {x}")
        self.recovery, self.frequent_ratio, self.local_ratio = float(recovery), float(frequent_ratio), float(local_ratio)
        self.special: torch.Tensor | None = None
        self.punct: torch.Tensor | None = None
        self.policies: list | None = None

    def decode_params(self) -> dict:
        return {"recovery": self.recovery, "frequent_ratio": self.frequent_ratio, "local_ratio": self.local_ratio}

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        return length  # at most every token (the full policy)

    def set_token_classes(self, special: torch.Tensor | None = None, punct: torch.Tensor | None = None) -> None:
        """Special-token and punctuation masks [B, L] (bool) of the next prefill."""
        for n, x in (("special", special), ("punct", punct)):
            if x is not None and (x.dim() != 2 or x.dtype != torch.bool):
                raise AttentionInputError(f"FastGen: {n} must be a [B, L] bool mask, got {tuple(x.shape)} {x.dtype}")
        self.special, self.punct = special, punct

    def set_tokens(self, input_ids: torch.Tensor, special_ids: torch.Tensor, punct_ids: torch.Tensor) -> None:
        """The token classes of the next prefill from its ids [B, L] (``models.hf_decode`` passes
        them with the tokenizer's special and punctuation ids): C_special, the special tokens
        (the first token too, as without classes), and C_punct."""
        if input_ids.dim() != 2:
            raise AttentionInputError(f"FastGen: input_ids must be [B, L], got {tuple(input_ids.shape)}")
        special = torch.isin(input_ids, special_ids.to(input_ids.device))
        special[:, 0] = True
        self.set_token_classes(special, torch.isin(input_ids, punct_ids.to(input_ids.device)))

    def policy_sets(self, attn: torch.Tensor, special: torch.Tensor, punct: torch.Tensor) -> torch.Tensor:
        """The policies' kept tokens, [len(POLICIES), B, Hkv, L] bool, from the averaged attention
        map attn [B, Hkv, L, L] and the token classes [B, L]."""
        B, Hkv, L, _ = attn.shape
        sp = special[:, None].expand(B, Hkv, L)
        pu = sp | punct[:, None].expand(B, Hkv, L)
        nf = min(L, int(self.frequent_ratio * L))
        fr = pu.clone()
        if nf:
            fr.scatter_(-1, attn.sum(-2).topk(nf, dim=-1).indices, True)
        nl = min(L, int(self.local_ratio * L))
        lo = fr.clone()
        lo[..., L - nl:] = True
        return torch.stack([sp, pu, fr, lo, torch.ones_like(sp)])

    def compress(self, cache: KVCache, q=None, layer_idx=None) -> torch.Tensor:
        self.check_press(cache, q)
        if q is None:
            raise AttentionInputError("FastGen: the press needs the prefill's queries (profiling)")
        B, H, L, D = q.shape
        Hkv = cache.num_kv_heads
        special = torch.zeros(B, L, dtype=torch.bool, device=q.device) if self.special is None else self.special
        punct = torch.zeros(B, L, dtype=torch.bool, device=q.device) if self.punct is None else self.punct
        if self.special is None:
            special[:, 0] = True
        if special.shape != (B, L) or punct.shape != (B, L):
            raise AttentionInputError(f"FastGen: the token classes are for {tuple(special.shape)}, "
                                      f"the prefill is [B={B}, L={L}]")
        s = q.float().view(B, Hkv, H // Hkv, L, D) @ cache.keys().float().unsqueeze(2).transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        attn = torch.softmax(s, -1).mean(2)  # [B, Hkv, L, L]
        sets = self.policy_sets(attn, special, punct)  # [5, B, Hkv, L]
        recovered = (attn.sum(-2).unsqueeze(0) * sets).sum(-1) / L  # each row sums to 1
        ok = recovered >= self.recovery - 1e-6
        ok[-1] = True
        choice = ok.float().argmax(0)  # the cheapest policy that recovers T: [B, Hkv]
        kept = sets.gather(0, choice[None, ..., None].expand(1, B, Hkv, L))[0]  # [B, Hkv, L]
        n = int(kept.sum(-1).max())
        order = torch.where(kept, torch.arange(L, device=q.device), L + torch.arange(L, device=q.device))
        keep = order.sort(-1).values[..., :n]
        keep = torch.where(keep < L, keep, -1)
        self.policies = [[POLICIES[int(c)] for c in row] for row in choice]
        self.last_kept = n
        self.special = self.punct = None  # the classes were for this prefill
        return keep

    def press_details(self) -> dict:
        return {**super().press_details(), "policies": self.policies}


__all__ = ["FastGen", "POLICIES"]
