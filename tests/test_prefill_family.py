"""Prefill sparsity beyond MInference (issue 25): S2-Attention, Star Attention, SampleAttention,
SpargeAttn, HiP. Each method's output is checked against its pattern built here with plain
loops over (head, query, key) and softmax attention computed row by row; GQA equals repeated
KV heads; padding; the density each call reports; bad hyperparameters."""
import math

import numpy as np
import pytest
import torch

import methods
from methods.base import AttentionInputError, index_timing
from tests.conftest import seeded_qkv


# ---- independent references ---------------------------------------------------------------
def by_hand(q, k, v, keep):
    """Softmax attention row by row over the keys ``keep[b, h, i]`` (numpy bool [B, H, Tq, Tk]),
    in float64; rows that keep nothing give zeros."""
    q, k, v = (x.detach().double().numpy() for x in (q, k, v))
    B, H, tq, D = q.shape
    rep = H // k.shape[1]
    out = np.zeros((B, H, tq, D))
    for b in range(B):
        for h in range(H):
            for i in range(tq):
                js = np.nonzero(keep[b, h, i])[0]
                if len(js) == 0:
                    continue
                s = np.array([q[b, h, i] @ k[b, h // rep, j] for j in js]) / math.sqrt(D)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, i] = sum(pj * v[b, h // rep, j] for pj, j in zip(p, js))
    return torch.from_numpy(out)


def causal_keep(B, H, tq, tk, causal, kpm=None):
    keep = np.ones((B, H, tq, tk), dtype=bool)
    for i in range(tq):
        for j in range(tk):
            if causal and j > i + tk - tq:
                keep[:, :, i, j] = False
    if kpm is not None:
        keep &= kpm.numpy()[:, None, None, :]
    return keep


def allowed_pairs(B, H, tq, tk, causal):
    return B * H * (sum(min(tk, i + tk - tq + 1) for i in range(tq)) if causal else tq * tk)


def check_against(m, q, k, v, keep, causal, kpm=None, atol=1e-9):
    """The method's output equals attention by hand over ``keep``, and its density the share of
    allowed pairs kept (reference path)."""
    out = m(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), by_hand(q, k, v, keep), rtol=1e-6, atol=atol)
    if m.last_path == "reference":
        B, H, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        assert m.last_density == pytest.approx(keep.sum() / allowed_pairs(B, H, tq, tk, causal))
    return out


def padding(B, tk, real):
    kpm = torch.zeros(B, tk, dtype=torch.bool)
    for b, n in enumerate(real):
        kpm[b, :n] = True
    return kpm


# ---- S2-Attention -------------------------------------------------------------------------
def s2_keep(B, H, tq, tk, causal, bs, local, stride, homo=False):
    keep = causal_keep(B, H, tq, tk, causal)
    step = 0 if homo else max(1, stride // H)
    for h in range(H):
        for i in range(tq):
            qb = (i + tk - tq) // bs
            for j in range(tk):
                kb = j // bs
                near = 0 <= qb - kb < local if causal else abs(qb - kb) < local
                shard = (kb + h * step + 1) % stride == 0
                keep[:, h, i, j] &= near or shard
    return keep


S2 = dict(block_size=4, local_blocks=2, vert_stride=3)


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("causal,tq", [(True, 37), (False, 37), (True, 21)])
def test_s2_attention_matches_its_pattern_by_hand(impl, causal, tq):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=tq, tk=37, D=8)
    m = methods.load("s2_attention", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, **S2)
    check_against(m, q, k, v, s2_keep(2, 4, tq, 37, causal, 4, 2, 3), causal)
    if impl == "reference":
        assert m.cost(tq, 37, causal).density == pytest.approx(m.last_density)


def test_s2_attention_shards_cover_the_context_and_differ_by_head():
    q, k, v = seeded_qkv(B=1, H=4, Hkv=4, T=64, D=8)
    m = methods.load("s2_attention", num_heads=4, head_dim=8, impl="reference", block_size=4,
                     local_blocks=1, vert_stride=4)
    keys = m.computed_keys(q, k, causal=True)[0]  # [H, T, T]
    last = keys[:, -1]  # the last query: its shard and its own block
    assert all(not torch.equal(last[a], last[b]) for a in range(4) for b in range(a))
    assert last.any(0).all(), "the heads together cover every key"
    homo = methods.load("s2_attention", num_heads=4, head_dim=8, impl="reference", block_size=4,
                        local_blocks=1, vert_stride=4, homo_head=True).computed_keys(q, k, True)[0]
    assert all(torch.equal(homo[0], homo[h]) for h in range(4)) and not homo[:, -1].any(0).all()


def test_s2_attention_padding_and_gqa():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=30, D=8)
    kpm = padding(2, 30, [30, 19])
    m = methods.load("s2_attention", num_heads=4, num_kv_heads=2, head_dim=8, impl="reference", **S2)
    keep = s2_keep(2, 4, 30, 30, True, 4, 2, 3) & kpm.numpy()[:, None, None, :]
    check_against(m, q, k, v, keep, True, kpm)
    full = methods.load("s2_attention", num_heads=4, head_dim=8, impl="reference", **S2)
    torch.testing.assert_close(m(q, k, v, causal=True), full(q, k.repeat_interleave(2, 1),
                                                             v.repeat_interleave(2, 1), causal=True))


@pytest.mark.parametrize("causal", [True, False])
def test_s2_attention_triton_equals_reference(causal):
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=64, D=16, dtype=torch.float32)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, local_blocks=1, vert_stride=2)
    ref = methods.load("s2_attention", impl="reference", **kw)
    tri = methods.load("s2_attention", impl="triton", **kw)
    out = tri(q, k, v, causal=causal)
    assert tri.last_path == "triton" and tri.last_density < 1
    torch.testing.assert_close(out, ref(q, k, v, causal=causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(local_blocks=-1), dict(vert_stride=1.5)])
def test_s2_attention_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        methods.load("s2_attention", num_heads=4, head_dim=8, **bad)


# ---- Star Attention -----------------------------------------------------------------------
def star_keep(B, H, tq, tk, query_len, block, anchor, kpm=None):
    keep = causal_keep(B, H, tq, tk, True, kpm)
    C = tk - query_len
    for i in range(tq):
        p = i + tk - tq
        if p >= C:
            continue  # phase 2: the query sees everything before it
        own = range((p // block) * block, p + 1)
        for j in range(tk):
            keep[:, :, i, j] &= (j in own) or j < anchor
    return keep


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("tq,hosts,block,anchor", [(40, 3, None, None), (40, 2, 7, 3), (17, 4, None, 0)])
def test_star_attention_matches_its_pattern_by_hand(impl, tq, hosts, block, anchor):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=tq, tk=40, D=8)
    kpm = padding(2, 40, [40, 33])
    m = methods.load("star_attention", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, num_hosts=hosts,
                     block_size=block, anchor_size=anchor, query_len=5)
    bs = block or math.ceil(35 / hosts)
    keep = star_keep(2, 4, tq, 40, 5, bs, bs if anchor is None else anchor)
    check_against(m, q, k, v, keep, True)
    if impl == "reference":
        assert m.cost(tq, 40, True).density == pytest.approx(m.last_density)
    check_against(m, q, k, v, keep & kpm.numpy()[:, None, None, :], True, kpm)


def test_star_attention_gqa_exactness_and_causal_only():
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=30, D=8)
    kw = dict(num_heads=4, head_dim=8, impl="reference", num_hosts=3, query_len=4)
    m = methods.load("star_attention", num_kv_heads=2, **kw)
    torch.testing.assert_close(m(q, k, v, causal=True), methods.load("star_attention", **kw)(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True))
    one = methods.load("star_attention", num_kv_heads=2, **{**kw, "num_hosts": 1})  # one block: exact
    check_against(one, q, k, v, causal_keep(1, 4, 30, 30, True), True)
    assert one.last_density == 1.0
    with pytest.raises(AttentionInputError, match="causal"):
        m(q, k, v, causal=False)


@pytest.mark.parametrize("query_len", [32, 20])  # tile-aligned (Triton), and not (the flex path)
def test_star_attention_triton_equals_reference(query_len):
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=128, D=16, dtype=torch.float32)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=16, num_hosts=3, anchor_size=16, query_len=query_len)
    tri = methods.load("star_attention", impl="triton", **kw)
    out = tri(q, k, v, causal=True)
    assert tri.last_path == ("triton" if query_len == 32 else "flex")
    ref = methods.load("star_attention", impl="reference", **kw)
    torch.testing.assert_close(out, ref(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    if query_len == 32:
        assert ref.last_density <= tri.last_density < 1  # whole tiles: at least the kept pairs


@pytest.mark.parametrize("bad", [dict(num_hosts=0), dict(block_size=0), dict(anchor_size=-1),
                                 dict(query_len=-2)])
def test_star_attention_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        methods.load("star_attention", num_heads=4, head_dim=8, **bad)


# ---- SampleAttention ----------------------------------------------------------------------
def sample_keep(q, k, alpha, row_ratio, window_ratio, kpm=None):
    """The window plus the stripes: columns by the sampled rows' summed attention, the fewest
    whose share reaches alpha (loops over rows and keys)."""
    qn, kn = q.double().numpy(), k.double().numpy()
    B, H, tq, D = qn.shape
    tk, rep = kn.shape[2], H // kn.shape[1]
    n = math.ceil(row_ratio * tq)
    rows = [((r + 1) * tq) // n - 1 for r in range(n)]
    w = math.ceil(window_ratio * tk)
    keep = causal_keep(B, H, tq, tk, True, kpm)
    for b in range(B):
        for h in range(H):
            mass = np.zeros(tk)
            for i in rows:
                js = [j for j in range(i + tk - tq + 1) if kpm is None or kpm[b, j]]
                s = np.array([qn[b, h, i] @ kn[b, h // rep, j] for j in js]) / math.sqrt(D)
                p = np.exp(s - s.max())
                mass[js] += p / p.sum()
            chosen, got = set(), 0.0
            for j in sorted(range(tk), key=lambda j: -mass[j]):
                chosen.add(j)
                got += mass[j]
                if got / mass.sum() >= alpha:
                    break
            for i in range(tq):
                for j in range(tk):
                    keep[b, h, i, j] &= (i + tk - tq - j < w) or j in chosen
    return keep


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("tq,alpha,rows,win", [(48, 0.6, 0.1, 0.1), (48, 0.9, 0.3, 0.0), (20, 0.8, 0.2, 0.05)])
def test_sample_attention_matches_its_pattern_by_hand(impl, tq, alpha, rows, win):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=tq, tk=48, D=8)
    q = q * 3  # peaked attention: a few columns carry the mass
    m = methods.load("sample_attention", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, alpha=alpha,
                     row_ratio=rows, window_ratio=win)
    keep = sample_keep(q, k, alpha, rows, win)
    check_against(m, q, k, v, keep, True)
    assert 0 < keep.sum() < allowed_pairs(2, 4, tq, 48, True), "the pattern drops pairs"
    if impl == "reference":
        assert m.cost(tq, 48, True).density >= m.last_density * 0.5 and m.last_columns >= 1


def test_sample_attention_padding_gqa_and_index_alone():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=40, D=8)
    kpm = padding(2, 40, [40, 29])
    kw = dict(num_heads=4, head_dim=8, impl="reference", alpha=0.7, row_ratio=0.1, window_ratio=0.1)
    m = methods.load("sample_attention", num_kv_heads=2, **kw)
    check_against(m, q, k, v, sample_keep(q, k, 0.7, 0.1, 0.1, kpm), True, kpm)
    cols = m.index(q, k, kpm)
    assert cols.shape == (2, 4, 40) and not cols[1, :, 29:].any(), "no stripe on padding"
    torch.testing.assert_close(m(q, k, v, causal=True), methods.load("sample_attention", **kw)(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True))
    with pytest.raises(AttentionInputError, match="causal"):
        m(q, k, v, causal=False)
    full = methods.load("sample_attention", num_kv_heads=2, **{**kw, "window_ratio": 1.0})
    check_against(full, q, k, v, causal_keep(2, 4, 40, 40, True), True)  # window covers all: exact


def test_sample_attention_triton_equals_reference():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=128, D=16, dtype=torch.float32)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=16, alpha=0.5, row_ratio=0.1, window_ratio=0.1)
    tri = methods.load("sample_attention", impl="triton", **kw)
    out = tri(q * 3, k, v, causal=True)
    assert tri.last_path == "triton"
    ref = methods.load("sample_attention", impl="reference", **kw)
    torch.testing.assert_close(out, ref(q * 3, k, v, causal=True), rtol=1e-4, atol=1e-5)
    assert ref.last_density < 1  # (the kernel's tiles of 64 may still visit everything here)


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=1.5), dict(row_ratio=0), dict(window_ratio=-0.1)])
def test_sample_attention_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        methods.load("sample_attention", num_heads=4, head_dim=8, **bad)


# ---- SpargeAttn ---------------------------------------------------------------------------
def blocky(B, H, T, D, bs, noisy_every, seed):
    """Rows near a centre per block of bs (self-similar), every noisy_every-th block pure noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, H, math.ceil(T / bs), D, generator=g, dtype=torch.float64) * 2
    x = centres.repeat_interleave(bs, 2)[:, :, :T] + 0.3 * torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    noise = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    blk = torch.arange(T) // bs
    return torch.where((blk % noisy_every == 0).view(1, 1, T, 1), noise, x)


def sparge_map(q, k, bq, bk, theta, tau, causal, sink=False):
    """Stage 1 by hand: block means and mean pairwise cosines, softmax over the self-similar
    causal key blocks, the largest ones while their cumulative share stays within tau."""
    qn, kn = q.numpy(), k.numpy()
    kn = kn - kn.mean(axis=2, keepdims=True)
    B, H, tq, D = qn.shape
    tk, rep = kn.shape[2], H // kn.shape[1]
    nq, nk = math.ceil(tq / bq), math.ceil(tk / bk)

    def stats(x, bs, i):
        rows = x[i * bs:(i + 1) * bs]
        u = [r / np.linalg.norm(r) for r in rows]
        return rows.mean(0), np.mean([a @ b for a in u for b in u])

    bmap = np.zeros((B, H, nq, nk), dtype=bool)
    for b in range(B):
        for h in range(H):
            qs = [stats(qn[b, h], bq, i) for i in range(nq)]
            ks = [stats(kn[b, h // rep], bk, j) for j in range(nk)]
            for i in range(nq):
                last = min((i + 1) * bq, tq) - 1 + tk - tq
                vis = [j for j in range(nk) if not causal or j * bk <= last]
                cand = [j for j in vis if ks[j][1] > theta]
                chosen = []
                if cand:
                    s = np.array([qs[i][0] @ ks[j][0] for j in cand]) / math.sqrt(D)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    got = 0.0
                    for r in np.argsort(-p, kind="stable"):
                        if got + p[r] > tau and chosen:
                            break
                        got += p[r]
                        chosen.append(cand[r])
                for j in vis:
                    bmap[b, h, i, j] = j in chosen or ks[j][1] <= theta or qs[i][1] <= theta or (sink and j == 0)
    return bmap


def block_keep(bmap, tq, tk, bq, bk, causal, kpm=None):
    B, H = bmap.shape[:2]
    keep = causal_keep(B, H, tq, tk, causal, kpm)
    for i in range(tq):
        for j in range(tk):
            keep[:, :, i, j] &= bmap[:, :, i // bq, j // bk]
    return keep


SPARGE = dict(block_q=8, block_k=4, sim_threshold=0.5, cdf_threshold=0.6)


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("causal,tq,sink", [(True, 46, False), (False, 46, True), (True, 30, False)])
def test_sparge_matches_its_block_map_by_hand(impl, causal, tq, sink):
    q, k = blocky(2, 4, tq, 8, 8, 3, 0), blocky(2, 2, 46, 8, 4, 4, 1)
    v = torch.randn(2, 2, 46, 8, dtype=torch.float64)
    m = methods.load("sparge", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, attention_sink=sink, **SPARGE)
    bmap = sparge_map(q, k, 8, 4, 0.5, 0.6, causal, sink)
    assert torch.equal(m.block_map(q, k, causal), torch.from_numpy(bmap))
    keep = block_keep(bmap, tq, 46, 8, 4, causal)
    assert 0 < keep.sum() < allowed_pairs(2, 4, tq, 46, causal), "the map drops pairs"
    check_against(m, q, k, v, keep, causal)


def test_sparge_dissimilar_blocks_are_always_computed_padding_and_gqa():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=40, D=8)  # noise: no block is self-similar
    kpm = padding(2, 40, [40, 27])
    kw = dict(num_heads=4, head_dim=8, impl="reference", **SPARGE)
    m = methods.load("sparge", num_kv_heads=2, **kw)
    assert m.block_map(q, k, True).sum() == m.causal_blocks(40, 40).sum() * 8  # dense (causal) map
    check_against(m, q, k, v, causal_keep(2, 4, 40, 40, True, kpm), True, kpm)
    q, k = blocky(2, 4, 40, 8, 8, 3, 2), blocky(2, 2, 40, 8, 4, 4, 3)
    torch.testing.assert_close(m(q, k, v, causal=True), methods.load("sparge", **kw)(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True))


def pv_skip_by_hand(q, k, v, bmap, bq, bk, lam, causal):
    """Stage 2 by hand: per query block, the visited key blocks in order, online softmax row by
    row; a block's PV dropped when every row's block maximum is more than lam below its
    running maximum."""
    qn, kn, vn = (x.numpy() for x in (q, k, v))
    B, H, tq, D = qn.shape
    tk, rep = kn.shape[2], H // kn.shape[1]
    out = np.zeros((B, H, tq, D))
    for b in range(B):
        for h in range(H):
            for i in range(bmap.shape[2]):
                rows = range(i * bq, min((i + 1) * bq, tq))
                m = {r: -np.inf for r in rows}
                lsum = {r: 0.0 for r in rows}
                acc = {r: np.zeros(D) for r in rows}
                for j in np.nonzero(bmap[b, h, i])[0]:
                    scores = {}
                    for r in rows:
                        js = [c for c in range(j * bk, min((j + 1) * bk, tk)) if not causal or c <= r + tk - tq]
                        scores[r] = {c: qn[b, h, r] @ kn[b, h // rep, c] / math.sqrt(D) for c in js}
                    local = {r: max(scores[r].values(), default=-np.inf) for r in rows}
                    new = {r: max(m[r], local[r]) for r in rows}
                    gaps = [local[r] - new[r] for r in rows if local[r] > -np.inf]
                    skip = bool(gaps) and max(gaps) < -lam
                    for r in rows:
                        if new[r] == -np.inf:
                            continue
                        a = math.exp(m[r] - new[r]) if m[r] > -np.inf else 0.0
                        p = {c: math.exp(s - new[r]) for c, s in scores[r].items()}
                        lsum[r] = lsum[r] * a + sum(p.values())
                        acc[r] = acc[r] * a + (0 if skip else sum(pc * vn[b, h // rep, c] for c, pc in p.items()))
                        m[r] = new[r]
                for r in rows:
                    out[b, h, r] = acc[r] / lsum[r] if lsum[r] else 0
    return torch.from_numpy(out)


@pytest.mark.parametrize("lam,causal", [(0.5, True), (1.0, False), (1e9, True)])
def test_sparge_pv_skip_matches_the_online_softmax_by_hand(lam, causal):
    q, k = blocky(1, 2, 32, 8, 8, 3, 4) * 2, blocky(1, 1, 32, 8, 4, 4, 5) * 2
    v = torch.randn(1, 1, 32, 8, dtype=torch.float64)
    m = methods.load("sparge", num_heads=2, num_kv_heads=1, head_dim=8, impl="reference", pv_skip=True,
                     pv_threshold=lam, **SPARGE)
    out = m(q, k, v, causal=causal)
    bmap = m.block_map(q, k, causal).numpy()
    torch.testing.assert_close(out, pv_skip_by_hand(q, k, v, bmap, 8, 4, lam, causal), rtol=1e-9, atol=1e-10)
    if lam > 1e6:  # nothing skipped: the stage-1 pattern exactly
        assert m.last_pv_skipped == 0
        torch.testing.assert_close(out, by_hand(q, k, v, block_keep(bmap, 32, 32, 8, 4, causal)))
    else:
        assert m.last_pv_skipped > 0


def test_sparge_triton_equals_reference():
    q, k = blocky(1, 2, 128, 16, 32, 3, 6).float(), blocky(1, 1, 128, 16, 16, 4, 7).float()
    v = torch.randn(1, 1, 128, 16)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=16, block_q=32, block_k=16, sim_threshold=0.5,
              cdf_threshold=0.6)
    for causal in (True, False):
        tri = methods.load("sparge", impl="triton", **kw)
        ref = methods.load("sparge", impl="reference", **kw)
        out = tri(q, k, v, causal=causal)
        assert tri.last_path == "triton" and tri.last_density < 1
        torch.testing.assert_close(out, ref(q, k, v, causal=causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,match", [(dict(block_q=0), "block_q"), (dict(cdf_threshold=0), "cdf_threshold"),
                                       (dict(sim_threshold=2), "sim_threshold"),
                                       (dict(pv_threshold=-1), "pv_threshold"),
                                       (dict(pv_skip=True, impl="flex"), "impl=reference")])
def test_sparge_bad_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=match):
        methods.load("sparge", num_heads=4, head_dim=8, **bad)


# ---- HiP ----------------------------------------------------------------------------------
def hip_layout(q, k, top_k, bq, bk, causal, kpm=None):
    """The tree search by hand: per query block, K branches over its key blocks, each split in
    two (the first half the larger), children scored by the max q.k over the block's queries
    and their first key block, the K best kept, until every branch is one block."""
    qn, kn = q.numpy(), k.numpy()
    B, H, tq, D = qn.shape
    tk, rep = kn.shape[2], H // kn.shape[1]
    nq, nk, K = math.ceil(tq / bq), math.ceil(tk / bk), top_k // bk
    lay = np.zeros((B, H, nq, nk), dtype=bool)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                rows = range(i * bq, min((i + 1) * bq, tq))
                n = (rows[-1] + tk - tq) // bk + 1 if causal else nk
                nodes = [(r * n // K, (r + 1) * n // K) for r in range(K)]
                while any(t - s > 1 for s, t in nodes):
                    children = []
                    for s, t in nodes:
                        m = s + (t - s + 1) // 2
                        children += [(s, m), (m, t)]

                    def score(c):
                        if c[1] <= c[0]:
                            return -np.inf
                        keys = [j for j in range(c[0] * bk, min(c[0] * bk + bk, tk)) if kpm is None or kpm[b, j]]
                        return max((qn[b, h, r] @ kn[b, h // rep, j] for r in rows for j in keys), default=-np.inf)

                    nodes = sorted(children, key=score, reverse=True)[:K]
                for s, t in nodes:
                    if t - s == 1:
                        lay[b, h, i, s] = True
    return lay


def hip_keep(lay, tq, tk, bq, bk, window, causal, kpm=None):
    B, H = lay.shape[:2]
    keep = causal_keep(B, H, tq, tk, causal, kpm)
    for i in range(tq):
        p = i + tk - tq
        for j in range(tk):
            near = p - j < window if causal else abs(p - j) < window
            keep[:, :, i, j] &= lay[:, :, i // bq, j // bk] | near
    return keep


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("causal,tq,window", [(True, 50, 3), (False, 50, 2), (True, 23, 0)])
def test_hip_matches_the_tree_search_by_hand(impl, causal, tq, window):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=tq, tk=50, D=8)
    m = methods.load("hip", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, top_k=6, block_q=8, block_k=2,
                     window=window)
    lay = hip_layout(q, k, 6, 8, 2, causal)
    assert torch.equal(m.block_layout(q, k, causal), torch.from_numpy(lay))
    assert (lay.sum(-1) == 3).all(), "K = top_k / block_k blocks per query block (ranges of 3+ blocks)"
    keep = hip_keep(lay, tq, 50, 8, 2, window, causal)
    assert 0 < keep.sum() < allowed_pairs(2, 4, tq, 50, causal)
    check_against(m, q, k, v, keep, causal)


def test_hip_padding_gqa_and_short_ranges():
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=40, D=8)
    kpm = padding(2, 40, [40, 25])
    kw = dict(num_heads=4, head_dim=8, impl="reference", top_k=8, block_q=8, block_k=2, window=2)
    m = methods.load("hip", num_kv_heads=2, **kw)
    lay = hip_layout(q, k, 8, 8, 2, True, kpm)
    check_against(m, q, k, v, hip_keep(lay, 40, 40, 8, 2, 2, True, kpm), True, kpm)
    assert lay[:, :, 0, :4].all(), "the first query block's range (4 blocks) is kept whole"
    torch.testing.assert_close(m(q, k, v, causal=True), methods.load("hip", **kw)(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True))
    big = methods.load("hip", num_kv_heads=2, **{**kw, "top_k": 40, "window": 0})  # budget covers all: exact
    check_against(big, q, k, v, causal_keep(2, 4, 40, 40, True), True)
    assert big.last_density == 1.0


def test_hip_finds_the_planted_key():
    """The search's purpose (under the paper's locality assumption): a run of keys aligned with
    the last query block (keys 96..159, blocks 48..79 of 128) is where all 4 kept blocks land."""
    q, k, v = seeded_qkv(B=1, H=1, Hkv=1, T=256, D=16)
    u = q[0, 0, -32:].mean(0)
    k[0, 0, 96:160] += u / u.norm() * 40
    m = methods.load("hip", num_heads=1, head_dim=16, impl="reference", top_k=8, block_q=32, block_k=2, window=0)
    kept = m.block_layout(q, k, causal=True)[0, 0, -1].nonzero().flatten()
    assert len(kept) == 4 and ((kept >= 48) & (kept < 80)).all(), kept


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(block_q=0), dict(block_k=0), dict(window=-1),
                                 dict(top_k=1, block_k=2)])
def test_hip_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match="top_k" if "top_k" in bad else next(iter(bad))):
        methods.load("hip", num_heads=4, head_dim=8, **bad)


# ---- all of them ---------------------------------------------------------------------------
SMALL = {
    "s2_attention": dict(block_size=4, local_blocks=1, vert_stride=3),
    "star_attention": dict(num_hosts=3, query_len=4),
    "sample_attention": dict(alpha=0.5, row_ratio=0.1, window_ratio=0.1),
    "sparge": dict(block_q=8, block_k=4, sim_threshold=0.0, cdf_threshold=0.5),
    "hip": dict(top_k=4, block_q=8, block_k=2, window=2),
    "moa": dict(alpha=3, beta=0.25, num_sink=2),
}
DATA_DEPENDENT = ("sample_attention", "sparge", "hip")


@pytest.mark.parametrize("name", list(SMALL))
def test_recall_pairs_gradients_and_index_time(name):
    """computed_keys (attention recall's pairs) are what the output attends to; gradients flow
    through the reference path (the index is built without them); the data-dependent methods
    time their index building apart (last_index_ms, under index_timing)."""
    q, k, v = (x.requires_grad_() for x in seeded_qkv(B=1, H=4, Hkv=2, T=40, D=8))
    m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=8, impl="reference", **SMALL[name])
    keep = m.computed_keys(q, k, causal=True)
    with index_timing(True):
        out = check_against(m, q, k, v, keep.numpy(), True)
    assert m.last_density == pytest.approx(float(keep.sum()) / allowed_pairs(1, 4, 40, 40, True))
    assert m.last_density < 1
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    if name in DATA_DEPENDENT:
        assert m.last_index_ms is not None and m.last_index_ms >= 0


# ---- MoA --------------------------------------------------------------------------------
def moa_keep(B, H, tq, tk, rules, sink, kpm=None):
    keep = causal_keep(B, H, tq, tk, True, kpm)
    for h, (a, b) in enumerate(rules):
        w = max(1, int(a + b * tk))
        for i in range(tq):
            for j in range(tk):
                keep[:, h, i, j] &= (i + tk - tq - j < w) or j < sink
    return keep


RULES = [(2, 0.0), (0, 0.25), (3, 0.1), (0, 1.0)]


@pytest.mark.parametrize("impl", ["reference", "flex"])
@pytest.mark.parametrize("tq", [40, 13])
def test_moa_matches_its_per_head_rules_by_hand(impl, tq, tmp_path):
    from methods.moa import save_rules

    save_rules(tmp_path / "r.json", [{"alpha": a, "beta": b} for a, b in RULES])
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=tq, tk=40, D=8)
    kpm = padding(2, 40, [40, 31])
    m = methods.load("moa", num_heads=4, num_kv_heads=2, head_dim=8, impl=impl, num_sink=2,
                     rule_file=str(tmp_path / "r.json"))
    keep = moa_keep(2, 4, tq, 40, RULES, 2)
    check_against(m, q, k, v, keep, True)
    if impl == "reference":
        assert m.cost(tq, 40, True).density == pytest.approx(m.last_density)
    check_against(m, q, k, v, moa_keep(2, 4, tq, 40, RULES, 2, kpm), True, kpm)
    with pytest.raises(AttentionInputError, match="causal"):
        m(q, k, v, causal=False)


def test_moa_triton_equals_reference_and_gqa():
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=256, D=16, dtype=torch.float32)
    kw = dict(num_heads=4, head_dim=16, num_sink=3)
    tri, ref = (methods.load("moa", num_kv_heads=2, impl=i, **kw) for i in ("triton", "reference"))
    tri.rules = ref.rules = [(5, 0.0), (0, 0.1), (64, 0.0), (0, 0.5)]
    out = tri(q, k, v, causal=True)
    assert tri.last_path == "triton"
    torch.testing.assert_close(out, ref(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    assert ref.last_density < 1
    rep = methods.load("moa", impl="reference", **kw)
    rep.rules = ref.rules
    torch.testing.assert_close(ref(q, k, v, causal=True),
                               rep(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True))


def test_moa_profiling_gives_local_heads_short_windows_within_the_budget():
    """Head 0 attends to itself (local), head 1 to the first keys (long range): under a budget
    that does not allow both a full window, head 1 gets the longer span."""
    g = torch.Generator().manual_seed(0)
    T, D = 48, 8
    q = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
    k[0, 0] = q[0, 0] * 4  # each query matches its own key
    k[0, 1, :3] = q[0, 1].mean(0) * 30  # every query matches the first keys
    m = methods.load("moa", num_heads=2, head_dim=D, impl="reference", num_sink=0)
    cands = [(1, 0.0), (4, 0.0), (0, 0.25), (0, 1.0)]
    found = m.calibrate(q, k, budget=0.6, candidates=cands)
    assert m.rules[0][0] + m.rules[0][1] * T < m.rules[1][0] + m.rules[1][1] * T
    assert sum(f["density"] for f in found) / 2 <= 0.6
    qn, kn = q.numpy(), k.numpy()
    for h, f in enumerate(found):  # mass and density by hand
        keep = moa_keep(1, 2, T, T, [m.rules[h]] * 2, 0)[0, h]
        kept = []
        for i in range(T):
            s = np.array([qn[0, h, i] @ kn[0, h, j] for j in range(i + 1)]) / math.sqrt(D)
            p = np.exp(s - s.max())
            kept.append((p / p.sum() * keep[i, :i + 1]).sum())
        assert f["mass"] == pytest.approx(float(np.mean(kept)))
        assert f["density"] == pytest.approx(keep.sum() / allowed_pairs(1, 1, T, T, True))
    with pytest.raises(ValueError, match="budget"):
        m.calibrate(q, k, budget=0.01, candidates=cands)


@pytest.mark.parametrize("bad,match", [(dict(alpha=-1), "alpha"), (dict(beta=1.5), "beta"),
                                       (dict(num_sink=-1), "num_sink"), (dict(rule_file="/nope.json"), "nope")])
def test_moa_bad_hyperparameters(bad, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        methods.load("moa", num_heads=4, head_dim=8, **bad)


# ---- HyperAttention ---------------------------------------------------------------------
def gray_codes(r):
    """The reflected Gray code sequence of r bits (as the official AngularLSH builds it)."""
    seq = [0, 1]
    for i in range(1, r):
        seq = seq + [x + 2 ** i for x in reversed(seq)]
    return seq


def hyper_weights_nc(q, k, proj, bs, samples, qo=0, ko=0, min_len=0):
    """One non-causal block by hand: weights w[b][h][i][j] (dict of dicts)."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    gray = gray_codes(proj.shape[1])
    w = np.zeros((B, H, nq, nk))
    if nq <= min_len:
        return w + 1
    for b in range(B):
        for h in range(H):
            def bucket(x):
                code = sum(2 ** r for r in range(proj.shape[1]) if float(x @ proj[:, r]) > 0)
                return gray[code]
            qh = [bucket(q[b, h, i]) for i in range(nq)]
            kh = [bucket(k[b, h, j]) for j in range(nk)]
            q_sorted = sorted(range(nq), key=lambda i: (qh[i], i))
            k_sorted = sorted(range(nk), key=lambda j: (kh[j], j))
            qblk = {i: r // bs for r, i in enumerate(q_sorted)}
            kblk = {j: r // bs for r, j in enumerate(k_sorted)}
            for i in range(nq):
                for j in range(nk):
                    w[b, h, i, j] = qblk[i] == kblk[j]
                if samples is not None:
                    for r in samples[b, h].tolist():
                        j = k_sorted[r]
                        if qblk[i] != kblk[j]:
                            w[b, h, i, j] += nk / samples.shape[-1]
    return w


def weighted_by_hand(q, k, v, w):
    """o_i = sum_j w_ij e^{s_ij} v_j / sum_j w_ij e^{s_ij}, row by row."""
    qn, kn, vn = (x.double().numpy() for x in (q, k, v))
    B, H, tq, D = qn.shape
    rep = H // kn.shape[1]
    out = np.zeros((B, H, tq, D))
    for b in range(B):
        for h in range(H):
            for i in range(tq):
                js = [j for j in range(kn.shape[2]) if w[b, h, i, j] > 0]
                if not js:
                    continue
                s = np.array([qn[b, h, i] @ kn[b, h // rep, j] for j in js]) / math.sqrt(D)
                e = np.exp(s - s.max()) * np.array([w[b, h, i, j] for j in js])
                out[b, h, i] = sum(ej * vn[b, h // rep, j] for ej, j in zip(e, js)) / e.sum()
    return torch.from_numpy(out)


HYPER = dict(lsh_num_projs=3, block_size=4, sample_size=5, min_seq_len=8)


def test_hyper_attention_noncausal_is_lsh_blocks_plus_weighted_samples_by_hand():
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=20, tk=24, D=8)
    m = methods.load("hyper_attention", num_heads=2, num_kv_heads=1, head_dim=8, **HYPER).double()
    out = m(q, k, v, causal=False)
    kk = k.repeat_interleave(2, 1)
    w = hyper_weights_nc(q, kk, m.proj_dir, 4, m.draw_samples(2, 2, 24, 0, 0))
    assert ((w > 0) & (w < 1)).sum() == 0 and (w > 1).any(), "sampled weights n/s on top of the blocks"
    torch.testing.assert_close(out, weighted_by_hand(q, k, v, w), rtol=1e-9, atol=1e-10)
    assert torch.equal(m.computed_keys(q, k, False), torch.from_numpy(w > 0))
    assert m.last_density == pytest.approx((w > 0).sum() / (2 * 2 * 20 * 24)) and m.last_density < 1


def test_hyper_attention_causal_recursive_split_by_hand():
    T = 20  # halves 10 and 10 (> min_seq_len 8: split again into 5 + 5, exact)
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=T, D=8)
    kpm = padding(1, T, [17])
    m = methods.load("hyper_attention", num_heads=2, head_dim=8, **HYPER).double()
    out = m(q, k, v, causal=True, key_padding_mask=kpm)
    w = np.zeros((1, 2, T, T))

    def causal(lo, n):
        if n <= 8:
            for i in range(n):
                w[:, :, lo + i, lo:lo + i + 1] = 1
            return
        h = n // 2
        causal(lo, h)
        causal(lo + h, n - h)
        qs, ks = q[:, :, lo + h:lo + n], k[:, :, lo:lo + h]
        samples = m.draw_samples(1, 2, h, lo + h, lo) if h > 5 else None
        w[:, :, lo + h:lo + n, lo:lo + h] = hyper_weights_nc(qs, ks, m.proj_dir, 4, samples, min_len=8)

    causal(0, T)
    assert (w[:, :, 10:, :10] == 0).any() and np.allclose(np.triu(w[0, 0], 1), 0)
    torch.testing.assert_close(out, weighted_by_hand(q, k, v, w * kpm.numpy()[:, None, None, :]),
                               rtol=1e-9, atol=1e-10)


def test_hyper_attention_exact_below_min_seq_len_gqa_and_hardness():
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=30, D=8)
    m = methods.load("hyper_attention", num_heads=4, num_kv_heads=2, head_dim=8, report_hardness=True)
    for causal in (True, False):
        check_against(m, q, k, v, causal_keep(1, 4, 30, 30, causal), causal)
    h = m.last_hardness  # exact attention: nothing removed, kappa = the row sums' spread
    qd, kd = q.numpy(), k.repeat_interleave(2, 1).numpy()
    alpha = kappa = 0.0
    for hh in range(4):
        a = np.exp(qd[0, hh] @ kd[0, hh].T / math.sqrt(8))
        alpha = max(alpha, 30 * ((a / a.sum(1, keepdims=True)) ** 2).sum(0).max())
        kappa = max(kappa, a.sum(1).max() / a.sum(1).min())
    assert h["alpha"] == pytest.approx(alpha) and h["kappa"] == pytest.approx(kappa)
    kw = dict(num_heads=4, head_dim=8, **HYPER)
    a = methods.load("hyper_attention", num_kv_heads=2, **kw).double()
    b = methods.load("hyper_attention", **kw).double()
    torch.testing.assert_close(a(q, k, v, causal=True), b(q, k.repeat_interleave(2, 1),
                                                          v.repeat_interleave(2, 1), causal=True))


@pytest.mark.parametrize("bad", [dict(lsh_num_projs=0), dict(block_size=0), dict(sample_size=-1),
                                 dict(min_seq_len=0), dict(lsh_num_projs=40)])
def test_hyper_attention_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        methods.load("hyper_attention", num_heads=4, head_dim=8, **bad)


def test_hyper_attention_gradients_and_cost():
    q, k, v = (x.requires_grad_() for x in seeded_qkv(B=1, H=2, Hkv=1, T=24, D=8))
    m = methods.load("hyper_attention", num_heads=2, num_kv_heads=1, head_dim=8, **HYPER).double()
    m(q, k, v, causal=True).sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    exact = methods.load("hyper_attention", num_heads=2, head_dim=8)  # min_seq_len 4096
    assert exact.cost(64, 64, True).density == 1.0
    assert m.cost(4096, 4096, True).density < 1 and m.cost(4096, 4096, False).density < 1


@pytest.mark.parametrize("name", ["sample_attention", "hip"])
def test_index_in_chunks_equals_the_index_at_once(name):
    """The index building bounds its score memory (score_bytes) by chunks: same pattern."""
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=64, D=8)
    kw = dict(SMALL[name], row_ratio=0.3) if name == "sample_attention" else SMALL[name]
    a, b = (methods.load(name, num_heads=4, num_kv_heads=2, head_dim=8, impl="reference", **kw) for _ in "ab")
    b.score_bytes = 1  # one sampled row / query block at a time
    assert torch.equal(a.computed_keys(q, k, True), b.computed_keys(q, k, True))
    torch.testing.assert_close(a(q, k, v, causal=True), b(q, k, v, causal=True), rtol=0, atol=0)
