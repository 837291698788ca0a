"""Linear, kernelized and sparse-normaliser attention (issue 26, first part): ReLA, entmax,
Cottention, BASED and Lightning / TransNormer NormAttention, each against an independent
computation written here from the paper's equations (explicit attention matrices, loops over
positions, entmax's closed form and a bisection), causal and non-causal, recurrent == parallel
at every position, GQA == repeated KV heads, padding, and bad hyperparameters."""
import itertools
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from tests.conftest import seeded_qkv

NEW = ["rela", "entmax", "cottention", "based", "lightning"]
FAST = {"cottention": "chunked", "based": "chunked", "lightning": "lightning"}  # the O(T) impls


def _load(name, H=4, Hkv=2, D=8, **kw):
    return methods.load(name, num_heads=H, num_kv_heads=Hkv, head_dim=D, max_seq_len=256, **kw).double()


def _allowed(tq, tk, causal, kpm=None, B=1):
    """[B, 1, Tq, Tk] bool: end-aligned causal and padding, by explicit loops' definition."""
    m = torch.ones(B, 1, tq, tk, dtype=torch.bool)
    if causal:
        for i in range(tq):
            m[:, :, i, tk - tq + i + 1:] = False
    if kpm is not None:
        m &= kpm[:, None, None, :]
    return m


def _rep(x, H):
    return x.repeat_interleave(H // x.shape[1], dim=1)


def _rms_heads(o, gain, gate=None, eps=1e-8):
    """The (gated) RMSNorm of the concatenated heads, written out: o [B, H, T, d]."""
    B, H, T, D = o.shape
    x = o.permute(0, 2, 1, 3).reshape(B, T, H * D)
    y = gain * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
    if gate is not None:
        y = y / (1 + torch.exp(-gate * x))
    return y.reshape(B, T, H, D).permute(0, 2, 1, 3)


# ---- ReLA --------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("norm", ["gated_rms", "rms", "none"])
def test_rela_matches_relu_attention_with_gated_rmsnorm(causal, norm):
    m = _load("rela", norm=norm)
    if norm != "none":
        with torch.no_grad():
            m.gain.uniform_(0.5, 1.5)  # not the initial ones: the gain must enter
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=11, D=8)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, 7:] = False
    out = m(q, k, v, causal=causal, key_padding_mask=kpm)
    a = torch.einsum("bhid,bhjd->bhij", q, _rep(k, 4)) / math.sqrt(8)
    a = torch.where(_allowed(11, 11, causal, kpm, B=2), torch.clamp(a, min=0), torch.zeros_like(a))
    o = torch.einsum("bhij,bhjd->bhid", a, _rep(v, 4))
    if norm != "none":
        o = _rms_heads(o, m.gain.detach(), m.gate.detach() if norm == "gated_rms" else None)
    torch.testing.assert_close(out, o)
    assert (a == 0).float().mean() > 0.3  # ReLU's zeros: sparse weights
    assert (m.weights(q, k, causal, kpm) == a).all()


def test_rela_decode_is_the_last_row_of_the_prefill():
    m = _load("rela")
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=9, D=8)
    full = m(q, k, v, causal=True)
    for t in range(1, 10):
        step = m.decode(q[:, :, t - 1:t], k[:, :, :t], v[:, :, :t])
        torch.testing.assert_close(step[:, :, 0], full[:, :, t - 1])


# ---- entmax ------------------------------------------------------------------------------
def _entmax15_sorted(z):
    """1.5-entmax of each row by Peters et al. 2019, Alg. 2 (sort, then the closed-form tau)."""
    out = torch.zeros_like(z)
    for idx in itertools.product(*map(range, z.shape[:-1])):
        x = z[idx] / 2
        xs = torch.sort(x, descending=True).values
        best = None
        for rho in range(1, len(xs) + 1):
            mean = xs[:rho].mean()
            ss = ((xs[:rho] - mean) ** 2).sum()
            tau = mean - torch.sqrt(torch.clamp((1 - ss) / rho, min=0))
            if tau <= xs[rho - 1]:
                best = tau
        out[idx] = torch.clamp(x - best, min=0) ** 2
    return out


def _sparsemax_sorted(z):
    """Sparsemax (alpha = 2) of each row by Martins and Astudillo 2016's closed form."""
    zs = torch.sort(z, dim=-1, descending=True).values
    rho = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    k = ((1 + rho * zs) > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, k - 1) - 1) / k
    return torch.clamp(z - tau, min=0)


def _entmax_bisect(z, alpha, iters=200):
    """alpha-entmax of each row: tau by bisection on sum [(alpha-1) z - tau]_+^(1/(alpha-1)) = 1."""
    x = (alpha - 1) * z
    lo = x.amax(-1, keepdim=True) - 1
    hi = x.amax(-1, keepdim=True)
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = (torch.clamp(x - mid, min=0) ** (1 / (alpha - 1))).sum(-1, keepdim=True) - 1
        lo, hi = torch.where(f > 0, mid, lo), torch.where(f > 0, hi, mid)
    p = torch.clamp(x - (lo + hi) / 2, min=0) ** (1 / (alpha - 1))
    return p / p.sum(-1, keepdim=True)


def _entmax_reference(q, k, v, causal, kpm, fn):
    H = q.shape[1]
    s = torch.einsum("bhid,bhjd->bhij", q, _rep(k, H)) / math.sqrt(q.shape[-1])
    allowed = _allowed(q.shape[2], k.shape[2], causal, kpm, B=q.shape[0]).expand_as(s)
    p = torch.zeros_like(s)
    for idx in itertools.product(*map(range, s.shape[:-1])):  # each row over its allowed keys only
        keep = allowed[idx]
        if keep.any():
            p[idx + (keep,)] = fn(s[idx][keep][None])[0]
    return torch.einsum("bhij,bhjd->bhid", p, _rep(v, H)), p


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("alpha,fn", [(1.5, _entmax15_sorted), (2.0, _sparsemax_sorted),
                                      (1.3, lambda z: _entmax_bisect(z, 1.3))])
def test_entmax_matches_its_closed_form_and_is_sparse(causal, alpha, fn):
    m = _load("entmax", alpha=alpha, n_iter=60)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=10, D=8)
    q = q * 3  # peaked scores: entmax leaves many keys at exactly zero
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 6:] = False
    ref, p = _entmax_reference(q, k, v, causal, kpm, fn)
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm), ref, atol=1e-6, rtol=1e-5)
    w = m.weights(q, k, causal, kpm)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    allowed = _allowed(10, 10, causal, kpm, B=2).expand_as(w)
    assert (w[~allowed] == 0).all()
    assert ((w == 0) & allowed).sum() > 0.2 * allowed.sum()  # exact zeros among allowed keys
    assert ((p == 0) == (w == 0)).float().mean() > 0.99  # the same supports


def test_entmax_rows_without_keys_give_zeros_and_decode_is_the_last_row():
    m = _load("entmax")
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=6, D=8)
    kpm = torch.zeros(1, 6, dtype=torch.bool)
    assert (m(q, k, v, key_padding_mask=kpm) == 0).all()
    full = m(q, k, v, causal=True)
    torch.testing.assert_close(m.decode(q[:, :, -1:], k, v)[:, :, 0], full[:, :, -1])


def test_entmax_gradients_flow_through_the_package():
    m = _load("entmax")
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=4, Hkv=2, T=7, D=8))
    m(q, k, v, causal=True).square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))


# ---- Cottention --------------------------------------------------------------------------
def _cottention_reference(q, k, v, causal, kpm, exponent, length_scale):
    """(Q^ K^^T (.) M) V with the value (or output) divided by max(1, count^sigma), written out."""
    B, H, T, D = q.shape
    tk = k.shape[2]
    k, v = _rep(k, H), _rep(v, H)
    qn = q / torch.sqrt((q ** 2).sum(-1, keepdim=True))
    kn = k / torch.sqrt((k ** 2).sum(-1, keepdim=True))
    real = torch.ones(B, tk) if kpm is None else kpm.double()
    allowed = _allowed(T, tk, causal, kpm, B=B)
    a = torch.einsum("bhid,bhjd->bhij", qn, kn) * allowed
    count = torch.zeros(B, tk, dtype=torch.float64)
    for b in range(B):
        for j in range(tk):
            count[b, j] = real[b, :j + 1].sum() if causal else real[b].sum()
    div = torch.clamp(count[:, None, :, None] ** exponent.view(1, H, 1, 1), min=1)  # [B, H, Tk, 1]
    if length_scale == "value":
        return torch.einsum("bhij,bhjd->bhid", a, v / div)
    o = torch.einsum("bhij,bhjd->bhid", a, v)
    return o / div[:, :, tk - T:] if length_scale == "output" else o


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length_scale", ["value", "output", "none"])
def test_cottention_matches_cosine_attention_written_out(impl, causal, length_scale):
    m = _load("cottention", impl=impl, length_scale=length_scale, chunk_size=4)
    with torch.no_grad():
        m.norm_const.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=11, D=8)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, 3] = kpm[1, 8:] = False
    ref = _cottention_reference(q, k, v, causal, kpm, torch.sigmoid(m.norm_const.detach()), length_scale)
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm), ref)


# ---- BASED -------------------------------------------------------------------------------
def _based_reference(q, k, v, causal, kpm, window):
    """Taylor linear attention (1 + s + s^2/2, row-normalised) and a softmax window, written out."""
    B, H, T, D = q.shape
    k, v = _rep(k, H), _rep(v, H)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    allowed = _allowed(T, T, causal, kpm, B=B)
    a = (1 + s + s ** 2 / 2) * allowed
    y = torch.einsum("bhij,bhjd->bhid", a / a.sum(-1, keepdim=True), v)
    if not window:
        return y
    near = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            near[i, j] = 0 <= i - j < window if causal else abs(i - j) < window
    p = torch.exp(s).masked_fill(~(allowed & near), 0)
    w = torch.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdim=True), v)
    return (y + w) / 2


def test_based_taylor_features_give_the_second_order_exponential():
    from methods.based import taylor_features

    x, y = torch.randn(2, 5, 16, dtype=torch.float64).unbind(0)
    s = (x * y).sum(-1) / 4
    torch.testing.assert_close((taylor_features(x) * taylor_features(y)).sum(-1), 1 + s + s ** 2 / 2)
    assert taylor_features(x).shape[-1] == 1 + 16 + 256


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 3])
def test_based_matches_taylor_attention_and_window_written_out(impl, causal, window):
    m = _load("based", impl=impl, window=window, chunk_size=4)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=11, D=8)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[0, 2] = kpm[0, 9:] = False
    torch.testing.assert_close(m(q, k, v, causal=causal, key_padding_mask=kpm),
                               _based_reference(q, k, v, causal, kpm, window))


# ---- Lightning / TransNormer ----------------------------------------------------------------
def test_lightning_slopes_are_alibis():
    from methods.lightning import alibi_slopes

    assert alibi_slopes(4) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    assert alibi_slopes(6) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]  # ALiBi's interleave


def _lightning_reference(q, k, v, causal, phi, lam, norm):
    """Norm((phi(Q) phi(K)^T (.) M) V), M_ts = lam_h^(t-s), with SRMSNorm, written out."""
    B, H, T, D = q.shape
    fq, fk, v = phi(q), phi(_rep(k, H)), _rep(v, H)
    a = torch.einsum("bhid,bhjd->bhij", fq, fk)
    if causal:
        m = torch.zeros(H, T, T, dtype=torch.float64)
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    m[h, i, j] = lam[h] ** (i - j)
        a = a * m
    o = torch.einsum("bhij,bhjd->bhid", a, v)
    if norm == "heads":
        x = o.permute(0, 2, 1, 3).reshape(B, T, H * D)
        x = x / torch.sqrt((x ** 2).sum(-1, keepdim=True) / (H * D) + 1e-6)
        return x.reshape(B, T, H, D).permute(0, 2, 1, 3)
    if norm == "head":
        return o / torch.sqrt((o ** 2).sum(-1, keepdim=True) / D + 1e-6)
    return o


PHI = {"silu": lambda x: x / (1 + torch.exp(-x)), "1+elu": lambda x: torch.where(x > 0, 1 + x, torch.exp(x)),
       "relu": lambda x: torch.clamp(x, min=0), "identity": lambda x: x}


@pytest.mark.parametrize("impl", ["reference", "lightning"])
@pytest.mark.parametrize("causal,decay", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("activation,norm", [("silu", "heads"), ("1+elu", "head"), ("relu", "none")])
def test_lightning_matches_norm_attention_written_out(impl, causal, decay, activation, norm):
    m = _load("lightning", impl=impl, decay=decay, activation=activation, norm=norm, block_size=4,
              layer_idx=1, num_layers=3)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=11, D=8)
    lam = [math.exp(-(2 ** (-2 * (h + 1))) * (1 - 1 / 2 + 1e-5)) if decay else 1.0 for h in range(4)]
    ref = _lightning_reference(q, k, v, causal, PHI[activation], lam, norm)
    torch.testing.assert_close(m(q, k, v, causal=causal), ref)


def test_lightning_decay_is_causal_only():
    m = _load("lightning", decay=True)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=5, D=8)
    with pytest.raises(AttentionInputError, match="causal only"):
        m(q, k, v, causal=False)


# ---- recurrent == parallel ------------------------------------------------------------------
RECURRENT = [("cottention", {"length_scale": "value"}), ("cottention", {"length_scale": "output"}),
             ("cottention", {"length_scale": "none"}), ("based", {"window": 0}), ("based", {"window": 3}),
             ("lightning", {"decay": False}), ("lightning", {"decay": True, "norm": "head"})]


@pytest.mark.parametrize("name,kw", RECURRENT)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_recurrent_form_equals_the_parallel_form_at_every_position(name, kw, impl):
    if impl == "fast":  # blocks of 3: the state crosses block boundaries
        kw = {**kw, ("block_size" if name == "lightning" else "chunk_size"): 3}
    m = _load(name, impl=FAST[name] if impl == "fast" else impl, **kw)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=10, D=8)
    par = m(q, k, v, causal=True)
    torch.testing.assert_close(m.recurrent(q, k, v), par)
    state = None
    for t in range(10):  # step by step, as a decoder runs it
        o, state = m.step(state, q[:, :, t], k[:, :, t], v[:, :, t])
        torch.testing.assert_close(o, par[:, :, t])
        torch.testing.assert_close(m.decode(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])[:, :, 0], o)


# ---- every new method ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv_heads(name, causal):
    m = _load(name)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=13, D=8)
    full = methods.load(name, num_heads=4, num_kv_heads=4, head_dim=8, max_seq_len=256).double()
    full.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(q, k, v, causal=causal), full(q, _rep(k, 4), _rep(v, 4), causal=causal))


@pytest.mark.parametrize("name", NEW)
def test_padded_keys_change_nothing(name):
    """Keys masked out give the output of the sequence without them (non-causal; causal: the
    padding at the end is in no real query's past)."""
    m = _load(name)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=12, D=8)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, 9:] = False
    for causal in (False, True):
        out = m(q, k, v, causal=causal, key_padding_mask=kpm)
        short = m(q[:, :, :9], k[:, :, :9], v[:, :, :9], causal=causal)
        torch.testing.assert_close(out[:, :, :9], short)
        garbage = k.clone()
        garbage[:, :, 9:] = 1e3
        torch.testing.assert_close(m(q, garbage, v, causal=causal, key_padding_mask=kpm), out)


@pytest.mark.parametrize("name,kw,match", [
    ("rela", {"norm": "layer"}, "norm must be one of"),
    ("entmax", {"alpha": 1.0}, "alpha must be a finite number > 1"),
    ("entmax", {"alpha": float("nan")}, "alpha must be"),
    ("entmax", {"n_iter": 0}, "n_iter"),
    ("cottention", {"length_scale": "sequence"}, "length_scale must be one of"),
    ("cottention", {"chunk_size": 0}, "chunk_size"),
    ("based", {"window": -1}, "window must be an integer >= 0"),
    ("based", {"chunk_size": 2.5}, "chunk_size"),
    ("lightning", {"activation": "gelu"}, "activation must be one of"),
    ("lightning", {"norm": "layer"}, "norm must be one of"),
    ("lightning", {"decay": "yes"}, "decay must be true or false"),
    ("lightning", {"layer_idx": 3, "num_layers": 3}, "layer_idx must be in"),
    ("lightning", {"num_layers": 0}, "num_layers"),
    ("lightning", {"block_size": 0}, "block_size"),
    ("rela", {"impl": "triton"}, "unknown impl"),
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        methods.load(name, **kw)


@pytest.mark.parametrize("name", NEW)
def test_trained_from_scratch_and_cost(name):
    m = _load(name)
    assert m.trainable and not m.training_free and not m.exact
    c = m.cost(64, 64, True)
    assert c.flops > 0 and c.kv_bytes > 0


def test_wrong_head_dim_is_named():
    m = _load("rela")
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=5, D=16)
    with pytest.raises(AttentionInputError, match="head_dim=8"):
        m(q, k, v)



@pytest.mark.parametrize("name", NEW)
def test_gradients_reach_inputs_and_parameters_in_every_impl(name):
    for impl in {"reference", FAST.get(name, "reference")}:
        m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=8, impl=impl)
        q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=4, Hkv=2, T=9, D=8, dtype=torch.float32))
        m(q, k, v, causal=True).square().sum().backward()
        for t in (q, k, v, *m.parameters()):
            assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, (name, impl)


@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_low_precision_inputs_follow_the_fp64_result(name):
    m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=8)
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=40, D=8)
    ref = m.double()(q, k, v, causal=True)
    m = m.float()
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        out = m(q.to(dt), k.to(dt), v.to(dt), causal=True)
        assert out.dtype == dt
        assert float((out.double() - ref).norm() / ref.norm()) < tol, (name, dt)


@pytest.mark.parametrize("name", NEW)
def test_queries_end_aligned_over_a_longer_cache_are_the_last_rows(name):
    """Tq < Tk (a prefill of the last tokens over a cache), in every impl: the last Tq rows."""
    for impl in {"reference", FAST.get(name, "reference")}:
        small = {"cottention": {"chunk_size": 4}, "based": {"chunk_size": 4}, "lightning": {"block_size": 4}}
        m = _load(name, impl=impl, **small.get(name, {}))
        q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=13, D=8)
        full = m(q, k, v, causal=True)
        torch.testing.assert_close(m(q[:, :, -5:], k, v, causal=True), full[:, :, -5:])


# ---- the authors' code, transcribed (the README's "matches official code" column) -------------
def test_rela_matches_the_official_code():
    """bzhangGo/zero modules/rela.py, dot_attention + gated_rms_norm, transcribed to torch:
    q scaled by d^-1/2, logits times the 0/1 mask, ReLU, weights @ v, heads concatenated, then
    scale * x * rsqrt(mean(x^2) + eps) * sigmoid(gate * x)."""
    m = _load("rela", H=4, Hkv=4)
    with torch.no_grad():
        m.gain.uniform_(0.5, 1.5)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=4, T=9, D=8)
    for causal in (False, True):
        mask = torch.ones(9, 9, dtype=torch.float64).tril() if causal else torch.ones(9, 9, dtype=torch.float64)
        logits = (q * 8 ** -0.5) @ k.transpose(-1, -2) * mask
        o = torch.relu(logits) @ v  # [B, H, T, d]
        x = o.transpose(1, 2).reshape(2, 9, 32)  # combine_heads
        ms = (x ** 2).mean(-1, keepdim=True)
        y = m.gain.detach() * x * torch.rsqrt(ms + 1e-8) * torch.sigmoid(m.gate.detach() * x)
        torch.testing.assert_close(m(q, k, v, causal=causal), y.view(2, 9, 4, 8).transpose(1, 2))


def test_cottention_matches_the_official_code():
    """gmongaras/Cottention_Transformer: GPTCosAttention._cos_attn's explicit branch (causal;
    each value divided by max(1, (row count of the causal mask)^sigmoid(norm_const))) and
    BertCosAttention's (non-causal, nothing scaled), transcribed to torch."""
    q, k, v = seeded_qkv(B=2, H=4, Hkv=4, T=9, D=8)
    m = _load("cottention", H=4, Hkv=4)
    with torch.no_grad():
        m.norm_const.copy_(torch.tensor([-0.5, 0.5, 1.0, 3.0]))
    causal_mask = torch.tril(torch.ones(9, 9, dtype=torch.bool)).view(1, 1, 9, 9)
    qn, kn = torch.nn.functional.normalize(q, dim=-1, p=2), torch.nn.functional.normalize(k, dim=-1, p=2)
    value = v / (causal_mask.sum(-1).unsqueeze(-1) ** m.norm_const.detach().view(1, 4, 1, 1).sigmoid()).clamp(min=1)
    w = torch.where(causal_mask, qn @ kn.transpose(-1, -2), 0)
    torch.testing.assert_close(m(q, k, v, causal=True), w @ value)
    bert = _load("cottention", H=4, Hkv=4, length_scale="none")
    torch.testing.assert_close(bert(q, k, v, causal=False), qn @ (kn.transpose(-1, -2) @ v))


def test_based_matches_the_official_code():
    """HazyResearch/based: TaylorExp (cat[x^0, x / rrd, outer(x, x) / r2 / rd]) and
    LinearAttention.parallel_forward's quadratic branch (tril(phi(q) phi(k)^T) v, times
    1 / (phi(q) . cumsum(phi(k)) + 1e-12)), transcribed to torch; window 0 (its linear layer)."""
    q, k, v = seeded_qkv(B=2, H=4, Hkv=4, T=9, D=8)

    def taylor(x):
        d = x.shape[-1]
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / math.sqrt(2)
        return torch.cat([x[..., :1] ** 0, x / math.sqrt(math.sqrt(d)), x2 / math.sqrt(d)], dim=-1)

    fq, fk = taylor(q), taylor(k)
    y = torch.tril(fq @ fk.transpose(-1, -2)) @ v
    y = y / ((fq * fk.cumsum(2)).sum(-1) + 1e-12)[..., None]
    for impl in ("reference", "chunked"):
        m = _load("based", H=4, Hkv=4, window=0, impl=impl, chunk_size=4)
        torch.testing.assert_close(m(q, k, v, causal=True), y)


def test_lightning_matches_the_official_code():
    """OpenNLPLab/lightning-attention: the torch reference ``linear_attn`` (mask exp(-slope (i-j))
    built row by row), ``_build_slope_tensor`` times (1 - l / (L - 1) + 1e-5), SiLU on q and k
    (TnlAttention) and ``SimpleRMSNormTorch`` over the concatenated heads, transcribed."""
    q, k, v = seeded_qkv(B=2, H=4, Hkv=4, T=9, D=8)
    start = 2 ** (-(2 ** -(math.log2(4) - 3)))
    slopes = torch.tensor([start * start ** i for i in range(4)], dtype=torch.float64) * (1 - 2 / 5 + 1e-5)
    masks_ = []
    for s in slopes:
        m = torch.triu(torch.full((9, 9), float("-inf"), dtype=torch.float64), 1)
        for i in range(9):
            m[i, :i + 1] = -torch.flip(s * torch.arange(i + 1, dtype=torch.float64), [0])
        masks_.append(torch.exp(m))
    fq, fk = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
    o = ((fq @ fk.transpose(2, 3)) * torch.stack(masks_)) @ v
    x = o.transpose(1, 2).reshape(2, 9, 32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    for impl in ("reference", "lightning"):
        m = _load("lightning", H=4, Hkv=4, decay=True, layer_idx=2, num_layers=6, impl=impl, block_size=4)
        torch.testing.assert_close(m(q, k, v, causal=True), x.view(2, 9, 4, 8).transpose(1, 2))
