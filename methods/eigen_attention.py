"""Eigen Attention: keys and values projected onto a low-rank basis, attention in that space.

Saxena, Saha, Ankit, Panda, Roy, "Eigen Attention: Attention in Low-Rank Space for KV Cache
Compression" (Findings of EMNLP 2024), Sec. 3, Eq. 3-6; official code
UtkarshSaxena1/EigenAttn. Our reading of the paper; the basis per KV head, as the paper's.

A basis U [D, r] per KV head from calibration K (and one for V): the top r right singular
vectors of the stacked calibration rows (SVD of the representation matrix, Eq. 4; uncentred).
Attention runs in the r-dimensional space (Eq. 5-6):

    q~ = q U_K,  k~ = k U_K,  v~ = v U_V
    o = softmax(q~ k~^T / sqrt(D)) v~ U_V^T

so the cache holds k~ and v~: r values per token and head instead of D (the cache is built
with head dim r: ``bytes_held`` is r / D of dense, plus the two bases, [Hkv, D, r] fp32 each,
held in ``aux``). The rank is r = max(1, round(D (1 -
ratio))) for every head (the paper picks r per layer by an explained-variance threshold;
a fixed share is the ratio interface of the presses). Prefill and decode both run in the
low-rank space (the paper merges U into the projection weights), so neither is exact.

Rotary embeddings (Sec. 3.3, Fig. 6; official ``LlamaEigenAttention``): in a RoPE model the
key basis is of the keys BEFORE the rotation, and the cache holds the pre-rotary low-rank keys;
each attention projects them back up, rotates them at their positions and attends with the
full rotated query (official code: ``k_proj_up``, then ``apply_rotary_pos_emb``):

    k~_t = R_t^{-1}(k_t) U_K,   o = softmax(q_t [R_s(k~_s U_K^T)]_s^T / sqrt(D)) v~ U_V^T

A projection applied after the rotation cannot work: the rotation moves each key through the
planes of its frequency pairs with its position, so a basis fitted on calibration keys at
positions 0..P keeps the directions those positions visit and drops the ones later positions
rotate into (on SmolLM2-135M, dropping ONE of 64 post-rotary key dimensions changed a layer's
attention output by 35-50%; pre-rotary, by 4-7%). Inside a model (``models.hf_decode``) each
call hands the press its tokens' rotary cos/sin (``set_rope``, HF's rotate-half convention);
without them (a layer alone: runner=kernel/decode) the keys are taken as they come and the
query is projected with the key basis (``q~ = q U_K`` above: exact for a model without rotary
embeddings, the paper's OPT/MPT case). ``press_details()['keys']`` records which.

The basis: ``calibrate(k, v)`` on calibration text (k, v [B, Hkv, T, D] of one layer; inside a
model ``calibrate_layer`` undoes the rotation first); without it, each prefill (or forward)
takes its basis from its own keys and values (the prompt as the calibration set: a deviation
that keeps the method usable without a calibration pass, recorded in
``press_details()['basis']``).
"""
from __future__ import annotations

import torch

from methods import masks
from methods.base import AttentionInputError, Cost, dense_flops, masked_attention
from methods.decode import KVCache
from methods.press import Press


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of the rotary embedding ``x cos + rotate_half(x) sin`` (HF's convention; cos,
    sin [T, D], equal on both halves, possibly scaled by the same factor): x [..., T, D]."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def svd_basis(x: torch.Tensor, r: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top ``r`` right singular vectors of each KV head's rows: x [B, Hkv, T, D] -> [Hkv, D, r]
    (fp32); padded positions (``key_padding_mask`` [B, T] False) are left out (zero rows)."""
    B, Hkv, T, D = x.shape
    x = x.detach().double()
    if key_padding_mask is not None:
        x = x * key_padding_mask[:, None, :, None].to(x.dtype)
    rows = x.transpose(0, 1).reshape(Hkv, B * T, D)
    return torch.linalg.svd(rows, full_matrices=False).Vh[:, :r].transpose(-1, -2).float()


class EigenAttention(Press):
    name = "eigen_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Saxena et al. 2024"
    kind = "KV-cache compression (press): low-rank K/V basis, attention in it"
    official_test = None
    exact = False

    def __init__(self, ratio: float = 0.5, impl: str = "reference", **structural):
        super().__init__(ratio=ratio, impl=impl, **structural)
        self.rank = max(1, round(self.head_dim * (1.0 - self.ratio)))
        self.basis_k: torch.Tensor | None = None  # [Hkv, D, r], from calibrate
        self.basis_v: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the next call's tokens' cos, sin [T, D]
        self.keys_seen = "as given (no rotary embedding handed)"

    def decode_params(self) -> dict:
        return {"ratio": self.ratio, "rank": self.rank}

    def calibrate(self, k, v=None) -> None:
        """The basis from calibration keys and values [B, Hkv, T, D] (T * B >= rank rows)."""
        if v is None or k.dim() != 4 or k.shape != v.shape or k.shape[1] != self.num_kv_heads \
                or k.shape[3] != self.head_dim or k.shape[0] * k.shape[2] < self.rank:
            raise AttentionInputError(
                f"EigenAttention.calibrate needs k, v [B, {self.num_kv_heads}, T, {self.head_dim}] with "
                f"B * T >= rank {self.rank}")
        self.basis_k, self.basis_v = svd_basis(k, self.rank), svd_basis(v, self.rank)

    calibration_text = "text"

    @property
    def needs_calibration(self) -> bool:
        return self.basis_k is None  # the paper's basis comes from calibration (else: the prompt's)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The rotary embedding of the next call's tokens (``models.hf_decode`` hands each call
        the model's own): cos, sin [T, D] or [B, T, D] (positions are the same for the batch)."""
        if cos.dim() == 3:
            cos, sin = cos[0], sin[0]
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != self.head_dim:
            raise AttentionInputError(f"eigen_attention: rotary cos, sin must be [T, {self.head_dim}], got "
                                      f"{tuple(cos.shape)} and {tuple(sin.shape)}")
        self.rope = (cos.float(), sin.float())

    def _rope(self, T: int):
        """The handed cos, sin for T tokens (None: no rotary embedding handed)."""
        if self.rope is None:
            return None
        if self.rope[0].shape[0] != T:
            raise AttentionInputError(f"eigen_attention: the rotary embedding handed covers {self.rope[0].shape[0]} "
                                      f"tokens, the call has {T}")
        return self.rope

    def calibrate_layer(self, q, k, v, period: int | None = None) -> dict:
        """``calibrate`` on this layer's k, v of calibration text, inside a model
        (``models.hf_decode.calibrate``); the keys' rotation undone first where handed."""
        rope = self._rope(k.shape[2])
        self.calibrate(k if rope is None else unrotate(k.float(), *rope), v)
        return {"rank": self.rank, "rows": int(k.shape[0] * k.shape[2]),
                "keys": "pre-rotary" if rope is not None else "as given"}

    def bases(self, k, v, key_padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.basis_k is not None:
            return self.basis_k.to(k.device), self.basis_v.to(k.device)
        return (svd_basis(k, self.rank, key_padding_mask).to(k.device),
                svd_basis(v, self.rank, key_padding_mask).to(k.device))

    # ---- attention in the low-rank space --------------------------------------------------------
    def low_rank_attention(self, q, kr, vr, uk, uv, mask=None) -> torch.Tensor:
        """q [B, H, T, D] against projected kr, vr [B, Hkv, S, r]: o [B, H, T, D] (Eq. 5-6)."""
        g = q.shape[1] // kr.shape[1]
        qr = q.float() @ uk.repeat_interleave(g, 0)  # [B, H, T, r]
        o = masked_attention(qr, kr.float(), vr.float(), mask, scale=self.head_dim ** -0.5)
        return (o @ uv.repeat_interleave(g, 0).transpose(-1, -2)).to(q.dtype)

    def attend(self, q, k, v, causal, key_padding_mask):
        uk, uv = self.bases(k, v, key_padding_mask)  # padded keys do not shape the basis
        mask = masks.attention_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
        return self.low_rank_attention(q, k.float() @ uk, v.float() @ uv, uk, uv, mask)

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.rank, tq, tk, causal),
                    density=self.rank / self.head_dim,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.rank * 2)

    # ---- the cache holds k~, v~ ---------------------------------------------------------------------
    def new_cache(self, batch: int, tokens: int, dtype=torch.float32, device="cpu") -> KVCache:
        return KVCache(batch, self.num_kv_heads, self.rank, self.cache_capacity(int(tokens)), dtype, device)

    def _check_cache(self, cache, k, when: str) -> None:
        me = "eigen_attention"
        if not isinstance(cache, KVCache):
            raise AttentionInputError(f"{me}: {when} needs a KVCache, got {type(cache).__name__}")
        if (cache.num_kv_heads, cache.head_dim) != (self.num_kv_heads, self.rank):
            raise AttentionInputError(
                f"{me}: the cache holds {cache.num_kv_heads} KV heads x {cache.head_dim}, the method keeps "
                f"{self.num_kv_heads} x rank {self.rank} (a cache built by another path)")
        if k.dim() != 4 or tuple(k.shape[:2]) != (cache.batch, cache.num_kv_heads) or k.shape[3] != self.head_dim:
            raise AttentionInputError(f"{me}: k {tuple(k.shape)} does not fit [B={cache.batch}, "
                                      f"Hkv={cache.num_kv_heads}, T, D={self.head_dim}]")
        if k.dtype != cache.dtype or k.device != cache.device:
            raise AttentionInputError(f"{me}: k is {k.dtype} on {k.device}, the cache {cache.dtype} on {cache.device}")

    def _check_q(self, q_t, cache) -> None:
        want = (cache.batch, self.num_heads, 1, self.head_dim)
        if q_t.dim() != 4 or tuple(q_t.shape) != want or q_t.dtype != cache.dtype:
            raise AttentionInputError(f"eigen_attention: a decode query must be {list(want)} {cache.dtype}, got "
                                      f"{tuple(q_t.shape)} {q_t.dtype}")

    def rotary_attention(self, q, kr, vr, uk, uv, cos, sin, mask=None) -> torch.Tensor:
        """q [B, H, T, D] (rotated) against pre-rotary low-rank keys kr [B, Hkv, S, r], projected
        back up and rotated at their positions (cos, sin [S, D]), and values vr [B, Hkv, S, r]:
        o [B, H, T, D] (the official code's RoPE path)."""
        g = q.shape[1] // kr.shape[1]
        k = kr.float() @ uk.transpose(-1, -2)
        k = k * cos + rotate_half(k) * sin
        o = masked_attention(q.float(), k, vr.float(), mask, scale=self.head_dim ** -0.5)
        return (o @ uv.repeat_interleave(g, 0).transpose(-1, -2)).to(q.dtype)

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        self._check_cache(cache, k, "prefill")
        if cache.seen:
            raise AttentionInputError(f"eigen_attention: prefill into a cache that already holds {cache.seen} tokens")
        rope = self._rope(k.shape[2])
        cache.rope = None  # cos, sin of the held tokens' positions [S, D] (bookkeeping, like ``pos``)
        if rope is None:
            self.keys_seen = "as given (no rotary embedding handed)"
            uk, uv = self.bases(k, v)
            out = self(q, k, v, causal=True)  # checks q; the same basis (calibrated, or these k, v)
        else:  # the official RoPE path: the cache holds pre-rotary low-rank keys
            self.keys_seen = "pre-rotary (the model's rotation undone, official)"
            self.check_inputs(q, k, v, True, None)
            k = unrotate(k.float(), *rope)
            uk, uv = self.bases(k, v)
            mask = masks.attention_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], True, None, q.device)
            out = self.rotary_attention(q, k @ uk, v.float() @ uv, uk, uv, *rope, mask)
            cache.rope = tuple(t.to(cache.device) for t in rope)
        cache.aux["basis_k"], cache.aux["basis_v"] = uk, uv  # the cache's basis (counted in bytes_held)
        cache.append((k.float() @ uk).to(cache.dtype), (v.float() @ uv).to(cache.dtype))
        cache.owner = self.signature()
        self.last_kept = cache.length
        return out

    def store(self, cache: KVCache, k, v) -> None:
        uk, uv = cache.aux["basis_k"], cache.aux["basis_v"]
        if getattr(cache, "rope", None) is not None:  # pre-rotary keys: this step's rotation undone
            rope = self._rope(k.shape[2])
            if rope is None:
                raise AttentionInputError("eigen_attention: the cache holds pre-rotary keys; a decode step needs "
                                          "its rotary embedding (set_rope)")
            k = unrotate(k.float(), *rope)
            cache.rope = tuple(torch.cat([a, b.to(a.device)]) for a, b in zip(cache.rope, rope))
        cache.append((k.float() @ uk).to(cache.dtype), (v.float() @ uv).to(cache.dtype))

    def attend_selected(self, q_t, cache: KVCache, sel) -> torch.Tensor:
        uk, uv = cache.aux["basis_k"], cache.aux["basis_v"]
        if getattr(cache, "rope", None) is not None:
            cos, sin = (t[:cache.length] for t in cache.rope)
            return self.rotary_attention(q_t, cache.keys(), cache.values(), uk, uv, cos, sin)
        return self.low_rank_attention(q_t, cache.keys(), cache.values(), uk, uv)

    def press_details(self) -> dict:
        return {**super().press_details(), "rank": self.rank, "head_dim": self.head_dim,
                "basis": "calibration" if self.basis_k is not None else "prompt (no calibration given)",
                "keys": self.keys_seen}


__all__ = ["EigenAttention", "rotate_half", "svd_basis", "unrotate"]
