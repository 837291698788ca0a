"""KV-cache compression ("presses", issue 27): after the prefill, a press keeps a fraction of
each (batch, KV head)'s cached tokens and the generation decodes over those only.

    press = methods.load("snapkv", ratio=0.5, ...)            # a Press is a decode path
    cache = press.new_cache(B, L + N, dtype, device)
    o = press.prefill(q, k, v, cache)     # exact causal prefill; then the cache is compressed
    keep = press.compress(cache, q, layer_idx=0)   # (what prefill does) slots kept [B, Hkv, n]
    cache.compact(keep)                   # K/V moved into smaller tensors (methods.decode)
    o_t = press.decode(q_t, k_t, v_t, cache)       # dense over the kept tokens + new ones

The interface. ``ratio`` in (0, 1) is the share of the prefill's tokens evicted (the
convention of kvpress, NVIDIA's reference library): each (batch, KV head) keeps

    n = max(1, int(L * (1 - ratio)))   tokens of the L prefilled

(PyramidKV: a budget per layer). ``compress(cache, q, layer_idx)`` returns the kept slots,
[B, Hkv, n] (sorted), from the prefill's queries q [B, H, L, D] (those a press needs: SnapKV
its observation window, H2O all of them) and the cached keys; scorer presses rank tokens by
``scores`` [B, Hkv, L] and keep the top n. ``KVCache.compact`` then moves the kept K/V into
new tensors and frees the old ones: ``bytes_held`` is measured from the tensors the cache
owns after compaction (the runner also records the allocator's peak). Decode steps append the
new tokens after the kept ones and read every held key (exact attention over them); the step's
``positions`` are each head's own kept positions. Presses whose heads keep different counts
(RazorAttention, FastGen: ``keep`` padded with -1) get a ``PressCache`` that stores each
(batch, KV head)'s rows in its own tensors, so the bytes held are those of a per-head store.

Inside a model (``models.hf_decode``) each layer's press is told, before its prefill, its
layer index and the model's layer count (``set_layer``: PyramidKV's budget by depth, the
random press's seed), the prompt's token ids with the tokenizer's special and punctuation ids
(``set_tokens``: FastGen's token classes; a no-op for the others), and, once per model,
calibration text's q/k/v (``calibrate_layer``: RazorAttention's retrieval heads, Eigen
Attention's basis; a no-op for the others).

Query-aware or query-agnostic is decided by what the caller prefills: a press sees only the
prefill's queries, so a question inside the prompt steers it (query-aware), a question fed
afterwards (as decode steps) does not (query-agnostic; runner=decode is this setting: its
decode queries come after the compression). ``press_details()`` records the setting's inputs.

Rules (``AttentionInputError``/``ValueError`` naming the problem, before any compute): a ratio
outside (0, 1); a press on a cache it did not fill in full (one already compressed, or one that
evicts as it stores, or one with an index); queries that do not match the cache.

The prefill is exact (dense causal attention, as kvpress and the papers' code run it); the
press changes only what later tokens read.
"""
from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods import masks
from methods.base import AttentionInputError, AttentionMethod, Cost, dense_flops, masked_attention
from methods.decode import DecodePath, KVCache, causal_prefill, sdpa

COMPENSATION = -2  # position of a compensation token (RazorAttention) in ``head_pos``
# The SDPA backends a decode step may use: all but cuDNN's. On sm90/sm100 with cuDNN >= 9.15
# torch puts cuDNN attention first, and it builds (23-37 ms of host time) and caches one
# execution graph per problem shape, the key length included. A pressed cache's key length
# grows by one each step and differs between layers where the budgets do (PyramidKV) and
# between heads (RazorAttention, FastGen): a graph build for each, every step (PyramidKV took
# ~600 ms per step on an H200 against SnapKV's ~50, whose layers share one length). Flash
# attention (fp16/bf16), memory-efficient attention or the math path have no per-shape build;
# on the CPU the choice is the same as without the restriction (cuDNN is CUDA only).
STEP_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class PressCache(KVCache):
    """The cache of a press. ``compact(keep)`` with the same count for every (batch, KV head)
    keeps the dense layout ([B, Hkv, n + spare, D], as ``KVCache.compact``); with different
    counts (``keep`` padded with -1: RazorAttention's retrieval heads, FastGen's per-head
    policies) each (batch, KV head) gets its own K and V tensors of its kept rows plus the
    spare decode slots (``rows``), so ``bytes_held``, measured from the tensors, counts what a
    per-head store holds (no padding). ``head_pos`` stays a padded [B, Hkv, max + spare] map of
    positions (bookkeeping, like ``pos``, not counted); ``keys()``/``values()`` of a ragged
    cache are padded copies (zeros where a head holds nothing), made on demand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list | None = None  # ragged: rows[b][h] = (k [n_bh + spare, D], v)
        self.lens: list | None = None  # ragged: tokens held per (b, h)

    @property
    def capacity(self) -> int:
        return self.head_pos.shape[2] if self.rows is not None else self.k.shape[2]

    def bytes_held(self) -> int:
        if self.rows is None:
            return super().bytes_held()
        own = sum(t.numel() * t.element_size() for row in self.rows for kv in row for t in kv)
        return int(own + sum(t.numel() * t.element_size() for t in self.aux.values()))

    def compact(self, keep: torch.Tensor) -> None:
        super().compact(keep)
        if not bool((keep < 0).any()):
            return
        B, Hkv, n, D = self.batch, self.num_kv_heads, self.length, self.head_dim
        spare = self.k.shape[2] - n
        held = self.head_pos[:, :, :n] != -1
        counts = held.sum(-1)
        hp = torch.full((B, Hkv, int(counts.max()) + spare), -1, dtype=torch.long, device=self.device)
        self.rows, self.lens = [], counts.tolist()
        for b in range(B):
            row = []
            for h in range(Hkv):
                idx, c = held[b, h].nonzero().flatten(), self.lens[b][h]
                kv = []
                for x in (self.k, self.v):
                    t = torch.zeros(c + spare, D, dtype=self.dtype, device=self.device)
                    t[:c] = x[b, h, idx]
                    kv.append(t)
                row.append(tuple(kv))
                hp[b, h, :c] = self.head_pos[b, h, idx]
            self.rows.append(row)
        self.k = self.k.new_zeros(B, Hkv, 0, D)  # the padded tensors are freed
        self.v = self.v.new_zeros(B, Hkv, 0, D)
        self.head_pos, self.pos = hp, torch.full((hp.shape[2],), -1, dtype=torch.long, device=self.device)
        self.length = int(counts.max())

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.rows is None:
            return super().append(k, v)
        n = k.shape[2]
        for b, row in enumerate(self.rows):
            for h, (kh, vh) in enumerate(row):
                c = self.lens[b][h]
                if c + n > kh.shape[0]:
                    raise AttentionInputError(
                        f"KVCache: {c} held + {n} new tokens exceed KV head {h}'s capacity of {kh.shape[0]} "
                        f"tokens (build the cache with a larger capacity)")
                kh[c:c + n], vh[c:c + n] = k[b, h], v[b, h]
                self.head_pos[b, h, c:c + n] = torch.arange(self.seen, self.seen + n, device=self.device)
                self.lens[b][h] = c + n
        self.seen += n
        self.length = max(max(r) for r in self.lens)

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor, pos0: int) -> None:
        if self.rows is not None:
            raise AttentionInputError("KVCache: a cache holding per-head rows takes new tokens by append only")
        super().write(slot, k, v, pos0)

    def head_kv(self, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) held by (batch b, KV head h)."""
        if self.rows is None:
            return self.k[b, h, :self.length], self.v[b, h, :self.length], self.head_positions()[b, h]
        c = self.lens[b][h]
        kh, vh = self.rows[b][h]
        return kh[:c], vh[:c], self.head_pos[b, h, :c]

    def _padded(self, i: int) -> torch.Tensor:
        out = torch.zeros(self.batch, self.num_kv_heads, self.length, self.head_dim, dtype=self.dtype,
                          device=self.device)
        for b, row in enumerate(self.rows):
            for h, kv in enumerate(row):
                out[b, h, :self.lens[b][h]] = kv[i][:self.lens[b][h]]
        return out

    def keys(self) -> torch.Tensor:
        return super().keys() if self.rows is None else self._padded(0)

    def values(self) -> torch.Tensor:
        return super().values() if self.rows is None else self._padded(1)


def kept_count(length: int, ratio: float) -> int:
    """Tokens a (batch, KV head) keeps of ``length`` at compression ``ratio``."""
    return max(1, int(length * (1.0 - ratio)))


class Press(DecodePath, AttentionMethod):
    """A KV-cache press: exact prefill, then ``compress`` keeps ``kept_count`` tokens per
    (batch, KV head); subclasses define ``scores`` (or override ``compress``)."""

    kind = "KV-cache compression (press), training-free"
    exact = True  # the prefill is exact; the press acts on what decode reads
    impls = ("reference",)
    supports_noncausal = True  # the forward (prefill) is exact attention

    def __init__(self, ratio: float | None = 0.5, impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
            raise ValueError(f"{type(self).__name__}: ratio (the share of tokens evicted) must be in (0, 1), "
                             f"got {ratio}")
        self.ratio = None if ratio is None else float(ratio)  # None: the press sets its own budgets (FastGen)
        self.layer_idx = 0  # set per layer by a model (PyramidKV's budgets depend on it)
        self.last_kept: int | None = None

    @property
    def real_kernel(self) -> bool:
        return True  # the evicted K/V are freed: decode reads only what is kept

    # ---- prefill: exact ------------------------------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        mask = masks.attention_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal,
                                    key_padding_mask, q.device)
        return masked_attention(q, k, v, mask)

    def prefill_output(self, q, k, v):
        return causal_prefill(q, k, v)  # exact, through SDPA (no [L, L] matrix: light at 8k)

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * self.budget(tk) * self.head_dim * 2)

    # ---- the press -------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"ratio": self.ratio}

    def budget(self, length: int, layer_idx: int | None = None) -> int:
        """Tokens kept of ``length`` (per (batch, KV head))."""
        return kept_count(length, self.ratio)

    # ---- per layer, inside a model ---------------------------------------------------------
    def set_layer(self, layer_idx: int, num_layers: int) -> None:
        """This press compresses layer ``layer_idx`` of ``num_layers`` (a model's layer)."""
        if not 0 <= int(layer_idx) < int(num_layers):
            raise ValueError(f"{self.decode_name()}: layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        self.layer_idx = int(layer_idx)

    def set_tokens(self, input_ids: torch.Tensor, special_ids: torch.Tensor, punct_ids: torch.Tensor) -> None:
        """The next prefill's token ids [B, L] and the vocabulary's special and punctuation ids
        (presses that read token classes use them; the others ignore them)."""
        return None

    def calibrate_layer(self, q, k, v, period: int | None = None):
        """Calibration text's q [B, H, T, D], k, v [B, Hkv, T, D] at this layer (presses that
        calibrate use them; the others ignore them). ``period``: T = 2 P of P tokens repeated."""
        return None

    def calibrate_model(self, presses: dict) -> dict:
        """Called once after every layer's ``calibrate_layer`` with {layer index: that layer's
        press}, for presses that choose across layers (RazorAttention's retrieval heads);
        returns updated reports by layer ({} here)."""
        return {}

    needs_calibration = False  # True: the press cannot run before calibrate_layer (or its own settings)
    calibration_text = None  # "repeated": P tokens repeated twice (RazorAttention); "text": plain text

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        out = super().prefill(q, k, v, cache)
        cache.compact(self.compress(cache, q, self.layer_idx))
        return out

    def new_cache(self, batch: int, tokens: int, dtype=torch.float32, device="cpu") -> KVCache:
        return PressCache(batch, self.num_kv_heads, self.head_dim, self.cache_capacity(int(tokens)), dtype, device)

    def attend_selected(self, q_t, cache: KVCache, sel) -> torch.Tensor:
        """Exact attention over every held key of each head; empty slots (position -1) masked,
        and a compensation token (position ``COMPENSATION``) given ``aux["compensation"]``
        [B, Hkv] added to its score (RazorAttention: log of the tokens it stands for). A cache
        holding per-head rows (``PressCache.rows``) is read head by head. SDPA runs on
        ``STEP_BACKENDS`` (no cuDNN: no graph build per key length); no host synchronisation."""
        with sdpa_kernel(STEP_BACKENDS):
            return self._attend_held(q_t, cache, sel)

    def _attend_held(self, q_t, cache: KVCache, sel) -> torch.Tensor:
        if sel.slots is not None or cache.head_pos is None:
            return super().attend_selected(q_t, cache, sel)
        comp = cache.aux.get("compensation")
        g = q_t.shape[1] // cache.num_kv_heads
        if getattr(cache, "rows", None) is not None:
            out = torch.empty_like(q_t)
            for b in range(cache.batch):
                for h in range(cache.num_kv_heads):
                    k, v, pos = cache.head_kv(b, h)
                    add = None
                    if comp is not None:
                        add = torch.where(pos == COMPENSATION, comp[b, h], 0.0).to(q_t.dtype).view(1, 1, 1, -1)
                    out[b:b + 1, h * g:(h + 1) * g] = sdpa(q_t[b:b + 1, h * g:(h + 1) * g], k[None, None],
                                                           v[None, None], add)
            return out
        S = cache.length
        hp = cache.head_pos[:, :, :S]
        k, v = cache.keys(), cache.values()
        # a PressCache in the dense layout has no empty slot (a keep padded with -1 gives per-head
        # rows), so it needs no look at its positions (a host synchronisation per step)
        holes = not isinstance(cache, PressCache) and not bool((hp != -1).all())
        if comp is None and not holes:
            return sdpa(q_t, k, v)
        add = torch.zeros(hp.shape, dtype=q_t.dtype, device=q_t.device)
        if comp is not None:
            add = torch.where(hp == COMPENSATION, comp[:, :, None].to(q_t.dtype), add)
        add = add.masked_fill(hp == -1, float("-inf")).repeat_interleave(g, 1).unsqueeze(2)  # [B, H, 1, S]
        return sdpa(q_t, k, v, add)

    def compress(self, cache: KVCache, q: torch.Tensor | None = None, layer_idx: int | None = None) -> torch.Tensor:
        """Slots kept per (batch, KV head), [B, Hkv, n] sorted: the top n of ``scores``."""
        self.check_press(cache, q)
        n = min(self.budget(cache.length, layer_idx), cache.length)
        scores = self.scores(cache, q).float()
        keep = scores.topk(n, dim=-1).indices.sort(-1).values
        self.last_kept = n
        return keep

    def scores(self, cache: KVCache, q: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        """Importance of each held token, [B, Hkv, L] (higher is kept)."""
        raise NotImplementedError

    def press_details(self) -> dict:
        return {"press": self.decode_name(), "ratio": self.ratio, "kept_per_head": self.last_kept,
                "setting": "the prefill's queries only (query-aware iff the question is in the prefill)"}

    def check_press(self, cache: KVCache, q) -> None:
        me = self.decode_name()
        if not isinstance(cache, KVCache):
            raise AttentionInputError(f"{me}: a press needs a KVCache, got {type(cache).__name__}")
        if cache.head_pos is not None or cache.length != cache.seen or cache.aux or cache.length < 1:
            raise AttentionInputError(
                f"{me}: a press needs a cache holding every prefilled token in order (this one holds "
                f"{cache.length} of {cache.seen} tokens{', already compressed' if cache.head_pos is not None else ''}"
                f"{', with an index' if cache.aux else ''})")
        if q is not None and (q.dim() != 4 or q.shape[0] != cache.batch or q.shape[2] != cache.length
                              or q.shape[3] != cache.head_dim or q.shape[1] % cache.num_kv_heads):
            raise AttentionInputError(
                f"{me}: the press's queries must be the prefill's, [B={cache.batch}, H, L={cache.length}, "
                f"D={cache.head_dim}] with H a multiple of {cache.num_kv_heads}, got {tuple(q.shape)}")


def window_attention(q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """Softmax attention probabilities of the last ``window`` queries of q [B, H, L, D] over the
    keys k [B, Hkv, L, D], causal (query L - w + i sees keys <= L - w + i), in fp32:
    [B, Hkv, H / Hkv, w, L] (the query heads grouped under their KV head)."""
    B, H, L, D = q.shape
    Hkv, w = k.shape[1], min(window, L)
    qw = q[:, :, L - w:].float().view(B, Hkv, H // Hkv, w, D)
    s = qw @ k.float().unsqueeze(2).transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, g, w, L]
    qpos = torch.arange(L - w, L, device=q.device).view(w, 1)
    s = s.masked_fill(torch.arange(L, device=q.device).view(1, L) > qpos, float("-inf"))
    return torch.softmax(s, dim=-1)


__all__ = ["COMPENSATION", "STEP_BACKENDS", "Press", "PressCache", "kept_count", "window_attention"]
