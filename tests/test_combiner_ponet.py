"""Combiner-Fixed and PoNet (issue 26), each against an independent computation written here:
Combiner's factorized attention matrix built entry by entry from the paper's equations, its
attention matrix read back from the method (v = identity: full attention, every visible key a
positive weight), a port of the official sqrt_fixed_full; PoNet's three poolings written as
loops over tokens and a port of the official LRA PoNetAttention on the official projections."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from tests.conftest import seeded_qkv


def _load(name, H=2, Hkv=1, D=3, **kw):
    return methods.load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, **kw).double()


# ---- Combiner --------------------------------------------------------------------------------
def combiner_matrix(q, k, s, causal, regions="all", pooling="max", real=None):
    """[T, T] attention matrix of one head, entry by entry (q, k: [T, D]; real: [T] bool)."""
    T, D = q.shape
    real = [True] * T if real is None else real.tolist()
    q = q / math.sqrt(D)
    spans = [list(range(a, min(a + s, T))) for a in range(0, T, s)]

    def pool(x, idx):
        rows = torch.stack([x[j] for j in idx])
        return rows.max(0).values if pooling == "max" else rows.mean(0)

    A = torch.zeros(T, T, dtype=q.dtype)
    for i in range(T):
        a = i // s
        direct = [j for j in spans[a] if real[j] and (not causal or j <= i)]
        regs = []
        for r, idx in enumerate(spans):
            idx = [j for j in idx if real[j]]
            if not idx or (causal and r >= a) or (not causal and regions == "others" and r == a):
                continue
            kr, qr = pool(k, idx), pool(q, idx)
            inner = torch.tensor([float(qr @ k[j]) for j in idx], dtype=q.dtype)
            regs.append((float(q[i] @ kr), idx, torch.softmax(inner, 0)))
        z = sum(math.exp(float(q[i] @ k[j])) for j in direct) + sum(math.exp(lg) for lg, _, _ in regs)
        for j in direct:
            A[i, j] += math.exp(float(q[i] @ k[j])) / z
        for lg, idx, w in regs:
            for j, wj in zip(idx, w):
                A[i, j] += math.exp(lg) / z * float(wj)
    return A


@pytest.mark.parametrize("causal,regions", [(True, "all"), (False, "all"), (False, "others")])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_combiner_equals_its_factorized_matrix_written_out(causal, regions, pooling):
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=10, D=3)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 4] = kpm[1, 8:] = False  # a padded key inside a span, and a last span of padding only
    m = _load("combiner", span_len=4, pooling=pooling, noncausal_regions=regions)
    out = m(q, k, v, causal=causal, key_padding_mask=kpm)
    for b in range(2):
        for h in range(2):
            A = combiner_matrix(q[b, h], k[b, 0], 4, causal, regions, pooling, kpm[b])
            torch.testing.assert_close(out[b, h], A @ v[b, 0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_combiner_is_full_attention(causal):
    """v = identity reads the method's attention matrix: rows sum to 1, every visible key has a
    positive weight (direct or through its region), every invisible one none."""
    T = 11
    q, k, _ = seeded_qkv(B=1, H=2, Hkv=2, T=T, D=T)
    v = torch.eye(T, dtype=torch.float64).expand(1, 2, T, T)
    A = _load("combiner", H=2, Hkv=2, D=T, span_len=3)(q, k, v, causal=causal)
    visible = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 2, T, dtype=torch.float64))
    assert (A[..., visible] > 1e-6).all() and (A[..., ~visible] == 0).all()


@pytest.mark.parametrize("causal,regions", [(True, "all"), (False, "others")])
def test_combiner_with_one_span_is_softmax_attention(causal, regions):
    q, k, v = seeded_qkv(B=2, H=2, Hkv=1, T=9, D=3)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(3)
    if causal:
        s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    want = torch.softmax(s, -1) @ v
    for span in (9, 64):
        got = _load("combiner", span_len=span, noncausal_regions=regions)(q, k, v, causal=causal)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def official_sqrt_fixed_full(q, k, v, s, causal):
    """google-research/combiner tf/approx_attention.py ``sqrt_fixed_full`` after its projections
    (local_summary identity-max), ported to torch: q, k, v [B, T, N, K], T a multiple of s."""
    B, T, N, K = q.shape
    n = T // s
    q = q * K ** -0.5
    cq, ck, cv = (t.reshape(B, n, s, N, K) for t in (q, k, v))
    merged_q = cq.max(2, keepdim=True).values  # [B, n, 1, N, K]
    logits = torch.einsum("bsqhd,bskhd->bsqhk", merged_q, ck)  # attention along the span axis
    span_val = torch.einsum("bsqhk,bskhd->bsqhd", torch.softmax(logits, -1), cv).squeeze(2)
    span_key = ck.max(2).values  # [B, n, N, K]
    local = torch.einsum("bsqhd,bskhd->bsqhk", cq, ck)
    if causal:
        local = local + (-1e9 * (1 - torch.ones(s, s).tril()))[:, None, :]
    prev = torch.einsum("bqhd,bkhd->bqhk", q, span_key)
    if causal:
        mask = -1e9 * (1 - torch.ones(n, n).tril(-1))  # strictly earlier spans
        prev = prev + mask.repeat_interleave(s, 0)[:, None, :]
    joint = torch.cat([local.reshape(B, T, N, s), prev], -1)
    w = torch.softmax(joint, -1)
    local_att = w[..., :s].reshape(B, n, s, N, s)
    out = torch.einsum("bsqhk,bskhd->bsqhd", local_att, cv).reshape(B, T, N, K)
    return out + torch.einsum("bqhk,bkhd->bqhd", w[..., s:], span_val)


@pytest.mark.parametrize("causal", [False, True])
def test_combiner_matches_the_official_code(causal):
    q, k, v = seeded_qkv(B=2, H=3, Hkv=3, T=12, D=5)
    want = official_sqrt_fixed_full(*(t.transpose(1, 2) for t in (q, k, v)), 4, causal).transpose(1, 2)
    got = _load("combiner", H=3, Hkv=3, D=5, span_len=4)(q, k, v, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_combiner_sqrt_span_and_cost():
    m = _load("combiner", span_len=None)
    assert m.span(100) == 10 and m.span(101) == 11
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=16, D=3)
    torch.testing.assert_close(m(q, k, v, causal=True), _load("combiner", span_len=4)(q, k, v, causal=True))
    big = methods.load("combiner", num_heads=8, head_dim=64)
    for causal in (False, True):
        c = big.cost(8192, 8192, causal)
        assert 0 < c.density < 0.1 and c.flops > 0  # T (s + T / s) scores instead of T^2


def test_combiner_refuses_a_cache_longer_than_the_queries_and_bad_settings():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=3, D=3, tk=9)
    with pytest.raises(AttentionInputError, match="Tq == Tk"):
        _load("combiner")(q, k, v, causal=True)
    for kw, match in ((dict(span_len=0), "span_len"), (dict(pooling="min"), "pooling"),
                      (dict(noncausal_regions="some"), "noncausal_regions")):
        with pytest.raises(ValueError, match=match):
            methods.load("combiner", **kw)


# ---- PoNet -----------------------------------------------------------------------------------
def ponet_written_out(q, k, v, Ws, bs, Wl, bl, seg_len, window, real):
    """PoNet for one batch element by loops over tokens: q, k, v [H, T, D], real [T] bool."""
    H, T, D = q.shape
    idx = [j for j in range(T) if real[j]]
    x = v.transpose(0, 1).reshape(T, H * D)
    S, L = x @ Ws.T + bs, x @ Wl.T + bl
    out = torch.zeros_like(q)
    for h in range(H):
        g_bar = sum(q[h, j] for j in idx) / len(idx)
        w = torch.softmax(torch.stack([g_bar @ k[h, j] / math.sqrt(D) for j in idx]), 0)
        g = sum(wj * k[h, j] for wj, j in zip(w, idx))
        cols = slice(h * D, (h + 1) * D)
        for i in idx:
            seg = [j for j in idx if j // seg_len == i // seg_len]
            loc = [j for j in idx if abs(j - i) <= window // 2]
            s_i = torch.stack([S[j, cols] for j in seg]).max(0).values
            l_i = torch.stack([L[j, cols] for j in loc]).max(0).values
            out[h, i] = (g + s_i) * v[h, i] + l_i
    return out


@pytest.mark.parametrize("segment_num,window", [(3, 3), (1, 5), (64, 3)])
def test_ponet_equals_its_poolings_written_out(segment_num, window):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=10, D=3)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 3] = kpm[1, 8:] = False
    m = _load("ponet", H=4, Hkv=2, D=3, segment_num=segment_num, local_window=window)
    out = m(q, k, v, causal=False, key_padding_mask=kpm)
    vr = v.repeat_interleave(2, 1)
    kr = k.repeat_interleave(2, 1)
    for b in range(2):
        want = ponet_written_out(q[b], kr[b], vr[b], m.segment.weight, m.segment.bias, m.local.weight,
                                 m.local.bias, 10 // segment_num + 1, window, kpm[b])
        torch.testing.assert_close(out[b], want, rtol=1e-10, atol=1e-10)
    assert (out[1, :, 3] == 0).all() and (out[1, :, 8:] == 0).all()  # padded tokens: zero


def official_ponet(X, Q, K, O, local, segment, mask, segment_num):
    """lxchtan/PoNet examples/LRA/code/attention_ponet.py PoNetAttention.forward, in torch
    (scatter_max as scatter_reduce amax): Q, K, O [B, H, T, D]; local, segment [B, T, H*D];
    mask [B, T] float, 1 = real token."""
    B, H, T, D = Q.shape
    Q, local, segment = Q.clone(), local.clone(), segment.clone()
    pad = mask[:, None, :, None] < 0.5
    Q.masked_fill_(pad, 0.0)
    q = Q.sum(-2) / torch.ones_like(pad).to(Q.dtype).masked_fill(pad, 0.0).sum(-2)
    att = torch.einsum("bdh,bdlh->bdl", q, K) / math.sqrt(D)
    att.masked_fill_(pad.squeeze(-1), -10000)
    vg = torch.einsum("bdlh,bdl->bdh", K, att.softmax(-1))
    pad = pad.squeeze(1)
    segment.masked_fill_(pad, -10000)
    local.masked_fill_(pad, -10000)
    local = torch.nn.MaxPool1d(3, stride=1, padding=1)(local.permute(0, 2, 1)).permute(0, 2, 1)
    seg_len = T // segment_num + 1
    index = torch.arange(segment_num).view(1, -1, 1).repeat(1, 1, seg_len).view(1, -1)[:, :T].repeat(B, 1)
    idx = index.unsqueeze(-1).expand_as(segment)
    seg = torch.zeros_like(segment).scatter_reduce(1, idx, segment, reduce="amax", include_self=False)
    segment = torch.gather(seg, 1, idx)
    local = local.view(B, T, H, D).permute(0, 2, 1, 3)
    segment = segment.view(B, T, H, D).permute(0, 2, 1, 3)
    out = (vg.unsqueeze(-2) + segment) * O + local
    return out.masked_fill(pad[:, None], 0.0)


def test_ponet_matches_the_official_code():
    """The official layer on its own projections of X (Q, K, O = W_v X, local = W_l X, segment =
    W_s X) equals the method given q, k, v = W_q X, W_k X, W_v X and S, L = W_s W_v^-1, W_l W_v^-1."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 13, 2, 4
    dim = H * D
    X = torch.randn(B, T, dim, generator=g, dtype=torch.float64)
    Wq, Wk, Wv, Wl, Ws = (torch.randn(dim, dim, generator=g, dtype=torch.float64) / 3 for _ in range(5))
    bl, bs = (torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 9:] = 0

    def heads(W):
        return (X @ W.T).view(B, T, H, D).transpose(1, 2)

    want = official_ponet(X, heads(Wq), heads(Wk), heads(Wv), X @ Wl.T + bl, X @ Ws.T + bs, mask, 4)
    m = _load("ponet", H=H, Hkv=H, D=D, segment_num=4)
    with torch.no_grad():
        inv = torch.linalg.inv(Wv.T)  # x_v = X Wv^T, so X W^T = x_v (Wv^T)^-1 W^T
        m.segment.weight.copy_((inv @ Ws.T).T)
        m.local.weight.copy_((inv @ Wl.T).T)
        m.segment.bias.copy_(bs)
        m.local.bias.copy_(bl)
    got = m(heads(Wq), heads(Wk), heads(Wv), causal=False, key_padding_mask=mask > 0.5)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_ponet_refuses_causal_and_unequal_lengths_and_bad_settings():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=5, D=3)
    with pytest.raises(AttentionInputError, match="PoNet is not causal"):
        _load("ponet")(q, k, v, causal=True)
    q2, k2, v2 = seeded_qkv(B=1, H=2, Hkv=1, T=3, D=3, tk=5)
    with pytest.raises(AttentionInputError, match="Tq == Tk"):
        _load("ponet")(q2, k2, v2)
    with pytest.raises(AttentionInputError, match="head_dim=3"):
        _load("ponet")(*seeded_qkv(B=1, H=2, Hkv=1, T=5, D=4))
    for kw, match in ((dict(segment_num=0), "segment_num"), (dict(local_window=4), "odd"),
                      (dict(local_window=0), "local_window")):
        with pytest.raises(ValueError, match=match):
            methods.load("ponet", **kw)


def test_ponet_trains_its_maps_and_costs_linear_work():
    m = _load("ponet", H=2, Hkv=1, D=3)
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=2, Hkv=1, T=7, D=3))
    m(q, k, v).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(t.grad.abs().sum() > 0 for t in (q, k, v))
    big = methods.load("ponet", num_heads=2, head_dim=32)
    assert big.cost(16384, 16384, False).density < 0.05 < big.cost(256, 256, False).density
