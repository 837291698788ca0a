"""The decode contract (issue 24): a method's decode path over a KV cache that it fills and reads.

    path = decode_path(method)                      # the method itself, or an adapter (below)
    cache = path.new_cache(batch, capacity, dtype, device)
    o = path.prefill(q, k, v, cache)                # causal; q [B, H, L, D], k, v [B, Hkv, L, D]
    o_t = path.decode(q_t, k_t, v_t, cache)         # one token: q_t [B, H, 1, D], k_t, v_t [B, Hkv, 1, D]
    path.last_step                                  # what the step read (below)
    cache.bytes_held()                              # bytes of every tensor the cache owns
    path.calibrate(samples)                         # offline statistics, where the path needs them

A decode step is three phases, which ``runners.decode`` times apart:

    append(cache, k_t, v_t)                write the new key and value, update the method's index
    select(q_t, cache)                     choose the cached keys each query head reads (a ``Selection``)
    attend_selected(q_t, cache, selection) exact attention over them (plus any correction: SparQ's)

``KVCache`` owns the stored K/V (contiguous, [B, Hkv, capacity, D]), the absolute position of
every slot, and the method's auxiliary index in ``aux`` (Quest's page summaries, SparQ's K^T
copy and running value mean). ``bytes_held`` counts the tensors it owns, allocated (K, V and
aux; the slot positions are bookkeeping and not counted). A KV-cache press (``methods.press``)
compresses it after the prefill with ``compact(keep)``: the kept slots of each (batch, KV head)
move into smaller tensors, and each head then holds its own positions (``head_positions()``). ``last_step`` after a decode says
which absolute positions each query head read (``positions`` [B, H, n], -1 for padding;
None: every held key), the bytes the step read (``index_bytes``: summaries or partial keys;
``kv_bytes``: the K/V rows read, each (batch, KV head, slot) counted once however many query
heads of its group read it), ``clamped`` (below) and, for some methods, ``stats``: numbers of
their own per step (RetrievalAttention's top-k recall), which ``runner=decode`` records. In a
model (``models.hf_decode``) each layer's cache also carries its ``layer_idx`` and a ``shared``
store common to the layers (TidalDecode's selecting layers leave their choice there).

Paths:
  a method implementing the contract (``DecodePath``): Quest, SparQ (prefill dense, decode
      selects), StreamingLLM (sinks + recent window, the rest evicted from the cache)
  ``SinkWindowAdapter``: the existing methods whose decode is defined by their prefill pattern:
      sliding window (window, no sinks) and MInference's A-shape (num_sink + window); the cache
      keeps only those keys (a rolling buffer, as StreamingLLM and Mistral's sliding window do)
  ``decode_adapter()``: a method whose decode path is an adapter built in its own module (the
      method's names would clash with the contract's): NSA (its three branches over the cache),
      SparseK (scores kept per key), the linear family (``methods.recurrent_decode``: a state)
  ``DenseAdapter``: every other method decodes densely over its whole cache: its
      ``decode_fallback`` is "dense" (None for exact methods, whose decode is dense by definition)

Dense decode over the full history is the reference the decode runner compares every path to.

The decode-time selectors (Quest, SparQ, Loki, Double Sparsity, TidalDecode, RetrievalAttention,
Squeezed Attention, Twilight) share one shape: approximate scores -> top-k (``top_k_selection``)
-> exact attention over the chosen keys (``select_then_attend``, the default ``attend_selected``:
on CUDA the Triton gather kernel of ``methods.kernels.decode`` reads the chosen rows in place,
with no host synchronisation; elsewhere the reference gathers them and runs SDPA).

Calibration: a path whose index rests on offline statistics (Loki's PCA of keys, Double
Sparsity's heavy channels) sets ``needs_calibration``; ``calibrate(samples)`` takes calibration
data of the layer, a list of (q, k) pairs (q [B, H, T, D], k [B, Hkv, T, D]; the convention of
``MInference.calibrate``), and a prefill before it is refused.

Rules (each raises ``AttentionInputError`` naming the problem, before any compute):
  * a cache built for another shape (batch, KV heads, head dim, dtype) than the inputs or the
    method, or filled by another method or other hyperparameters, is refused;
  * decode before prefill is refused; so is prefill into a cache that already holds tokens,
    writing past the cache's capacity, and a prefill of a path that needs calibration before it;
  * a budget larger than the cache (Quest's token budget, SparQ's k) is clamped to the cache, as
    the official code does (``min(kv_seq_len, token_budget)``, ``min(k, S)``): every held key is
    read, and ``last_step["clamped"]`` says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from methods.base import AttentionInputError


class KVCache:
    """K/V of one attention layer, stored contiguously, plus the method's index (``aux``).

    Slots ``[0, length)`` hold keys; ``pos[s]`` is the absolute position of slot ``s`` (-1:
    empty); ``seen`` counts the tokens written so far (the next token's position)."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        for n, x in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                     ("capacity", capacity)):
            if int(x) < 1:
                raise ValueError(f"KVCache: {n} must be >= 1, got {x}")
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.length = 0
        self.seen = 0
        self.aux: dict[str, torch.Tensor] = {}
        self.owner: str | None = None  # the decode path (and hyperparameters) that filled it
        self.head_pos: torch.Tensor | None = None  # [B, Hkv, capacity] after ``compact`` (a press)
        # a model's layer: its index, and a store shared by the caches of all its layers (set by
        # models.hf_decode; TidalDecode's selecting layers leave their choice there for the next)
        self.layer_idx: int | None = None
        self.shared: dict | None = None

    # ---- what it holds ------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def keys(self) -> torch.Tensor:
        return self.k[:, :, :self.length]

    def values(self) -> torch.Tensor:
        return self.v[:, :, :self.length]

    def positions(self) -> torch.Tensor:
        return self.pos[:self.length]

    def head_positions(self) -> torch.Tensor:
        """Absolute position of each held slot per (batch, KV head): [B, Hkv, length] (after a
        press's ``compact`` each head keeps its own tokens; before, all share ``positions()``)."""
        if self.head_pos is not None:
            return self.head_pos[:, :, :self.length]
        return self.positions().expand(self.batch, self.num_kv_heads, -1)

    def row_bytes(self) -> int:
        """Bytes of one key (or value) row of one KV head."""
        return self.head_dim * self.k.element_size()

    def bytes_held(self) -> int:
        """Bytes of the tensors the cache owns: K and V at capacity plus the method's index."""
        own = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return int(own + sum(t.numel() * t.element_size() for t in self.aux.values()))

    # ---- writing ------------------------------------------------------------------------
    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor, pos0: int) -> None:
        """Write ``k``, ``v`` [B, Hkv, n, D], the tokens at positions pos0 ... pos0 + n - 1, into
        the consecutive slots slot ... slot + n - 1 (plain slices: no device synchronisation)."""
        n = k.shape[2]
        if slot + n > self.capacity:
            raise AttentionInputError(
                f"KVCache: writing {n} tokens at slot {slot} exceeds the cache's capacity of "
                f"{self.capacity} tokens (build the cache with a larger capacity)")
        self.k[:, :, slot:slot + n] = k
        self.v[:, :, slot:slot + n] = v
        self.pos[slot:slot + n] = torch.arange(pos0, pos0 + n, device=self.device)
        if self.head_pos is not None:
            self.head_pos[:, :, slot:slot + n] = self.pos[slot:slot + n]
        self.length = max(self.length, slot + n)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` [B, Hkv, n, D], the next tokens, at the next slots."""
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise AttentionInputError(
                f"KVCache: {self.length} held + {n} new tokens exceed the cache's capacity of "
                f"{self.capacity} tokens (build the cache with a larger capacity)")
        self.write(self.length, k, v, self.seen)
        self.seen += n

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the held slots ``keep`` [B, Hkv, n] of each (batch, KV head) (a KV-cache
        press: ``methods.press``), in that order: K and V move into new tensors of n slots
        plus the ``capacity - length`` still free, and the old ones are released, so that
        ``bytes_held`` (measured from the tensors) shrinks. Each (batch, KV head) then holds
        its own positions (``head_pos``; bookkeeping, like ``pos``, not counted in
        ``bytes_held``); later tokens are appended after slot n - 1, as before. A slot -1 in
        ``keep`` leaves that slot empty (position -1: heads keeping fewer tokens than others,
        padded; a press masks them). A cache with an index (``aux``) is refused: the index
        would describe slots that moved."""
        B, Hkv, S = self.batch, self.num_kv_heads, self.length
        if keep.dim() != 3 or tuple(keep.shape[:2]) != (B, Hkv) or keep.shape[2] < 1:
            raise AttentionInputError(
                f"KVCache.compact: keep must be [B={B}, Hkv={Hkv}, n >= 1] slot indices, got {tuple(keep.shape)}")
        if keep.dtype not in (torch.int32, torch.int64) or bool((keep < -1).any() | (keep >= S).any()):
            raise AttentionInputError(
                f"KVCache.compact: keep must hold integer slots in [0, {S}) (the held slots) or -1 (empty)")
        if self.aux:
            raise AttentionInputError(
                f"KVCache.compact: the cache holds an index ({', '.join(self.aux)}) that compaction would break")
        n, spare = keep.shape[2], self.capacity - S
        empty = (keep < 0).unsqueeze(-1)
        idx = keep.long().clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        hp = self.head_positions().gather(2, keep.long().clamp_min(0)).masked_fill(keep < 0, -1)
        k = torch.empty(B, Hkv, n + spare, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        k[:, :, :n] = self.k[:, :, :S].gather(2, idx).masked_fill(empty, 0)
        v[:, :, :n] = self.v[:, :, :S].gather(2, idx).masked_fill(empty, 0)
        self.k, self.v = k, v  # the old tensors are freed here (nothing else refers to them)
        self.head_pos = torch.full((B, Hkv, n + spare), -1, dtype=torch.long, device=self.device)
        self.head_pos[:, :, :n] = hp
        self.pos = torch.full((n + spare,), -1, dtype=torch.long, device=self.device)  # shared: none now
        self.length = n


@dataclass
class Selection:
    """What a decode step reads. ``slots`` [B, H, n]: the cache slots each query head reads
    (None: every held slot); ``valid`` [B, H, n] bool: False marks padding among them (None: all
    real); ``index_bytes``: bytes the selection itself read; ``clamped``: the budget exceeded
    the cache and was clamped to it; ``extra``: what the method's attention needs besides."""

    slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    index_bytes: float = 0.0
    clamped: bool = False
    extra: dict = field(default_factory=dict)


def distinct_rows(slots: torch.Tensor, valid: torch.Tensor | None, batch: int, num_kv_heads: int) -> torch.Tensor:
    """How many distinct valid rows ``slots`` [B, H, n] name, each (batch, KV head, row) once:
    a 0-dim device tensor (no host synchronisation; a sort of the group's slots, no cache-length
    mask)."""
    x = slots if valid is None else torch.where(valid, slots, -1)
    x = x.reshape(batch, num_kv_heads, -1).sort(dim=-1).values
    new = x >= 0
    new[..., 1:] &= x[..., 1:] != x[..., :-1]
    return new.sum()


def gather_heads(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [B, Hkv, S, D] at ``slots`` [B, H, n] (query head h reads KV head
    h // (H / Hkv), as ``repeat_kv`` pairs them): [B, H, n, D]. Slots out of range (padding,
    masked by the caller) read the nearest real slot."""
    B, Hkv, S, D = x.shape
    H, n = slots.shape[1], slots.shape[2]
    idx = slots.clamp(0, S - 1).reshape(B, Hkv, (H // Hkv) * n, 1).expand(-1, -1, -1, D)
    return x.gather(2, idx).view(B, H, n, D)


def causal_prefill(q, k, v) -> torch.Tensor:
    """Exact causal attention of a whole prompt through SDPA, grouped K/V broadcast (no [L, L]
    matrix: memory-light at 128k): the prefill of the decode-time selectors, whose prefill is
    dense attention as in their official code."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class DensePrefill:
    """The prefill of the decode-time selectors (Quest, SparQ, Loki, ...): exact attention, as
    in their official code; only their decode reads part of the cache. Mixed in before
    ``DecodePath``."""

    @property
    def real_kernel(self) -> bool:
        return True  # the prefill is dense (nothing skipped); decode gathers only what it reads

    def attend(self, q, k, v, causal, key_padding_mask):
        from methods import masks
        from methods.base import masked_attention

        mask = masks.attention_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal,
                                    key_padding_mask, q.device)
        return masked_attention(q, k, v, mask)

    def prefill_output(self, q, k, v):
        return causal_prefill(q, k, v)  # dense, without an [L, L] matrix


ATTEND_IMPLS = ("auto", "kernel", "reference")


def top_k_selection(scores: torch.Tensor, k: int, page_size: int = 1, length: int | None = None,
                    **fields) -> Selection:
    """The selection step the selectors share: the ``k`` (at most all) largest ``scores`` [B, H, n]
    of each query head, as cache slots; with ``page_size`` > 1 the scores are pages' and each
    chosen page p stands for its slots p * page_size ... (p + 1) * page_size - 1, those from
    ``length`` on (past the held keys) marked invalid. ``fields`` go to the ``Selection``."""
    top = scores.topk(min(int(k), scores.shape[-1]), dim=-1).indices  # [B, H, k]
    if page_size == 1:
        return Selection(slots=top, **fields)
    slots = (top.unsqueeze(-1) * page_size + torch.arange(page_size, device=top.device)).flatten(-2)
    return Selection(slots=slots, valid=None if length is None else slots < length, **fields)


def select_then_attend(q_t, cache: KVCache, sel: Selection, q: torch.Tensor | None = None,
                       impl: str = "auto") -> torch.Tensor:
    """The attention phase the decode-time selectors share (Quest, SparQ, Loki, Double Sparsity,
    TidalDecode, RetrievalAttention, Squeezed Attention, Twilight: approximate scores -> top-k ->
    this): exact attention of the decode query over the keys ``sel`` chose,

        o_h = softmax(q_h . K[I_h]^T / sqrt(D)) V[I_h],   I_h = sel.slots[b, h] where sel.valid,

    each query head h over its own slots of its KV head h // (H / Hkv); every held key when
    ``sel.slots`` is None. ``q`` replaces ``q_t`` as the query (Loki's rotated query).

    ``impl``: "kernel" runs the Triton gather decode kernel (``methods.kernels.decode``) on the
    slots, padding as -1, each row chosen by several heads of a group read once for all of them
    (``_gather_kernel``): no host synchronisation, no gathered copy of K/V, nothing sized by the
    cache but the group's owner bits (int32 per slot and KV head, 1/64 of K at head dim 128 in
    bf16); "reference" gathers the rows (``gather_heads``) and runs SDPA; "auto" (default): the
    kernel on CUDA (fp16, bf16, fp32; head dims a power of two from 16), the reference elsewhere.
    Returns [B, H, 1, D] in the query's dtype."""
    q = q_t if q is None else q
    if impl not in ATTEND_IMPLS:
        raise ValueError(f"select_then_attend: impl must be one of {list(ATTEND_IMPLS)}, got {impl!r}")
    if sel.slots is None:
        return sdpa(q, cache.keys(), cache.values())
    if impl == "kernel" or (impl == "auto" and _kernel_fits(q)):
        return _gather_kernel(q, cache, sel.slots, sel.valid)
    k, v = gather_heads(cache.keys(), sel.slots), gather_heads(cache.values(), sel.slots)
    return sdpa(q, k, v, None if sel.valid is None else sel.valid.unsqueeze(2))


def _kernel_fits(q: torch.Tensor) -> bool:
    D = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and D >= 16 and not D & (D - 1))


def _gather_kernel(q, cache: KVCache, slots: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The Triton gather kernel over per-query-head slots (distinct within each head, as a top-k
    gives them). One program per (batch, KV head, split) takes the group's G query heads: the
    group's lists are laid end to end, each position kept under its first owner only (-1 for
    the others), and ``owners`` [B, Hkv, S] holds the bits of the heads that chose it, so every
    chosen row is read once for the group and each head scores only its own."""
    from methods.kernels.decode import decode_attention

    B, H, _, D = q.shape
    Hkv, S = cache.num_kv_heads, cache.length
    G, n = H // Hkv, slots.shape[-1]
    ok = (slots >= 0) & (slots < S) if valid is None else valid & (slots >= 0) & (slots < S)
    idx = torch.where(ok, slots, -1)
    if G == 1:
        return decode_attention(q.reshape(B, H, D), cache.keys(), cache.values(), indices=idx)[0].view(B, H, 1, D)
    bit = (1 << torch.arange(G, device=q.device, dtype=torch.int32)).view(1, 1, G, 1)
    at = torch.where(ok, slots, S).view(B, Hkv, G * n)  # the invalid ones to a spare slot S
    owners = torch.zeros(B, Hkv, S + 1, dtype=torch.int32, device=q.device)
    owners.scatter_add_(2, at, (bit * ok.view(B, Hkv, G, n)).view(B, Hkv, G * n))
    lower = bit - 1  # the bits of the heads before each
    first = (owners.gather(2, at).view(B, Hkv, G, n) & lower) == 0
    union = torch.where(first, idx.view(B, Hkv, G, n), -1).view(B, Hkv, G * n)
    out, _ = decode_attention(q.reshape(B, H, D), cache.keys(), cache.values(), indices=union,
                              owners=owners[:, :, :S])
    return out.view(B, H, 1, D)


def sdpa(q, k, v, mask=None) -> torch.Tensor:
    """Exact attention of the decode query (or queries) over the keys given, all allowed unless
    ``mask`` [B, H, Tq, n] (True = read); grouped K/V broadcast to the query heads."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class DecodePath:
    """The decode contract. Subclasses may override ``store`` (which tokens the cache keeps
    and where), ``build_index``/``update_index`` (their auxiliary index), ``select`` and
    ``attend_selected``; the defaults keep every token and read all of them (dense decode).

    Needs ``num_heads``, ``num_kv_heads`` and ``head_dim`` (an ``AttentionMethod``'s, or set by
    an adapter) and ``prefill_output(q, k, v)``: the method's own causal prefill."""

    decode_fallback: str | None = None  # "dense": the method has no decode path of its own
    last_step: dict | None = None
    # what ``step_info`` records: "full" (floats, positions per query head, statistics) or
    # "bytes" (model generation: only the bytes, as device tensors; no host synchronisation in
    # the accounting, no positions; models.hf_decode sets it and sums the bytes once at the end)
    step_record: str = "full"
    needs_calibration: bool = False  # True: ``calibrate(samples)`` must run before the prefill

    # ---- what the path is -----------------------------------------------------------------
    def decode_params(self) -> dict:
        """Hyperparameters that shape the cache's contents (a cache is refused by a path whose
        parameters differ from those of the path that filled it)."""
        return {}

    def signature(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in sorted(self.decode_params().items()))
        return f"{self.decode_name()}({p})"

    def decode_name(self) -> str:
        return getattr(self, "name", type(self).__name__)

    def cache_capacity(self, tokens: int) -> int:
        """Slots a cache needs to serve ``tokens`` tokens in all (prefill plus decode)."""
        return tokens

    def new_cache(self, batch: int, tokens: int, dtype=torch.float32, device="cpu") -> KVCache:
        """An empty cache for this path, serving ``tokens`` tokens in all."""
        return KVCache(batch, self.num_kv_heads, self.head_dim, self.cache_capacity(int(tokens)), dtype, device)

    # ---- the contract ---------------------------------------------------------------------
    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        """The method's own causal prefill of q, k, v; k and v (those kept) go into ``cache``."""
        self._check_cache(cache, k, "prefill")
        if self.needs_calibration and not self.calibrated():
            raise AttentionInputError(
                f"{self.decode_name()}: calibrate(samples) first: its decode index rests on offline "
                f"statistics (calibration (q, k) pairs of this layer)")
        if cache.seen:
            raise AttentionInputError(
                f"{self.decode_name()}: prefill into a cache that already holds {cache.seen} tokens "
                f"(use a new cache)")
        if q.dim() != 4 or q.shape[2] != k.shape[2]:
            raise AttentionInputError(
                f"{self.decode_name()}: prefill needs q [B, H, L, D] as long as k (L={k.shape[2]}), "
                f"got q {tuple(q.shape)}")
        out = self.prefill_output(q, k, v)
        self.store(cache, k, v)
        self.build_index(cache)
        cache.owner = self.signature()
        return out

    def decode(self, q_t, k_t, v_t, cache: KVCache | None = None) -> torch.Tensor:
        """One decode step: the new token's key and value are stored, its query attends."""
        if cache is None:
            parent = getattr(super(), "decode", None)  # SparseMethod.decode(q, k, v): k, v the whole cache
            if parent is None:
                raise AttentionInputError(f"{self.decode_name()}: decode needs the KVCache filled by prefill")
            return parent(q_t, k_t, v_t)
        self._check_step_kv(cache, k_t, v_t)
        self._check_q(q_t, cache)  # all of the step checked before the cache changes
        self.append(cache, k_t, v_t)
        sel = self.select(q_t, cache)
        out = self.attend_selected(q_t, cache, sel)
        self.last_step = self.step_info(cache, sel)
        return out

    def append(self, cache: KVCache, k_t, v_t) -> None:
        """Phase 1: the new key and value into the cache, the index updated."""
        self._check_step_kv(cache, k_t, v_t)
        self.store(cache, k_t, v_t)
        self.update_index(cache, k_t, v_t)

    def select(self, q_t, cache: KVCache) -> Selection:
        """Phase 2: which held keys each query head reads (default: all)."""
        self._check_q(q_t, cache)
        return Selection()

    def attend_selected(self, q_t, cache: KVCache, sel: Selection) -> torch.Tensor:
        """Phase 3: exact attention over the selected keys (``select_then_attend``)."""
        return select_then_attend(q_t, cache, sel)

    def calibrate(self, samples) -> None:
        """Offline statistics from ``samples``, a list of (q, k) pairs of this layer (q [B, H,
        T, D], k [B, Hkv, T, D]), for paths that need them (``needs_calibration``); a no-op by
        default."""
        return None

    def calibrated(self) -> bool:
        """Whether ``calibrate`` has run (always, for paths that need no calibration)."""
        return True

    def calibration_pairs(self, samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``samples`` checked: a non-empty list of (q, k) pairs of this path's shape."""
        me = self.decode_name()
        try:
            pairs = [(s[0], s[1]) for s in samples]
        except (TypeError, IndexError, KeyError):
            raise AttentionInputError(f"{me}: calibrate needs a list of (q, k) pairs") from None
        if not pairs:
            raise AttentionInputError(f"{me}: calibrate needs at least one (q, k) pair")
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        for q, k in pairs:
            if (not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4
                    or q.shape[1] != H or k.shape[1] != Hkv or q.shape[3] != D or k.shape[3] != D
                    or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] < 1):
                raise AttentionInputError(
                    f"{me}: calibration pairs must be q [B, {H}, T, {D}] and k [B, {Hkv}, T, {D}] (T >= 1), got "
                    f"{tuple(getattr(q, 'shape', ()))} and {tuple(getattr(k, 'shape', ()))}")
            if not bool(torch.isfinite(q).all() & torch.isfinite(k).all()):
                raise AttentionInputError(f"{me}: calibration q, k hold NaN or Inf")
        return pairs

    # ---- what the cache keeps (default: every token, appended) ----------------------------
    def store(self, cache: KVCache, k, v) -> None:
        """Write the new tokens' keys and values (default: append them all)."""
        cache.append(k, v)

    def build_index(self, cache: KVCache) -> None:
        """The index over what the prefill stored."""
        return None

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        """The index after a decode step stored k_t, v_t (appended: at slot cache.length - 1)."""
        return None

    # ---- accounting -------------------------------------------------------------------------
    def step_info(self, cache: KVCache, sel: Selection) -> dict:
        """What a step read: positions per query head, index and K/V bytes, clamping. With
        ``step_record = "bytes"`` only the bytes, as device tensors (no host synchronisation)."""
        B, Hkv, S = cache.batch, cache.num_kv_heads, cache.length
        full = self.step_record == "full"
        positions = None
        if sel.slots is None and cache.head_pos is not None:  # a pressed cache: each head its own tokens
            kv_rows = (cache.head_positions() != -1).sum()  # empty slots are not read
            if full:
                positions = cache.head_positions().repeat_interleave(self.num_heads // Hkv, 1)
        elif sel.slots is None:
            kv_rows = B * Hkv * S
        else:
            kv_rows = distinct_rows(sel.slots, sel.valid, B, Hkv)
            if full:
                H, n = sel.slots.shape[1], sel.slots.shape[2]
                valid = torch.ones_like(sel.slots, dtype=torch.bool) if sel.valid is None else sel.valid
                held = gather_heads(cache.head_positions().unsqueeze(-1), sel.slots)[..., 0]
                positions = torch.where(valid, held, -1).view(B, H, n)
        kv_bytes = 2.0 * kv_rows * cache.row_bytes()
        if not full:
            return {"index_bytes": sel.index_bytes, "kv_bytes": kv_bytes, "bytes_read": sel.index_bytes + kv_bytes,
                    "clamped": sel.clamped}
        kv_bytes = float(kv_bytes)
        return {"positions": positions, "index_bytes": float(sel.index_bytes), "kv_bytes": kv_bytes,
                "bytes_read": float(sel.index_bytes) + kv_bytes, "clamped": bool(sel.clamped)}

    # ---- checks -------------------------------------------------------------------------------
    def _check_cache(self, cache, k, when: str) -> None:
        me = self.decode_name()
        if not isinstance(cache, KVCache):
            raise AttentionInputError(f"{me}: {when} needs a KVCache, got {type(cache).__name__}")
        want = (self.num_kv_heads, self.head_dim)
        if (cache.num_kv_heads, cache.head_dim) != want:
            raise AttentionInputError(
                f"{me}: the cache holds K/V of {cache.num_kv_heads} KV heads x head dim {cache.head_dim}, "
                f"the method is built for {want[0]} x {want[1]} (a cache from another model shape)")
        if k.dim() != 4 or tuple(k.shape[:2]) != (cache.batch, cache.num_kv_heads) or k.shape[3] != cache.head_dim:
            raise AttentionInputError(
                f"{me}: k {tuple(k.shape)} does not fit the cache [B={cache.batch}, Hkv={cache.num_kv_heads}, "
                f"T, D={cache.head_dim}]")
        if k.dtype != cache.dtype or k.device != cache.device:
            raise AttentionInputError(
                f"{me}: k is {k.dtype} on {k.device}, the cache {cache.dtype} on {cache.device}")

    def _check_step_kv(self, cache, k_t, v_t) -> None:
        me = self.decode_name()
        self._check_cache(cache, k_t, "decode")
        if not cache.seen or cache.owner is None:
            raise AttentionInputError(f"{me}: decode before prefill (the cache is empty; call prefill first)")
        if cache.owner != self.signature():
            raise AttentionInputError(
                f"{me}: the cache was filled by {cache.owner}, not by {self.signature()}")
        if k_t.shape[2] != 1 or k_t.shape != v_t.shape:
            raise AttentionInputError(
                f"{me}: a decode step takes one token: k_t and v_t [B, Hkv, 1, D], got "
                f"{tuple(k_t.shape)} and {tuple(v_t.shape)}")

    def _check_q(self, q_t, cache) -> None:
        want = (cache.batch, self.num_heads, 1, cache.head_dim)
        if q_t.dim() != 4 or tuple(q_t.shape) != want:
            raise AttentionInputError(
                f"{self.decode_name()}: a decode query must be [B, H, 1, D] = {list(want)}, got {tuple(q_t.shape)}")
        if q_t.dtype != cache.dtype:
            raise AttentionInputError(f"{self.decode_name()}: q_t is {q_t.dtype}, the cache {cache.dtype}")


class SinkWindowDecode(DecodePath):
    """Decode over the first ``decode_sinks`` tokens and the ``decode_window`` most recent ones
    (the new token included); the cache keeps only those (a rolling buffer: position p >= sinks
    lives in slot sinks + (p - sinks) mod window), and a step reads every key it keeps.
    StreamingLLM (Xiao et al. 2024, Sec. 3.2: attention sinks + rolling KV cache), MInference's
    A-shape, and the sliding window (no sinks)."""

    decode_sinks: int = 0
    decode_window: int = 1

    def decode_params(self) -> dict:
        return {"sinks": self.decode_sinks, "window": self.decode_window}

    def cache_capacity(self, tokens: int) -> int:
        return min(tokens, self.decode_sinks + self.decode_window)

    def store(self, cache: KVCache, k, v) -> None:
        n, s, w, p0 = k.shape[2], self.decode_sinks, self.decode_window, cache.seen
        a = min(s, p0 + n)  # positions [p0, a): sinks, each in its own slot
        if a > p0:
            cache.write(p0, k[:, :, :a - p0], v[:, :, :a - p0], p0)
        p = max(p0, a, p0 + n - w)  # positions [p, p0 + n): the window, in the ring (in runs up to its end)
        while p < p0 + n:
            slot = s + (p - s) % w
            run = min(p0 + n - p, s + w - slot)
            cache.write(slot, k[:, :, p - p0:p - p0 + run], v[:, :, p - p0:p - p0 + run], p)
            p += run
        cache.seen += n


class _Adapter(DecodePath):
    """A decode path around an existing method (which is not changed)."""

    def __init__(self, method):
        self.method = method
        self.num_heads, self.num_kv_heads = method.num_heads, method.num_kv_heads
        self.head_dim = method.head_dim

    def decode_name(self) -> str:
        return getattr(self.method, "name", type(self.method).__name__)

    def prefill_output(self, q, k, v):
        return self.method(q, k, v, causal=True)


class SinkWindowAdapter(SinkWindowDecode, _Adapter):
    """The decode path of a method whose pattern is sinks + a recent window."""

    def __init__(self, method, sinks: int, window: int):
        _Adapter.__init__(self, method)
        self.decode_sinks, self.decode_window = int(sinks), int(window)


class DenseAdapter(_Adapter):
    """Dense decode over the whole cache, for a method without a decode path: ``decode_fallback``
    is "dense" (None when the method is exact: its decode is dense attention)."""

    def __init__(self, method):
        super().__init__(method)
        self.decode_fallback = None if getattr(method, "exact", False) else "dense"


def sink_window_of(method) -> tuple[int, int] | None:
    """(sinks, window) of an existing method whose decode keeps sinks and a recent window:
    sliding window (0, window); MInference with every head A-shape of one budget (num_sink,
    window). None for any other method."""
    from methods.minference import MInference
    from methods.sliding_window import SlidingWindow

    if isinstance(method, SlidingWindow):
        return 0, int(method.window)
    if isinstance(method, MInference):
        budgets = {(h["num_sink"], h["window"]) for h in method.heads if h["pattern"] == "a_shape"}
        if len(budgets) == 1 and all(h["pattern"] == "a_shape" for h in method.heads):
            return tuple(int(x) for x in budgets.pop())
    return None


def decode_path(method) -> DecodePath:
    """The decode path of ``method``: its own if it implements the contract, or the one its
    ``decode_adapter()`` builds (NSA, SparseK, the linear family); sinks + window for sliding
    window and A-shape; else dense decode (``decode_fallback`` "dense")."""
    if isinstance(method, DecodePath):
        return method
    if callable(getattr(method, "decode_adapter", None)):
        return method.decode_adapter()
    sw = sink_window_of(method)
    if sw is not None:
        return SinkWindowAdapter(method, *sw)
    return DenseAdapter(method)


def dense_decode_reference(q_t, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode in fp32: the output of q_t [B, H, 1, D] over all of k, v [B, Hkv, S, D] and
    its attention probabilities [B, H, S] (what a decode runner measures paths against)."""
    H, D = q_t.shape[1], q_t.shape[-1]
    g = H // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    p = torch.softmax((q_t.float() @ kk.transpose(-1, -2)) / math.sqrt(D), dim=-1)  # [B, H, 1, S]
    return (p @ vv).to(q_t.dtype), p[:, :, 0]


__all__ = ["KVCache", "Selection", "DecodePath", "select_then_attend", "top_k_selection", "SinkWindowDecode", "SinkWindowAdapter", "DenseAdapter",
           "decode_path", "sink_window_of", "gather_heads", "dense_decode_reference"]
