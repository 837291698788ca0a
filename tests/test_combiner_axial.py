"""Combiner-Axial (issue 26) against independent computations written here: its attention matrix
built entry by entry from the paper's equations (direct row, every other row through the query
of i's column), a port of the official axial_rowmajor (row_summary none / wsum), and the
factorization read back from the method (v = identity: full attention)."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from tests.conftest import seeded_qkv


def _load(H=2, Hkv=1, D=3, **kw):
    return methods.load("combiner_axial", num_heads=H, num_kv_heads=Hkv, head_dim=D, **kw).double()


def axial_matrix(q, k, m, causal, regions="all", summary="none", real=None):
    """[T, T] attention matrix of one head, entry by entry (q, k: [T, D]; real: [T] bool)."""
    T, D = q.shape
    real = [True] * T if real is None else real.tolist()
    q = q / math.sqrt(D)
    rows = [list(range(a, min(a + m, T))) for a in range(0, T, m)]
    A = torch.zeros(T, T, dtype=q.dtype)
    for i in range(T):
        a, c = divmod(i, m)
        direct = [j for j in rows[a] if real[j] and (not causal or j <= i)]
        regs = []
        for r, idx in enumerate(rows):
            keys = [j for j in idx if real[j]]
            if not keys or (causal and r >= a) or (not causal and regions == "others" and r == a):
                continue
            src = r * m + c  # the position of row r in i's column
            if src >= T or (summary == "none" and not real[src]):
                continue
            w = torch.softmax(torch.tensor([float(q[src] @ k[j]) for j in keys], dtype=q.dtype), 0)
            kr = k[src] if summary == "none" else sum(float(wj) * k[j] for wj, j in zip(w, keys))
            regs.append((float(q[i] @ kr), keys, w))
        z = sum(math.exp(float(q[i] @ k[j])) for j in direct) + sum(math.exp(lg) for lg, _, _ in regs)
        for j in direct:
            A[i, j] += math.exp(float(q[i] @ k[j])) / z
        for lg, keys, w in regs:
            for j, wj in zip(keys, w):
                A[i, j] += math.exp(lg) / z * float(wj)
    return A


@pytest.mark.parametrize("causal,regions", [(True, "all"), (False, "all"), (False, "others")])
@pytest.mark.parametrize("summary", ["none", "wsum"])
def test_combiner_axial_equals_its_factorized_matrix_written_out(causal, regions, summary):
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=10, D=3)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 1] = kpm[1, 8:] = False  # a padded key inside a row, and a last row of padding only
    out = _load(row_len=4, row_summary=summary, noncausal_regions=regions)(q, k, v, causal=causal,
                                                                          key_padding_mask=kpm)
    for b in range(2):
        for h in range(2):
            A = axial_matrix(q[b, h], k[b, 0], 4, causal, regions, summary, kpm[b])
            torch.testing.assert_close(out[b, h], A @ v[b, 0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_combiner_axial_is_full_attention(causal):
    # causal: a shorter last row is never a region; non-causal it is seen only from the columns
    # it has (the docstring), so T is a multiple of the row there
    T = 11 if causal else 12
    q, k, _ = seeded_qkv(B=1, H=2, Hkv=2, T=T, D=T)
    v = torch.eye(T, dtype=q.dtype).expand(1, 2, T, T)
    A = _load(H=2, Hkv=2, D=T, row_len=3)(q, k, v, causal=causal)
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    assert (A[..., allowed] > 0).all() and (A[..., ~allowed] == 0).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 2, T, dtype=A.dtype))


def official_axial_rowmajor(q, k, v, m, causal, row_summary):
    """google-research/combiner tf/approx_attention.py ``axial_rowmajor`` after its projections
    (row_summary none / wsum), ported to torch: q, k, v [B, T, N, K], T a multiple of m."""
    B, T, N, K = q.shape
    n = T // m
    q = q * K ** -0.5
    ql, kl, vl = (t.reshape(B, n, m, N, K) for t in (q, k, v))
    local = torch.einsum("bsqhd,bskhd->bsqhk", ql, kl)
    row_probs = torch.softmax(local, -1)  # before the causal mask, as in the code
    row_out = torch.einsum("bsqhk,bskhd->bsqhd", row_probs, vl)
    key_row = kl if row_summary == "none" else torch.einsum("bsqhk,bskhd->bsqhd", row_probs, kl)
    if causal:
        local = local + (-1e9 * (1 - torch.ones(m, m).tril()))[:, None, :]
    glob = torch.einsum("bqlhd,bklhd->bqlhk", ql, key_row)
    if causal:
        glob = glob + (-1e9 * (1 - torch.ones(n, n).tril(-1)))[:, None, None, :]
    w = torch.softmax(torch.cat([local, glob], -1), -1)
    out = torch.einsum("bsqhk,bskhd->bsqhd", w[..., :m], vl)
    out = out + torch.einsum("bqlhv,bvlhd->bqlhd", w[..., m:], row_out)
    return out.reshape(B, T, N, K)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("summary", ["none", "wsum"])
def test_combiner_axial_matches_the_official_code(causal, summary):
    q, k, v = seeded_qkv(B=2, H=3, Hkv=3, T=12, D=5)
    want = official_axial_rowmajor(*(t.transpose(1, 2) for t in (q, k, v)), 4, causal, summary).transpose(1, 2)
    got = _load(H=3, Hkv=3, D=5, row_len=4, row_summary=summary)(q, k, v, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_combiner_axial_sqrt_rows_and_cost():
    m = _load(row_len=None)
    assert m.row(100) == 10 and m.row(101) == 11
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=16, D=3)
    torch.testing.assert_close(m(q, k, v, causal=True), _load(row_len=4)(q, k, v, causal=True))
    big = methods.load("combiner_axial", num_heads=8, head_dim=64)
    for causal in (False, True):
        c = big.cost(8192, 8192, causal)
        assert 0 < c.density < 0.1 and c.flops > 0  # T (m + T / m) scores instead of T^2


def test_combiner_axial_refuses_a_cache_longer_than_the_queries_and_bad_settings():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=3, D=3, tk=9)
    with pytest.raises(AttentionInputError, match="Tq == Tk"):
        _load()(q, k, v, causal=True)
    for kw, match in ((dict(row_len=0), "row_len"), (dict(row_summary="proj"), "row_summary"),
                      (dict(noncausal_regions="some"), "noncausal_regions")):
        with pytest.raises(ValueError, match=match):
            methods.load("combiner_axial", **kw)
