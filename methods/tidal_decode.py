"""TidalDecode: position-persistent sparse attention at decode time.

Yang, Zhang, Chen, Li, Jia, "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent
Sparse Attention" (arXiv 2410.05076, 2024), Sec. 3 and Alg. 1; official code DerrickYLJ/TidalDecode
(``src/tidal_build/modify_llama.py``: ``llama_tidal_attention_forward``; ``src/enable_tidal.py``:
``top_k=256, sparse_layer_start=2, correction_layer=13``).

Token selection is done in a few layers and reused by the others. At a decode step, with the
query q of one head and the layer's keys K (S tokens), per query head (with grouped K/V each
query head on its own, as the official code does after ``repeat_kv``):

  * layers before ``sparse_layer_start``: dense attention;
  * token-selection layers (``sparse_layer_start`` and each of ``reselection_layers``, the
    paper's re-selection "correction" layer): full attention, softmax(q K^T / sqrt(D)) V, and
    the positions of the k = min(token_budget, S) largest scores
        I = argtopk_j  q . k_j                                             (Alg. 1, line "select")
    are kept for the layers after;
  * every other layer: exact attention over the positions of the last selecting layer,
        o = softmax(q K_I^T / sqrt(D)) V_I                                  (position persistent)

The selection is shared across layers: each layer's ``KVCache`` carries its ``layer_idx`` and a
store ``shared`` common to the caches of one model (``models.hf_decode`` sets both); a selecting
layer leaves there the positions it chose for the current token, and a reusing layer reads them
(refusing a store that holds no choice for this token, or one from a later layer). A cache with
no layer index (one attention layer on its own, as ``runner=decode`` runs it) selects and reads
its own top k: the reusing layers' best case (their positions chosen by their own scores).

Defaults as the official code: token budget 256, selection at layer 2, re-selection at layer 13
(the paper's choice for Llama-3-8B; ``reselection_layers=[]`` turns it off). The prefill is dense
(the official code runs full attention for the prompt). A budget of at least the held tokens
reads them all (``min(S, top_k)`` as the official code): ``last_step["clamped"]`` says so.

Scores in the cache's dtype (the official code's is the model's), the top k in fp32; every
layer's exact attention is ``methods.decode.select_then_attend`` (the Triton gather kernel on
CUDA for the reusing layers; SDPA over the whole cache for the dense and selecting ones).

Bytes per step (``last_step``): a selecting layer reads every K/V row (full attention); a
reusing layer the selected rows (each (batch, KV head, row) once); a layer on its own also the
keys its selection scored (``index_bytes``).
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionInputError, AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection, top_k_selection

STORE = "tidal_decode"  # the key of the selection in KVCache.shared


class TidalDecode(DensePrefill, DecodePath, AttentionMethod):
    name = "tidal_decode"
    # what the README's method table says (python -m analysis.readme)
    paper = "Yang et al. 2024"
    kind = "sparse decode (top-k reused across layers), training-free"
    # the test's reference follows modify_llama.py: dense before layer 2, top-k at 2 and 13, reuse between
    official_test = "tests/test_decode_retrieval.py::test_tidal_decode_layers_reuse_the_selecting_layers_positions"
    exact = True  # the prefill is dense; the decode selects keys
    impls = ("reference",)

    def __init__(self, token_budget: int = 256, sparse_layer_start: int = 2,
                 reselection_layers: list[int] | tuple[int, ...] = (13,), impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if token_budget < 1:
            raise ValueError(f"TidalDecode: token_budget must be >= 1, got {token_budget}")
        if sparse_layer_start < 0:
            raise ValueError(f"TidalDecode: sparse_layer_start must be >= 0, got {sparse_layer_start}")
        reselection_layers = tuple(int(x) for x in (reselection_layers or ()))
        if any(x <= sparse_layer_start for x in reselection_layers):
            raise ValueError(f"TidalDecode: reselection_layers must come after sparse_layer_start="
                             f"{sparse_layer_start}, got {list(reselection_layers)}")
        self.token_budget, self.sparse_layer_start = int(token_budget), int(sparse_layer_start)
        self.reselection_layers = reselection_layers

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    # ---- decode ---------------------------------------------------------------------------------
    def role(self, cache: KVCache) -> str:
        """What this layer does at decode: "dense", "select" (full attention, keeps its top k),
        "reuse" (the last selecting layer's positions) or "alone" (no layer index: its own top k)."""
        layer = cache.layer_idx
        if layer is None:
            return "alone"
        if layer < self.sparse_layer_start:
            return "dense"
        if layer == self.sparse_layer_start or layer in self.reselection_layers:
            return "select"
        return "reuse"

    def scores(self, q_t, cache: KVCache) -> torch.Tensor:
        """q . k_j / sqrt(D) of every held key for each query head: [B, H, S] (fp32; fp64 inputs fp64)."""
        B, H, _, D = q_t.shape
        Hkv, S = cache.num_kv_heads, cache.length
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        q = q_t.view(B, Hkv, H // Hkv, D)  # in the cache's dtype (the model's, as the official code)
        return (q @ cache.keys().transpose(-1, -2)).view(B, H, S).to(dt) / math.sqrt(D)

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        role, S = self.role(cache), cache.length
        if role == "dense":
            return Selection()
        if role == "reuse":
            return self._reuse(q_t, cache)
        clamped = self.token_budget >= S
        top = top_k_selection(self.scores(q_t, cache), self.token_budget, clamped=clamped,
                              index_bytes=float(cache.batch * cache.num_kv_heads * S * cache.row_bytes()))
        if role == "select":  # slots = positions (no eviction)
            if cache.shared is not None:
                cache.shared[STORE] = {"layer": cache.layer_idx, "token": cache.seen - 1,
                                       "positions": cache.positions()[top.slots]}
            return Selection(clamped=clamped)  # full attention in the selecting layer
        return top

    def _reuse(self, q_t, cache: KVCache) -> Selection:
        me, layer = self.decode_name(), cache.layer_idx
        if cache.shared is None:
            raise AttentionInputError(
                f"{me}: layer {layer} reuses the selection of an earlier layer, but its cache shares no "
                f"selection store (KVCache.shared: models.hf_decode sets it for every layer)")
        got = cache.shared.get(STORE)
        if got is None or got["token"] != cache.seen - 1 or got["layer"] >= layer:
            held = "nothing" if got is None else f"layer {got['layer']}'s selection for token {got['token']}"
            raise AttentionInputError(
                f"{me}: layer {layer} decodes token {cache.seen - 1}, but the shared store holds {held}, "
                f"no earlier layer's selection for this token (the layers must decode in order, each "
                f"token through every layer)")
        pos = got["positions"]
        if tuple(pos.shape[:2]) != (cache.batch, self.num_heads) or bool((pos >= cache.length).any()):
            raise AttentionInputError(
                f"{me}: the shared selection {tuple(pos.shape)} does not fit layer {layer}'s cache "
                f"[B={cache.batch}, H={self.num_heads}, {cache.length} tokens]")
        if cache.head_pos is not None:
            raise AttentionInputError(f"{me}: a pressed cache (compact) holds no slot for every position")
        return Selection(slots=pos, clamped=self.token_budget >= cache.length)


__all__ = ["TidalDecode"]
