"""RazorAttention: retrieval heads keep their whole cache; the others keep sinks and a recent
buffer, the dropped tokens folded into one compensation token.

Tang, Lin, Lin, Han, Hong, Yao, Wang, "RazorAttention: Efficient KV Cache Compression Through
Retrieval Heads" (ICLR 2025; arXiv 2407.15891), Sec. 3, Alg. 1 (RoPE models), Eq. 4-5. The
paper's code is not public; the authors' company (Huawei) released it as tools: the head
selection (shares, ranking over the whole model, the max over a KV group's query heads) follows
msModelSlim's ``ra_compression`` (``RARopeCompressor``, ``ra_rope_tools.py``) and MindSpore
Golden-Stick's ``RazorAttention`` (the same rule); what a non-retrieval head keeps follows
Golden-Stick's deployment code (below), the paper's reading an option.

Retrieval heads (Sec. 3.2) are found on calibration text: a sequence of P random tokens
repeated twice, run through the model. For a query at position i in the second copy (i >= P):

    echo(h)      = mean_i P_h[i, i - P]        (attends the same token in the first copy)
    induction(h) = mean_i P_h[i, i - P + 1]    (attends the token that followed it)

``calibrate(q, k, period)`` takes one layer's q [B, H, 2P, D], k [B, Hkv, 2P, D] on that text;
a KV head's score is the largest of its query heads' (its cache serves all of them). The
retrieval KV heads are chosen among all the model's KV heads (``selection="model"``, the
default, as Huawei's released tool for the paper does, msModelSlim ``RARopeCompressor`` and
its ``ra_compress`` analysis: all layers' KV-head scores ranked together): the top
round(N ``induction_share``) of the N KV heads by induction score plus the top round(N
``echo_share``) by echo score (defaults 14% and 1%, the tool's and the paper's). Inside a model
``models.hf_decode.calibrate`` scores every layer (``calibrate_layer``) and then hands all the
layers' presses to ``calibrate_model``, which ranks them together; a press calibrated alone
ranks its own layer's heads by the same rule. ``selection="layer"`` is the per-layer reading
(at least one of each kind per layer: max(1, ceil(Hkv share)); with SmolLM2's 3 KV heads a
layer, it keeps every layer partly whole). ``retrieval_heads`` names a layer's heads directly
instead. A press with none of these is refused before the prefill.

Non-retrieval heads. Defaults as the authors' company's released deployment code (MindSpore
Golden-Stick, mindspore-ai/golden-stick: ``RAConfig`` in
``mindspore_gs/sequence_compress/razor_attention/ra_config.py``, sink_size 4, local_capacity
256, use_virtual_token True; the cache cut in ``DeployRACompressCell._compress`` of
``mindspore_gs/experimental/long_context_compress/razor_attention/wrappers/vllm_mindspore/
attention_wrappers.py``): a head keeps ``local_capacity`` entries of the N prefill tokens in all,
whatever the ratio (``ratio=None``, the default): the first ``num_sink`` tokens N_0, the
compensation token and the local_capacity - N_0 - 1 most recent tokens (a prompt of at most
local_capacity tokens is kept whole). The paper's reading (Alg. 1), ``ratio`` given (in (0, 1),
the share evicted: ``press.ratio``): the first N_0 tokens plus a recent buffer of L_h = max(S_0,
int(N (1 - ratio))) tokens (``min_window`` S_0, our choice 1024) plus the compensation token. Either way the
N_d dropped tokens D become one compensation token (Eq. 4)

    k^ = (1 / N_d) sum_{m in D} k_m,     v^ = (1 / N_d) sum_{m in D} v_m

``compensation="mean"`` (the default, the deployment code's virtual token: its decode runs
plain paged attention over the cut cache): decode attends over it as over any kept key. ``compensation="weighted"`` (the paper's Eq. 5) counts it N_d
times:

    o = (N_d e^{q k^ / sqrt(d)} v^ + sum_{m kept} e^{q k_m / sqrt(d)} v_m)
        / (N_d e^{q k^ / sqrt(d)} + sum_{m kept} e^{q k_m / sqrt(d)})

i.e. softmax with log N_d added to the compensation token's score (``aux["compensation"]``
[B, Hkv], counted in ``bytes_held``). ``compensation="none"`` (use_virtual_token False) drops
D outright; the deployment code then gives the slot to one more recent token (local_capacity -
N_0 recent). The compensation token's position is ``COMPENSATION``. Retrieval heads attend
over their whole cache. When a layer has both kinds, each KV head holds its own rows
(``methods.press.PressCache``: the retrieval heads N, the others their sinks, buffer and
compensation token), so ``bytes_held``, measured from the tensors, falls by what the
non-retrieval heads dropped.
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionInputError
from methods.decode import DecodePath, KVCache
from methods.press import COMPENSATION, Press

SELECTIONS = ("model", "layer")
COMPENSATIONS = ("mean", "weighted", "none")


def top_heads(scores: dict, share: float) -> set:
    """The (layer, KV head) pairs of the round(N share) largest of ``scores`` ({layer: [score per
    KV head]}), N the number of pairs (ties: the lower layer, then the lower head)."""
    pairs = sorted(((float(x), li, h) for li, row in scores.items() for h, x in enumerate(row)),
                   key=lambda t: (-t[0], t[1], t[2]))
    return {(li, h) for _, li, h in pairs[:round(len(pairs) * share)]}


class RazorAttention(Press):
    name = "razor_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Tang et al. 2025"
    kind = "KV-cache compression (press): retrieval heads full, others sinks + buffer + compensation"
    official_test = None

    def __init__(self, ratio: float | None = None, num_sink: int = 4, local_capacity: int = 256,
                 compensation: str = "mean", min_window: int = 1024, induction_share: float = 0.14,
                 echo_share: float = 0.01, retrieval_heads: list | None = None, selection: str = "model",
                 impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        if num_sink < 0 or min_window < 1:
            raise ValueError(f"RazorAttention: num_sink must be >= 0 and min_window >= 1, got {num_sink}, {min_window}")
        if compensation not in COMPENSATIONS:
            raise ValueError(f"RazorAttention: compensation must be one of {COMPENSATIONS}, got {compensation!r}")
        if local_capacity < num_sink + 2:
            raise ValueError(f"RazorAttention: local_capacity (entries a non-retrieval head keeps: sinks, the "
                             f"compensation token, recent tokens) must be >= num_sink + 2 = {num_sink + 2}, "
                             f"got {local_capacity}")
        if not (0 <= induction_share <= 1 and 0 <= echo_share <= 1):
            raise ValueError(f"RazorAttention: induction_share and echo_share must be in [0, 1], got "
                             f"{induction_share}, {echo_share}")
        if selection not in SELECTIONS:
            raise ValueError(f"RazorAttention: selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        self.num_sink, self.min_window, self.local_capacity = int(num_sink), int(min_window), int(local_capacity)
        self.compensation = compensation
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
                "local_capacity": self.local_capacity, "compensation": self.compensation, "selection": self.selection, "retrieval": None if self.retrieval is None else tuple(self.retrieval)}

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
        self.head_scores = {"echo": echo_kv.tolist(), "induction": ind_kv.tolist()}
        if self.selection == "layer":
            n_ind = max(1, math.ceil(self.induction_share * Hkv)) if self.induction_share > 0 else 0
            n_echo = max(1, math.ceil(self.echo_share * Hkv)) if self.echo_share > 0 else 0
            heads = set(ind_kv.topk(n_ind).indices.tolist()) | set(echo_kv.topk(n_echo).indices.tolist())
            self.retrieval = sorted(heads)
        else:  # this layer alone, until calibrate_model ranks every layer's heads together
            self.calibrate_model({self.layer_idx: self})
        return self.head_scores

    def calibrate_model(self, presses: dict) -> dict:
        """Retrieval heads chosen among every layer's KV heads (``selection="model"``):
        ``presses`` {layer index: its calibrated RazorAttention}; sets each one's retrieval heads
        and returns {layer: {"retrieval_heads": [...], "echo": [...], "induction": [...]}}."""
        if self.selection == "layer":
            return {}
        missing = [i for i, p in presses.items() if getattr(p, "head_scores", None) is None]
        if missing:
            raise AttentionInputError(f"RazorAttention.calibrate_model: layers {missing} were not calibrated")
        chosen = top_heads({i: p.head_scores["induction"] for i, p in presses.items()}, self.induction_share) | \
            top_heads({i: p.head_scores["echo"] for i, p in presses.items()}, self.echo_share)
        out = {}
        for i, p in presses.items():
            p.retrieval = sorted(h for li, h in chosen if li == i)
            out[i] = {"retrieval_heads": list(p.retrieval), **p.head_scores}
        return out

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
        """(sinks, recent tokens) a non-retrieval head keeps of ``length`` tokens; the others
        are dropped (folded into the compensation token unless compensation="none")."""
        s = min(self.num_sink, length)
        if self.ratio is None:  # the deployment code: local_capacity entries in all
            if length <= self.local_capacity:
                return s, length - s
            return s, self.local_capacity - s - (0 if self.compensation == "none" else 1)
        return s, min(length - s, max(self.min_window, int(length * (1.0 - self.ratio))))

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        s, w = self.buffer(length)
        return s + w + (1 if length > s + w and self.compensation != "none" else 0)

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        if self.retrieval is None:
            raise AttentionInputError("RazorAttention: no retrieval heads: call calibrate(q, k, period) on "
                                      "calibration text first, or give retrieval_heads")
        out = DecodePath.prefill(self, q, k, v, cache)
        self.check_press(cache, q)
        L, Hkv = cache.length, cache.num_kv_heads
        s, w = self.buffer(L)
        nd = L - s - w
        comp = 1 if nd and self.compensation != "none" else 0
        small = s + w + comp
        others = [h for h in range(Hkv) if h not in self.retrieval]
        keep = torch.full((cache.batch, Hkv, L if self.retrieval else small), -1, dtype=torch.long, device=cache.device)
        # non-retrieval heads: sinks, the recent buffer, then slot s (a dropped token's) holding the compensation
        mine = torch.cat([torch.arange(s), torch.arange(L - w, L), torch.arange(s, s + comp)])
        for h in range(Hkv):
            if h in self.retrieval:
                keep[:, h] = torch.arange(L, device=cache.device)
            else:
                keep[:, h, :small] = mine.to(cache.device)
        if comp and others:  # Eq. 4: the dropped tokens' mean key and value, per non-retrieval head
            k_hat = cache.keys()[:, others, s:L - w].float().mean(2)
            v_hat = cache.values()[:, others, s:L - w].float().mean(2)
            cache.k[:, others, s] = k_hat.to(cache.dtype)
            cache.v[:, others, s] = v_hat.to(cache.dtype)
        cache.compact(keep)  # mixed heads: each KV head its own rows (PressCache)
        if comp and others:
            cache.head_pos[:, others, s + w] = COMPENSATION
            if self.compensation == "weighted":
                weight = torch.zeros(cache.batch, Hkv, dtype=torch.float32, device=cache.device)
                weight[:, others] = math.log(nd)  # Eq. 5: the compensation token counts N_d times
                cache.aux["compensation"] = weight
        self.last_kept = small
        return out

    def press_details(self) -> dict:
        return {**super().press_details(), "retrieval_heads": self.retrieval, "head_scores": self.head_scores}


__all__ = ["COMPENSATION", "RazorAttention", "top_heads"]
