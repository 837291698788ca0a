"""RazorAttention: retrieval heads keep their whole cache; the others keep sinks and a recent
buffer, the dropped tokens folded into one compensation token.

Tang, Lin, Lin, Han, Hong, Yao, Wang, "RazorAttention: Efficient KV Cache Compression Through
Retrieval Heads" (ICLR 2025; arXiv 2407.15891), Sec. 3, Alg. 1 (RoPE models), Eq. 4-5. No
official code is public: the shares and sizes below are our reading of the paper.

Retrieval heads (Sec. 3.2) are found on calibration text: a sequence of P random tokens
repeated twice, run through the model. For a query at position i in the second copy (i >= P):

    echo(h)      = mean_i P_h[i, i - P]        (attends the same token in the first copy)
    induction(h) = mean_i P_h[i, i - P + 1]    (attends the token that followed it)

``calibrate(q, k, period)`` takes one layer's q [B, H, 2P, D], k [B, Hkv, 2P, D] on that text;
a KV head's score is the largest of its query heads' (its cache serves all of them), and the
retrieval KV heads are the top ``induction_share`` by induction score plus the top
``echo_share`` by echo score (at least one each; defaults 14% and 1%). ``retrieval_heads``
names them directly instead. A press with neither is refused before the prefill.

Non-retrieval heads (Alg. 1): with N prefill tokens the buffer is L_h = max(S_0, int(N (1 -
ratio))) recent tokens (``min_window`` S_0) plus the first ``num_sink`` N_0; the N_d dropped
tokens D become one compensation token (Eq. 4)

    k^ = (1 / N_d) sum_{m in D} k_m,     v^ = (1 / N_d) sum_{m in D} v_m

and decode attends (Eq. 5)

    o = (N_d e^{q k^ / sqrt(d)} v^ + sum_{m kept} e^{q k_m / sqrt(d)} v_m)
        / (N_d e^{q k^ / sqrt(d)} + sum_{m kept} e^{q k_m / sqrt(d)})

i.e. softmax with log N_d added to the compensation token's score (``aux["slot_bias"]``,
counted in ``bytes_held``). Retrieval heads attend over their whole cache. The cache is one
tensor [B, Hkv, n, D] with n the longest head's count: while a retrieval head keeps all N the
others' slots past their buffer are empty (masked), so ``bytes_held`` falls only when no head
of the layer is a retrieval head (a per-head ragged store, as the paper's, would hold less;
kvpress's head-wise presses mask likewise). The compensation slot's position is -2.
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionInputError
from methods.decode import DecodePath, KVCache
from methods.press import Press

COMPENSATION = -2  # position of the compensation token in ``head_pos``


class RazorAttention(Press):
    name = "razor_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Tang et al. 2025"
    kind = "KV-cache compression (press): retrieval heads full, others sinks + buffer + compensation"
    official_test = None

    def __init__(self, ratio: float = 0.8, num_sink: int = 4, min_window: int = 1024, induction_share: float = 0.14,
                 echo_share: float = 0.01, retrieval_heads: list | None = None, impl: str = "reference",
                 **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        if num_sink < 0 or min_window < 1:
            raise ValueError(f"RazorAttention: num_sink must be >= 0 and min_window >= 1, got {num_sink}, {min_window}")
        if not (0 <= induction_share <= 1 and 0 <= echo_share <= 1):
            raise ValueError(f"RazorAttention: induction_share and echo_share must be in [0, 1], got "
                             f"{induction_share}, {echo_share}")
        self.num_sink, self.min_window = int(num_sink), int(min_window)
        self.induction_share, self.echo_share = float(induction_share), float(echo_share)
        self.retrieval: list[int] | None = None
        self.head_scores: dict | None = None
        if retrieval_heads is not None:
            heads = sorted({int(h) for h in retrieval_heads})
            if any(not 0 <= h < self.num_kv_heads for h in heads):
                raise ValueError(f"RazorAttention: retrieval_heads must be KV heads in [0, {self.num_kv_heads}), "
                                 f"got {list(retrieval_heads)}")
            self.retrieval = heads

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "num_sink": self.num_sink, "min_window": self.min_window,
                "retrieval": None if self.retrieval is None else tuple(self.retrieval)}

    # ---- retrieval heads from calibration text ----------------------------------------------
    def calibrate(self, q, k=None, period: int | None = None) -> dict:
        """Echo and induction scores on repeated random tokens (q [B, H, 2P, D], k [B, Hkv, 2P, D]);
        sets the retrieval KV heads and returns the scores per KV head."""
        if k is None or period is None or q.dim() != 4 or k.dim() != 4 or q.shape[2] != 2 * period \
                or k.shape[2] != 2 * period or k.shape[1] != self.num_kv_heads or q.shape[1] != self.num_heads:
            raise AttentionInputError(
                f"RazorAttention.calibrate needs q [B, {self.num_heads}, 2P, D], k [B, {self.num_kv_heads}, 2P, D] "
                f"of P tokens repeated twice and period=P")
        B, H, T, D = q.shape
        P, Hkv = int(period), self.num_kv_heads
        s = q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = torch.softmax(s, -1)  # [B, H, T, T]
        i = torch.arange(P, T, device=q.device)
        echo = p[:, :, i, i - P].mean((0, 2))  # [H]
        ind = p[:, :, i[:-1], i[:-1] - P + 1].mean((0, 2))
        echo_kv, ind_kv = echo.view(Hkv, -1).amax(1), ind.view(Hkv, -1).amax(1)
        n_ind = max(1, math.ceil(self.induction_share * Hkv)) if self.induction_share > 0 else 0
        n_echo = max(1, math.ceil(self.echo_share * Hkv)) if self.echo_share > 0 else 0
        heads = set(ind_kv.topk(n_ind).indices.tolist()) | set(echo_kv.topk(n_echo).indices.tolist())
        self.retrieval = sorted(heads)
        self.head_scores = {"echo": echo_kv.tolist(), "induction": ind_kv.tolist()}
        return self.head_scores

    calibration_text = "repeated"

    @property
    def needs_calibration(self) -> bool:
        return self.retrieval is None

    def calibrate_layer(self, q, k, v, period: int | None = None) -> dict:
        """``calibrate`` on this layer's q, k of P tokens repeated twice (``period`` P), inside a
        model (``models.hf_decode.calibrate``)."""
        if period is None:
            raise AttentionInputError("RazorAttention.calibrate_layer needs period=P: calibration text of P tokens "
                                      "repeated twice")
        scores = self.calibrate(q, k, period)
        return {"retrieval_heads": list(self.retrieval), **scores}

    # ---- the press ------------------------------------------------------------------------------
    def buffer(self, length: int) -> tuple[int, int]:
        """(sinks, recent buffer) a non-retrieval head keeps of ``length`` tokens."""
        s = min(self.num_sink, length)
        return s, min(length - s, max(self.min_window, int(length * (1.0 - self.ratio))))

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        s, w = self.buffer(length)
        return s + w + (1 if length > s + w else 0)

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        if self.retrieval is None:
            raise AttentionInputError("RazorAttention: no retrieval heads: call calibrate(q, k, period) on "
                                      "calibration text first, or give retrieval_heads")
        out = DecodePath.prefill(self, q, k, v, cache)
        self.check_press(cache, q)
        L, Hkv = cache.length, cache.num_kv_heads
        s, w = self.buffer(L)
        nd = L - s - w
        small = s + w + (1 if nd else 0)
        n = L if self.retrieval else small
        keep = torch.full((cache.batch, Hkv, n), -1, dtype=torch.long, device=cache.device)
        mine = torch.cat([torch.arange(s), torch.arange(L - w, L)]).to(cache.device)
        others = [h for h in range(Hkv) if h not in self.retrieval]
        for h in range(Hkv):
            keep[:, h, :L if h in self.retrieval else s + w] = torch.arange(L, device=cache.device) \
                if h in self.retrieval else mine
        if nd:  # Eq. 4: the dropped tokens' mean key and value, per non-retrieval head
            k_hat = cache.keys()[:, others, s:L - w].float().mean(2)
            v_hat = cache.values()[:, others, s:L - w].float().mean(2)
        cache.compact(keep)
        if nd and others:
            cache.k[:, others, s + w] = k_hat.to(cache.dtype)
            cache.v[:, others, s + w] = v_hat.to(cache.dtype)
            cache.head_pos[:, others, s + w] = COMPENSATION
            bias = torch.zeros(cache.batch, Hkv, cache.capacity, dtype=torch.float32, device=cache.device)
            bias[:, others, s + w] = math.log(nd)  # Eq. 5: the compensation token counts N_d times
            cache.aux["slot_bias"] = bias
        self.last_kept = small
        return out

    def press_details(self) -> dict:
        return {**super().press_details(), "retrieval_heads": self.retrieval, "head_scores": self.head_scores}


__all__ = ["RazorAttention"]
