"""Attention of one new query token against a KV cache, in Triton: split-K (flash-decoding).

At decode a step has one query token per head: the work is reading the cache, so the kernel
must spread that read over the whole GPU even at batch 1. As flash-decoding (Dao et al. 2023,
"Flash-Decoding for long-context inference"), the cache of each (batch, KV head) is cut into
``splits`` contiguous pieces, one program each; a program takes the ``G = H / Hkv`` query heads
that share its KV head together (grouped-query attention reads each key once for all of them)
and folds its piece into a partial result with the online softmax (FlashAttention):

    m_s = max_j s_j,   l_s = sum_j exp(s_j - m_s),   o_s = sum_j exp(s_j - m_s) v_j,
    s_j = scale * q . k_j   over the keys j of piece s;

a second kernel merges the pieces of each head (log-sum-exp merge):

    M = max_s m_s,   out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s,   lse = M + log sum ...

``decode_attention(q, k, v, lengths=None, indices=None)``:
    q [B, H, D]; k, v [B, Hkv, T, D] (a cache buffer: its first ``lengths[b]`` positions are
    valid, all T when None); with ``indices`` [B, Hkv, N] (int, positions into the cache, -1 for
    none) only those keys are read: the gather path of decode-time selection methods (Quest's
    pages expanded to their tokens, SparQ's or Loki's top-k). With ``owners`` [B, Hkv, T] (int32,
    beside ``indices``) query head g of a KV head's group scores only the positions p whose bit g
    is set in owners[b, hk, p]: the group's heads each attend their own selection while every
    position listed is read once for all of them (``methods.decode.select_then_attend`` lists
    each selected position once, under its first owner). Returns (out [B, H, D] in q's
    dtype, lse [B, H] fp32, natural log; -inf for a head that saw no key, whose output is 0).

Launch settings (keys per tile, warps, stages, programs per SM, hence the split count): on
CUDA the dense path reads them from ``decode_launch.json`` by shape (``launch_for``; written by
``scripts/decode_bench.py --tune``), the gather path and the interpreter use ``DECODE_LAUNCH``.

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``; tests compare with a softmax
written in the test. Scores are computed in base 2 (``_common.LOG2E``).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from methods.kernels._common import LOG2E, read_entries, triton, usable  # noqa: F401 - usable re-exported

# launch settings: keys per tile, warps, pipeline stages; programs per SM that the split count
# aims at. The defaults, where the launch table (``LAUNCH_FILE``, written by
# ``scripts/decode_bench.py --tune``: the fastest setting per shape on the GPU it ran on) has no
# entry for the head dim
DECODE_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 3, "programs_per_sm": 4}
LAUNCH_FILE = Path(__file__).with_name("decode_launch.json")


@functools.lru_cache(maxsize=4)
def launch_table(path: str | None = None) -> tuple[dict, ...]:
    """The entries of the decode launch table (empty where there is none)."""
    return read_entries(Path(path) if path else LAUNCH_FILE)


def launch_for(head_dim: int, batch_kv: int, n_keys: int, path: str | None = None) -> dict:
    """Launch settings {block_n, num_warps, num_stages, programs_per_sm, source} for a decode
    step over ``batch_kv`` (batch x KV heads) caches of ``n_keys`` keys each: the table entry of
    this head dim at the largest ``batch_kv`` bucket at or below it (the smallest where all are
    above), and in it the largest ``n_keys`` bucket at or below (likewise); ``DECODE_LAUNCH``
    where the table has no entry for the head dim."""
    rows = [e for e in launch_table(path) if e["head_dim"] == head_dim]
    if not rows:
        return {**DECODE_LAUNCH, "source": "default"}

    def bucket(rows, key, value):
        below = [e[key] for e in rows if e[key] <= value]
        b = max(below) if below else min(e[key] for e in rows)
        return [e for e in rows if e[key] == b]

    e = bucket(bucket(rows, "batch_kv", batch_kv), "n_keys", n_keys)[0]
    return {**{k: e[k] for k in DECODE_LAUNCH},
            "source": f"decode_launch.json: {e.get('gpu')}, D={head_dim} B*Hkv={e['batch_kv']} T={e['n_keys']}"}

if triton is not None:
    import triton.language as tl

    from methods.kernels._common import _softmax_update

    @triton.jit
    def _decode_split(Q, K, V, LENS, IDX, OWN, OUT, M, L,
                      sqb, sqh, skb, skh, skt, svb, svh, svt, sib, sih, sob, soh,
                      n_keys, cache_len, split_len, hkv, qk_scale,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_LENS: tl.constexpr, HAS_IDX: tl.constexpr,
                      HAS_OWN: tl.constexpr):
        """One (batch x KV head, split): the partial (o, m, l) of its G query heads over the keys
        [split * split_len, ...) of its cache (or of its index list; with owners, each head
        scores only the positions whose owner bit it holds)."""
        bh = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements at long contexts x batch
        s = tl.program_id(1)
        b = bh // hkv
        hk = bh % hkv
        n_loop = n_keys     # entries to walk: cache positions, or the index list
        limit = cache_len   # cache positions below it are valid
        if HAS_LENS:
            limit = tl.load(LENS + b)
            if not HAS_IDX:
                n_loop = tl.minimum(limit, n_keys)
        start = s * split_len
        end = tl.minimum(start + split_len, n_loop)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        q = tl.load(Q + b * sqb + (hk * G + offs_g)[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        kbase = K + b * skb + hk * skh
        vbase = V + b * svb + hk * svh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            live = offs_n < end
            pos = offs_n
            if HAS_IDX:
                pos = tl.load(IDX + b * sib + hk * sih + offs_n, mask=live, other=-1)
                live = live & (pos >= 0) & (pos < limit)
                pos = tl.where(live, pos, 0)
            k = tl.load(kbase + pos[:, None] * skt + offs_d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(vbase + pos[:, None] * svt + offs_d[None, :], mask=live[:, None], other=0.0)
            ok = live[None, :]
            if HAS_OWN:  # the heads of the group that chose each position
                own = tl.load(OWN + b * sob + hk * soh + pos, mask=live, other=0)
                ok = ok & (((own[None, :] >> offs_g[:, None]) & 1) != 0)
            acc, m_i, l_i = _softmax_update(acc, m_i, l_i, tl.dot(q, tl.trans(k)), qk_scale, v, ok)
        row = bh * tl.num_programs(1) * BLOCK_G + s * BLOCK_G + offs_g  # [B*Hkv, S, BLOCK_G]
        tl.store(M + row, m_i, mask=g_ok)  # the padding rows of the group are never merged
        tl.store(L + row, l_i, mask=g_ok)
        tl.store(OUT + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def _decode_merge(OUT, M, L, O, LSE, sob, soh, splits, hkv,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """One (batch, query head): the log-sum-exp merge of its splits' partial results."""
        bh = tl.program_id(0).to(tl.int64)  # b * H + h
        H = hkv * G
        b = bh // H
        h = bh % H
        hk = h // G
        g = h % G
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        ok = offs_s < splits
        row = (b * hkv + hk) * splits * BLOCK_G + offs_s * BLOCK_G + g
        m = tl.load(M + row, mask=ok, other=float("-inf"))  # base 2
        l = tl.load(L + row, mask=ok, other=0.0)
        mx = tl.max(m, 0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(m - mx_safe)  # 0 for an empty split
        o = tl.load(OUT + row[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        den = tl.sum(w * l, 0)
        num = tl.sum(w[:, None] * o, 0)
        out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
        tl.store(O + b * sob + h * soh + offs_d, out.to(O.dtype.element_ty))
        lse = tl.where(den > 0, (mx_safe + tl.log2(tl.where(den > 0, den, 1.0))) / 1.4426950408889634,
                       float("-inf"))
        tl.store(LSE + bh, lse)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so that the merge is exercised


def num_splits(batch: int, kv_heads: int, n_keys: int, device, block_n: int | None = None,
               programs_per_sm: int | None = None) -> int:
    """Pieces per (batch, KV head): enough programs to fill the GPU (``programs_per_sm`` per
    SM), never fewer than one tile of keys per piece."""
    block_n = block_n or DECODE_LAUNCH["block_n"]
    pps = programs_per_sm or DECODE_LAUNCH["programs_per_sm"]
    want = -(-pps * _num_sms(device) // max(1, batch * kv_heads))
    return max(1, min(want, -(-n_keys // block_n)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
                     indices: torch.Tensor | None = None, owners: torch.Tensor | None = None,
                     scale: float | None = None,
                     splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K attention of one query token per head against a cache (module docstring)."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention takes q [B, H, D] and k, v [B, Hkv, T, D] alike; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, D = q.shape
    Bk, Hkv, T, Dk = k.shape
    if Bk != B or Dk != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k.shape)}: same batch and head "
                         "dim, query heads a multiple of KV heads")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D}: the decode kernel takes powers of two from 16")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last (head-dim) axis")
    if lengths is not None and (lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"lengths must be an int tensor [B={B}]; got {tuple(lengths.shape)} {lengths.dtype}")
    if indices is not None:
        if indices.dim() != 3 or indices.shape[:2] != (B, Hkv) or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an int tensor [B={B}, Hkv={Hkv}, N]; got "
                             f"{tuple(indices.shape)} {indices.dtype}")
        indices = indices.to(torch.int32).contiguous()
    G = H // Hkv
    if owners is not None:
        if indices is None or owners.shape != (B, Hkv, T) or owners.dtype != torch.int32 or G > 31:
            raise ValueError(f"owners must be an int32 tensor [B={B}, Hkv={Hkv}, T={T}] beside indices, with at most "
                             f"31 query heads per KV head; got {tuple(owners.shape)} {owners.dtype}, G={G}")
        if owners.stride(-1) != 1:
            owners = owners.contiguous()
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot takes at least 16 rows
    n_keys = T if indices is None else indices.shape[-1]
    # the tuned table is for reading the whole cache; the gather path's scattered rows keep the
    # defaults (the dense shapes' settings made it 15-25% slower: results/decode/kernel_bench.md)
    launch = launch_for(D, B * Hkv, n_keys) if q.is_cuda and indices is None else DECODE_LAUNCH
    block_n = block_n or launch["block_n"]
    S = splits or num_splits(B, Hkv, max(1, n_keys), q.device, block_n, launch["programs_per_sm"])
    split_len = -(-max(1, n_keys) // S)
    split_len = -(-split_len // block_n) * block_n  # whole tiles per split
    S = -(-max(1, n_keys) // split_len)
    part = torch.empty(B * Hkv * S * BLOCK_G, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * Hkv * S * BLOCK_G, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    scale = (1.0 / math.sqrt(D)) if scale is None else scale
    lens = lengths.to(torch.int32).contiguous() if lengths is not None else m  # unused without HAS_LENS
    idx = indices if indices is not None else m
    sib, sih = (indices.stride(0), indices.stride(1)) if indices is not None else (0, 0)
    own = owners if owners is not None else m
    sob, soh = (owners.stride(0), owners.stride(1)) if owners is not None else (0, 0)
    _decode_split[(B * Hkv, S)](
        q, k, v, lens, idx, own, part, m, l,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        sib, sih, sob, soh, n_keys, T, split_len, Hkv, scale * LOG2E,
        G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_N=block_n, HAS_LENS=lengths is not None, HAS_IDX=indices is not None,
        HAS_OWN=owners is not None,
        num_warps=num_warps or launch["num_warps"], num_stages=num_stages or launch["num_stages"])
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
    _decode_merge[(B * H,)](part, m, l, out, lse, out.stride(0), out.stride(1), S, Hkv,
                            G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_S=max(2, triton.next_power_of_2(S)), num_warps=4)
    return out, lse
