"""Sparse, routed and sparse + low-rank attention (issue 26, second part): Sparse Transformer,
Routing Transformer, Scatterbrain and BiFormer, each against an independent computation
written here from the paper's definition (the pattern built with loops over positions, the
softmax by hand), causal and non-causal, GQA == repeated KV heads, padding, decode == the
last row of the prefill, and bad hyperparameters."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from tests.conftest import seeded_qkv

NEW = ["sparse_transformer", "routing_transformer", "scatterbrain", "biformer", "sea"]


def _load(name, H=4, Hkv=2, D=8, **kw):
    return methods.load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=256, **kw).double()


def _rep(x, H):
    return x.repeat_interleave(H // x.shape[1], dim=1)


def _softmax_attention(q, k, v, allowed):
    """Softmax over the allowed keys, by hand; rows with none give zeros. allowed [B|1, H|1, Tq, Tk]."""
    H = q.shape[1]
    k, v = _rep(k, H), _rep(v, H)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    s = torch.where(allowed, s, torch.full_like(s, -1e300))
    e = torch.exp(s - s.amax(-1, keepdim=True)) * allowed
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bhij,bhjd->bhid", p, v)


def _causal_padding(B, tq, tk, causal, kpm=None):
    m = torch.ones(B, 1, tq, tk, dtype=torch.bool)
    for i in range(tq):
        for j in range(tk):
            if causal and j > tk - tq + i:
                m[:, :, i, j] = False
    if kpm is not None:
        m &= kpm[:, None, None, :]
    return m


# ---- Sparse Transformer --------------------------------------------------------------------
def _sparse_transformer_pattern(H, tq, tk, pattern, l, c, heads, causal):
    """A_i from Child et al. Sec. 4.2 by loops over positions (the non-causal sets: no j <= i)."""
    m = torch.zeros(1, H, tq, tk, dtype=torch.bool)
    for h in range(H):
        for qi in range(tq):
            i = tk - tq + qi
            for j in range(tk):
                if pattern == "strided":
                    a1 = (max(0, i - l) <= j <= i) if causal else abs(i - j) <= l
                    a2 = (i - j) % l == 0
                else:
                    a1 = i // l == j // l
                    a2 = j % l in range(l - c, l)
                keep = {"merged": a1 or a2, "split": a1 if h % 2 == 0 else a2}[heads]
                m[0, h, qi, j] = keep and (not causal or j <= i)
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern,heads", [("strided", "merged"), ("fixed", "merged"), ("strided", "split"),
                                           ("fixed", "split")])
def test_sparse_transformer_matches_its_pattern(causal, pattern, heads):
    m = _load("sparse_transformer", impl="reference", pattern=pattern, stride=4, summary=2, heads=heads)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=13, D=8, tk=17)
    kpm = torch.ones(2, 17, dtype=torch.bool)
    kpm[1, 12:] = False
    pat = _sparse_transformer_pattern(4, 13, 17, pattern, 4, 2, heads, causal)
    ref = _softmax_attention(q, k, v, pat & _causal_padding(2, 13, 17, False, kpm))
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm), ref)
    assert (m.computed_keys(q, k, causal) == pat.expand(2, -1, -1, -1)).all()
    assert 0.2 < m.last_density < 1  # sparse, and not empty


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_transformer_flex_equals_reference(causal):
    kw = dict(H=2, Hkv=1, D=16, pattern="fixed", stride=8, summary=2)
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=40, D=16, dtype=torch.float32)
    ref = _load("sparse_transformer", impl="reference", **kw).float()(q, k, v, causal=causal)
    m = _load("sparse_transformer", impl="flex", **kw).float()
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, causal=causal), ref, atol=2e-5, rtol=2e-5)
    assert m.last_path == "flex"


@pytest.mark.parametrize("pattern,heads", [("strided", "merged"), ("fixed", "merged"), ("strided", "split"),
                                           ("fixed", "split")])
def test_sparse_transformer_cost_counts_the_pattern(pattern, heads):
    m = _load("sparse_transformer", impl="reference", stride=4, summary=3, pattern=pattern, heads=heads,
              H=5, Hkv=1)
    for causal in (False, True):
        for tq, tk in ((21, 21), (7, 23), (24, 24)):
            pat = _sparse_transformer_pattern(5, tq, tk, pattern, 4, 3, heads, causal)
            dense = tq * (tk - tq) + tq * (tq + 1) / 2 if causal else tq * tk
            assert m.cost(tq, tk, causal).density == pytest.approx(float(pat.sum()) / 5 / dense)


# ---- Routing Transformer -------------------------------------------------------------------
def _ln(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)


def _routing_members(x, mu, balanced):
    """[B, H, T, C] membership by nearest centroid or each centroid's top ceil(T/C), by loops."""
    B, H, T, _ = x.shape
    C = mu.shape[1]
    aff = torch.einsum("bhtd,hcd->bhtc", _ln(x), mu)
    mem = torch.zeros(B, H, T, C, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            if balanced:
                w = math.ceil(T / C)
                for c in range(C):
                    order = sorted(range(T), key=lambda t: -float(aff[b, h, t, c]))
                    for t in order[:w]:
                        mem[b, h, t, c] = True
            else:
                for t in range(T):
                    mem[b, h, t, int(aff[b, h, t].argmax())] = True
    return mem


@pytest.mark.parametrize("causal,balanced,C", [(False, True, 3), (True, True, 3), (False, False, 3),
                                                (True, False, 3), (True, True, 64), (False, False, 64)])
def test_routing_transformer_attends_within_clusters(causal, balanced, C):
    m = _load("routing_transformer", impl="reference", num_clusters=C, balanced=balanced)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=12, D=8)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, 9:] = False
    mu = m.centroids.detach()
    mq, mk = _routing_members(q, mu, balanced), _routing_members(_rep(k, 4), mu, balanced)
    shared = torch.zeros(2, 4, 12, 12, dtype=torch.bool)
    for i in range(12):
        for j in range(12):
            shared[:, :, i, j] = (mq[:, :, i] & mk[:, :, j]).any(-1)
    ref = _softmax_attention(q, k, v, shared & _causal_padding(2, 12, 12, causal, kpm))
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm), ref)
    assert (m.computed_keys(q, k, False) == shared).all()  # 64 clusters: two words of bits
    assert 0 < m.last_density < 0.9


def test_routing_transformer_local_window_adds_the_neighbours():
    m = _load("routing_transformer", impl="reference", num_clusters=4, balanced=False, local_window=2)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=10, D=8)
    keys = m.computed_keys(q, k, False)
    for i in range(10):
        for j in range(10):
            if abs(i - j) < 2:
                assert keys[0, :, i, j].all()


def test_routing_transformer_online_kmeans_step():
    m = _load("routing_transformer", impl="reference", num_clusters=2, balanced=False, decay=0.9).train()
    q, k, v = seeded_qkv(B=1, H=4, Hkv=4, T=16, D=8)
    q.requires_grad_(True)
    mu0 = m.centroids.clone()
    mq, mk = _routing_members(q.detach(), mu0, False), _routing_members(k, mu0, False)
    m(q, k, v, causal=False).sum().backward()
    for h in range(4):
        for c in range(2):
            iq = [t for t in range(16) if mq[0, h, t, c]]
            ik = [t for t in range(16) if mk[0, h, t, c]]
            if not iq or not ik:
                assert torch.equal(m.centroids[h, c], mu0[h, c])
                continue
            mean_q = torch.stack([_ln(q.detach()[0, h, t]) for t in iq]).mean(0)
            mean_k = torch.stack([_ln(k[0, h, t]) for t in ik]).mean(0)
            new = 0.9 * mu0[h, c] + 0.05 * (mean_q + mean_k)
            torch.testing.assert_close(m.centroids[h, c], new / new.norm())
    m.eval()
    mu1 = m.centroids.clone()
    m(q, k, v, causal=False)
    assert torch.equal(m.centroids, mu1)  # evaluation does not move the centroids


# ---- Scatterbrain --------------------------------------------------------------------------
def _scatterbrain_reference(m, q, k, v, causal, kpm=None):
    """Alg. 1 written out: A~_ij = exp(q.k/sqrt d) on the support (shared LSH bucket), else
    phi(q_i).phi(k_j) with phi(x) = exp(W x' - |x'|^2/2)/sqrt(m); o = A~ v / A~ 1."""
    B, H, tq, D = q.shape
    tk = k.shape[2]
    k, v = _rep(k, H), _rep(v, H)
    W, R = m.projection.double(), m.rotations.double()
    xq, xk = q * D ** -0.25, k * D ** -0.25
    phi_q = torch.exp(xq @ W.T - (xq ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
    phi_k = torch.exp(xk @ W.T - (xk ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])
    allowed = _causal_padding(B, tq, tk, causal, kpm)
    A = torch.zeros(B, H, tq, tk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            def bucket(x, r):
                p = x @ R[r, h]
                return int(torch.cat([p, -p]).argmax())
            for i in range(tq):
                for j in range(tk):
                    if m.sparse == "lsh":
                        same = any(bucket(q[b, h, i], r) == bucket(k[b, h, j], r) for r in range(R.shape[0]))
                    else:
                        same = abs(tk - tq + i - j) < m.local_window
                    if not allowed[b, 0, i, j]:
                        continue
                    A[b, h, i, j] = torch.exp(q[b, h, i] @ k[b, h, j] / math.sqrt(D)) if same \
                        else phi_q[b, h, i] @ phi_k[b, h, j]
    return (A @ v) / A.sum(-1, keepdim=True).clamp_min(1e-300)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparse", ["lsh", "local"])
def test_scatterbrain_is_exact_on_the_support_and_low_rank_elsewhere(causal, sparse):
    m = _load("scatterbrain", num_features=16, sparse=sparse, num_buckets=4, num_hashes=2, local_window=3)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=9, D=8, tk=11)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, 8:] = False
    out = m(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, _scatterbrain_reference(m, q, k, v, causal, kpm))


def test_scatterbrain_with_everything_in_the_support_is_softmax_and_with_little_is_the_performer():
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=10, D=8)
    m = _load("scatterbrain", sparse="local", local_window=100, num_features=8)
    for causal in (False, True):
        torch.testing.assert_close(m(q, k, v, causal=causal), _softmax_attention(q, k, v, _causal_padding(
            1, 10, 10, causal)))
    # the error of the combined estimate is below that of its low-rank part alone (local support)
    m = _load("scatterbrain", sparse="local", local_window=3, num_features=8)
    p = _load("performer", impl="reference", num_features=8)
    p.projection.copy_(m.projection)
    exact = _softmax_attention(q, k, v, _causal_padding(1, 10, 10, False))
    assert (m(q, k, v) - exact).norm() < (p(q, k, v) - exact).norm()


def test_scatterbrain_large_scores_stay_finite():
    m = _load("scatterbrain", num_features=16, num_buckets=2)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=8, D=8)
    out = m(q * 30, k * 30, v, causal=True)
    assert torch.isfinite(out).all()


# ---- BiFormer ------------------------------------------------------------------------------
def _biformer_layout(q, k, r, topk, shared, kpm=None):
    """Region means (of the real keys), affinity (summed over heads when shared), top-k, by loops."""
    B, H, T, _ = q.shape
    k = _rep(k, H)
    n = math.ceil(T / r)
    lay = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        real = torch.ones(T, dtype=torch.bool) if kpm is None else kpm[b]
        A = torch.zeros(H, n, n, dtype=torch.float64)
        ok = [bool(real[a * r:(a + 1) * r].any()) for a in range(n)]
        for h in range(H):
            for a in range(n):
                qa = q[b, h, a * r:(a + 1) * r].mean(0)
                for c in range(n):
                    keys = [t for t in range(c * r, min(T, (c + 1) * r)) if real[t]]
                    A[h, a, c] = qa @ k[b, h, keys].mean(0) if keys else -float("inf")
        if shared:
            A = A.sum(0, keepdim=True).expand(H, n, n)
        for h in range(H):
            for a in range(n):
                order = sorted(range(n), key=lambda c: -float(A[h, a, c]))
                for c in order[:topk]:
                    lay[b, h, a, c] = ok[c]
    return lay


@pytest.mark.parametrize("shared", [True, False])
def test_biformer_attends_the_routed_regions(shared):
    m = _load("biformer", impl="reference", region_size=4, topk=2, shared_routing=shared)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=18, D=8)
    kpm = torch.ones(2, 18, dtype=torch.bool)
    kpm[1, 11:] = False
    lay = _biformer_layout(q, k, 4, 2, shared, kpm)
    allowed = torch.zeros(2, 4, 18, 18, dtype=torch.bool)
    for i in range(18):
        for j in range(18):
            allowed[:, :, i, j] = lay[:, :, i // 4, j // 4]
    ref = _softmax_attention(q, k, v, allowed & _causal_padding(2, 18, 18, False, kpm))
    torch.testing.assert_close(m(q, k, v, key_padding_mask=kpm), ref)
    assert m.last_density < 0.6


def test_biformer_with_every_region_is_exact_and_causal_is_refused():
    m = _load("biformer", impl="reference", region_size=4, topk=5)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=17, D=8)
    torch.testing.assert_close(m(q, k, v), _softmax_attention(q, k, v, _causal_padding(1, 17, 17, False)))
    with pytest.raises(AttentionInputError, match="causal"):
        m(q, k, v, causal=True)


@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_biformer_kernels_equal_the_reference(impl):
    kw = dict(H=2, Hkv=1, D=16, region_size=16, topk=2)
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=64, D=16, dtype=torch.float32)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[0, 50:] = False
    ref = _load("biformer", impl="reference", **kw).float()(q, k, v, key_padding_mask=kpm)
    m = _load("biformer", impl=impl, **kw).float()
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, key_padding_mask=kpm), ref, atol=2e-5, rtol=2e-5)
    assert m.last_path == impl


# ---- SEA -----------------------------------------------------------------------------------
def _sea_mask(m, q, k, causal, kpm=None):
    """Block means of the real keys, the Performer estimate phi(q).phi(K^) by its formula, each
    row's top-k candidate blocks by sorting (causal: whole past blocks, plus the own block)."""
    B, H, tq, D = q.shape
    tk, b, top = k.shape[2], m.block_size, m.top_k_blocks
    k = _rep(k, H)
    W = m.estimator.projection.double()
    phi = lambda x: torch.exp(x @ W.T * D ** -0.25 - (x ** 2).sum(-1) / 2 / math.sqrt(D))  # noqa: E731
    n = math.ceil(tk / b)
    allowed = torch.zeros(B, H, tq, tk, dtype=torch.bool)
    for bi in range(B):
        real = torch.ones(tk, dtype=torch.bool) if kpm is None else kpm[bi]
        for h in range(H):
            kc = [k[bi, h, [j for j in range(c * b, min(tk, (c + 1) * b)) if real[j]]] for c in range(n)]
            for i in range(tq):
                p = tk - tq + i
                cands = [c for c in range(n) if len(kc[c]) and (not causal or (c + 1) * b - 1 <= p)]
                est = {c: float(phi(q[bi, h, i]) @ phi(kc[c].mean(0))) for c in cands}
                chosen = sorted(cands, key=lambda c: -est[c])[:top] + ([p // b] if causal else [])
                for c in chosen:
                    allowed[bi, h, i, c * b:(c + 1) * b] = True
    return allowed


@pytest.mark.parametrize("causal", [False, True])
def test_sea_attends_the_top_blocks_of_its_estimate(causal):
    m = _load("sea", impl="reference", block_size=3, top_k_blocks=2, num_features=16)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=13, D=8, tk=16)
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[1, 10:] = False
    allowed = _sea_mask(m, q, k, causal, kpm)
    ref = _softmax_attention(q, k, v, allowed & _causal_padding(2, 13, 16, causal, kpm))
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm), ref)
    assert m.last_density < 0.8


def test_sea_with_every_block_is_exact():
    m = _load("sea", impl="reference", block_size=4, top_k_blocks=4, num_features=8)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=16, D=8)
    for causal in (False, True):
        torch.testing.assert_close(m(q, k, v, causal=causal),
                                   _softmax_attention(q, k, v, _causal_padding(1, 16, 16, causal)))


# ---- all of them ---------------------------------------------------------------------------
SMALL = {"sparse_transformer": dict(impl="reference", stride=3),
         "routing_transformer": dict(impl="reference", num_clusters=3, balanced=False),
         "scatterbrain": dict(num_features=8, num_buckets=4),
         "biformer": dict(impl="reference", region_size=4, topk=2),
         "sea": dict(impl="reference", block_size=3, top_k_blocks=2, num_features=8)}


@pytest.mark.parametrize("name", NEW)
def test_gqa_equals_repeated_kv_heads(name):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=12, D=8)
    grouped, full = _load(name, Hkv=2, **SMALL[name]), _load(name, Hkv=4, **SMALL[name])
    causal = name != "biformer"
    torch.testing.assert_close(grouped(q, k, v, causal=causal), full(q, _rep(k, 4), _rep(v, 4), causal=causal))


@pytest.mark.parametrize("name", NEW)
def test_padded_keys_do_not_matter(name):
    m = _load(name, **SMALL[name])
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=12, D=8)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, 7:] = False
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 7:] = 50.0
    v2[1, :, 7:] = -9.0
    for causal in ([False] if name == "biformer" else [False, True]):
        torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm),
                                   m(q, k2, v2, causal=causal, key_padding_mask=kpm))


@pytest.mark.parametrize("name", ["sparse_transformer", "routing_transformer", "scatterbrain", "sea"])
def test_decode_is_the_last_row_of_the_prefill(name):
    m = _load(name, **SMALL[name])
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=10, D=8)
    full = m(q, k, v, causal=True)
    for t in range(1, 11):
        step = m.decode(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t])
        torch.testing.assert_close(step[:, :, 0], full[:, :, t - 1])


@pytest.mark.parametrize("name,kw,match", [
    ("sparse_transformer", dict(pattern="diagonal"), "pattern"),
    ("sparse_transformer", dict(stride=0), "stride"),
    ("sparse_transformer", dict(pattern="fixed", stride=4, summary=5), "summary"),
    ("sparse_transformer", dict(heads="mixed"), "heads"),
    ("routing_transformer", dict(num_clusters=0), "num_clusters"),
    ("routing_transformer", dict(decay=1.0), "decay"),
    ("routing_transformer", dict(local_window=-1), "local_window"),
    ("scatterbrain", dict(sparse="random"), "sparse"),
    ("scatterbrain", dict(num_buckets=3), "num_buckets"),
    ("scatterbrain", dict(num_features=0), "num_features"),
    ("scatterbrain", dict(num_hashes=0), "num_hashes"),
    ("biformer", dict(topk=0), "topk"),
    ("biformer", dict(region_size=0), "region_size"),
    ("sea", dict(top_k_blocks=0), "top_k_blocks"),
    ("sea", dict(block_size=0), "block_size"),
    ("sea", dict(num_features=0), "num_features"),
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        _load(name, **kw)
