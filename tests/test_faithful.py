"""Fidelity to the official code and papers (issue 21): each method against a computation
written here from the official code's or the paper's definition, not from the method's helpers."""
import itertools
import math

import pytest
import torch

import methods
from methods.base import masked_attention
from tests.conftest import seeded_qkv

F64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- Nystromformer: mlpen/Nystromformer, NystromAttention.iterative_inv ---------------------
def nystrom_direct(q, k, v, m, iters, init):
    """The official forward without the conv skip (T divisible by m): landmarks are segment
    means; Z_0 = K^T / max(column sums) over the whole tensor ('original') or per matrix."""
    B, H, T, D = q.shape
    ql = q.reshape(B, H, m, T // m, D).mean(-2)
    kl = k.reshape(B, H, m, T // m, D).mean(-2)
    s = 1 / math.sqrt(D)
    k1 = torch.softmax(q @ kl.transpose(-1, -2) * s, -1)
    k2 = torch.softmax(ql @ kl.transpose(-1, -2) * s, -1)
    k3 = torch.softmax(ql @ k.transpose(-1, -2) * s, -1)
    eye = torch.eye(m, dtype=q.dtype)
    if init == "original":
        z = 1 / torch.max(torch.sum(k2, dim=-2)) * k2.transpose(-1, -2)
    else:
        z = 1 / torch.max(torch.sum(k2, dim=-2), dim=-1).values[:, :, None, None] * k2.transpose(-1, -2)
    for _ in range(iters):
        kz = k2 @ z
        z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return k1 @ z @ (k3 @ v)


@pytest.mark.parametrize("init", ["original", "exact"])
def test_nystrom_both_inits_equal_the_official_iteration(init):
    q, k, v = seeded_qkv(B=3, H=2, Hkv=2, T=64, D=16)
    q = q * torch.tensor([0.5, 1.0, 3.0], dtype=F64).view(3, 1, 1, 1)  # batch elements differ in scale
    m = methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=8, conv_kernel=0,
                     pinv_init=init).double()
    torch.testing.assert_close(m(q, k, v), nystrom_direct(q, k, v, 8, 6, init), rtol=1e-10, atol=1e-12)


def test_nystrom_original_init_is_the_default_and_depends_on_the_batch():
    assert methods.load("nystrom").pinv_init == "original"
    q, k, v = seeded_qkv(B=2, H=2, Hkv=2, T=64, D=16)
    q = q * torch.tensor([0.3, 4.0], dtype=F64).view(2, 1, 1, 1)
    orig, ex = (methods.load("nystrom", num_heads=2, head_dim=16, num_landmarks=8, conv_kernel=0,
                             pinv_init=i).double() for i in ("original", "exact"))
    alone = orig(q[:1], k[:1], v[:1])
    assert not torch.allclose(orig(q, k, v)[:1], alone, rtol=1e-6, atol=0)  # the batch shares a scale
    torch.testing.assert_close(ex(q, k, v)[:1], ex(q[:1], k[:1], v[:1]))  # per matrix: it does not
    with pytest.raises(ValueError, match="pinv_init"):
        methods.load("nystrom", pinv_init="per_row")


# ---- MInference: microsoft/MInference vertical_and_slash_kernel + convert_vertical_slash_indexes --
def official_vertical_slash(q, k, vertical_size, slash_size, last_q=64, n_sink=30, n_local=100):
    """The official index estimate for one head (q, k [T, D]), written as the official code
    does it (diagonal sums through index T - 1 - o; forced entries set to inf; one top-k each;
    scale 1/sqrt(D) where the official code has 1/sqrt(128)). Returns (verticals ascending,
    slash offsets descending)."""
    T, D = q.shape
    lq = min(last_q, T)
    qk = q[-lq:] @ k.T / math.sqrt(D)
    causal = torch.arange(lq).view(-1, 1) >= torch.arange(lq).view(1, -1)
    qk[:, -lq:] = torch.where(causal, qk[:, -lq:], -math.inf)
    p = torch.softmax(qk, -1)
    vertical = p.sum(0)
    vertical[:n_sink] = math.inf
    v_idx = torch.topk(vertical, vertical_size).indices
    slash = torch.zeros(T, dtype=p.dtype)  # slash[c]: diagonal o = T - 1 - c
    for r in range(lq):
        i = T - lq + r
        for j in range(i + 1):
            slash[T - 1 - (i - j)] += p[r, j]
    slash[-n_local:] = math.inf
    s_idx = (T - 1) - torch.topk(slash, slash_size).indices
    return sorted(v_idx.tolist()), sorted(s_idx.tolist(), reverse=True)


def official_convert(v_idx, s_idx, T, M=64, N=64):
    """convert_vertical_slash_indexes for one head, the CUDA kernel's loop line by line:
    per block row, block_offset (starts of N-wide key blocks) and column_index."""
    rows = []
    for start_m in range(0, T, M):
        end_m = start_m + M
        blocks, columns = [], []
        s = v = 0
        v_i = v_idx[v]
        v += 1
        s_i = s_idx[s]
        s += 1
        while s_i >= end_m:
            s_i = s_idx[s]
            s += 1
        s_i = max(end_m - s_i, M)
        rs, re = s_i - M, s_i
        while True:
            if v_i < re:
                if v_i < rs:
                    columns.append(v_i)
                if v < len(v_idx):
                    v_i = v_idx[v]
                    v += 1
                else:
                    v_i = end_m + M
            else:
                if s < len(s_idx):
                    s_i = max(end_m - s_idx[s], M)
                    s += 1
                else:
                    blocks += list(range(rs, re, N))
                    break
                if s_i > re + M:
                    blocks += list(range(rs, re, N))
                    rs, re = s_i - M, s_i
                elif s_i > re:
                    re += M
        rows.append((blocks, columns))
    return rows


def official_mask(rows, T, M=64, N=64):
    """The pairs the official sparse kernel attends: per block row, its N-wide blocks and its
    columns, causal."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for r, (blocks, columns) in enumerate(rows):
        for st in blocks:
            mask[r * M:(r + 1) * M, st:min(st + N, T)] = True
        mask[r * M:(r + 1) * M, columns] = True
    return mask & torch.ones(T, T, dtype=torch.bool).tril()


def planted_qkv(T, H, D, seed):
    """Inputs with heavy columns and diagonals, so the estimate's choice is not the forced one."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, H, T, D, generator=g) * 0.5
    for h in range(H):
        cols = torch.randint(30, T - 200, (6,), generator=g)
        k[0, h, cols] += q[0, h, -64:].mean(0) * 3
    return q, k, torch.randn(1, H, T, D, generator=g)


@pytest.mark.parametrize("T,nv,ns", [(2048, 64, 128), (2560, 100, 160), (2100, 40, 300)])
def test_minference_index_and_mask_equal_the_official_construction(T, nv, ns):
    H, D = 2, 16
    q, k, v = planted_qkv(T, H, D, seed=T)
    m = methods.load("minference", num_heads=H, head_dim=D, vertical_size=nv, slash_size=ns, impl="reference")
    assert (m.heads[0]["forced_sink"], m.heads[0]["forced_local"], m.last_q) == (30, 100, 64)
    assert m.slash_mode == "ranges"
    vert, slash = m.vertical_slash_sets(q, k)
    mod = methods.masks.and_masks(m.mask_mod(q, k, True), methods.masks.causal(0))
    got = methods.masks.materialize(mod, 1, H, T, T)
    for h in range(H):
        v_idx, s_idx = official_vertical_slash(q[0, h].double(), k[0, h].double(), nv, ns)
        assert vert[0, h].nonzero().flatten().tolist() == v_idx
        assert sorted(slash[0, h].nonzero().flatten().tolist(), reverse=True) == s_idx
        want = official_mask(official_convert(v_idx, s_idx, T), T)
        assert torch.equal(got[0, h], want), (h, int((got[0, h] ^ want).sum()))
    m(q, k, v, causal=True)  # the recorded density is the official mask's
    dense = T * (T + 1) / 2
    wants = [official_mask(official_convert(*official_vertical_slash(q[0, h].double(), k[0, h].double(), nv, ns), T), T)
             for h in range(H)]
    assert m.last_density == pytest.approx(sum(float(w.sum()) for w in wants) / (H * dense), rel=1e-12)
    assert m.last_density > 2 * (nv + ns) * T / dense  # the ranges keep far more than the lines


@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_minference_ranges_fast_paths_equal_the_reference(impl):
    """Small budgets at T = 768 (12 block rows) so that ranges start off the 16 grid, merge,
    leave gaps and verticals fall inside and outside them; GQA; fp32 in the interpreter."""
    T, H, D = 768, 2, 16
    q, k, v = planted_qkv(T, H, D, seed=5)
    k, v = k[:, :1], v[:, :1]
    kw = dict(num_heads=H, num_kv_heads=1, head_dim=D, vertical_size=12, slash_size=10, forced_sink=5,
              forced_local=4)
    ref = methods.load("minference", impl="reference", **kw)
    fast = methods.load("minference", impl=impl, **kw)
    with torch.no_grad():
        want, got = ref(q, k, v, causal=True), fast(q, k, v, causal=True)
    assert fast.last_path == impl
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fast.last_density == pytest.approx(ref.last_density, rel=1e-12) and ref.last_density < 0.8


def test_minference_block_sparse_matches_the_official_kernel():
    """block_sparse_kernel: q, k zero-padded to whole blocks of 64 and mean-pooled (divided by
    64), causal block scores, top-k key blocks per query block, no forced diagonal block."""
    T, bs, topk = 2000, 64, 5
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=T, D=16, dtype=torch.float32, seed=4)
    m = methods.load("minference", pattern="block_sparse", num_heads=2, head_dim=16, block_size=bs,
                     top_k_blocks=topk, impl="reference")
    n = (T - 1) // bs + 1
    pad = lambda x: torch.cat((x, torch.zeros(1, 2, n * bs - T, 16)), 2).reshape(1, 2, n, bs, 16).mean(-2)  # noqa: E731
    scores = (pad(q) @ pad(k).transpose(-1, -2)).masked_fill(
        ~(torch.arange(n)[:, None] >= torch.arange(n)[None, :]), float("-inf"))
    picks = torch.topk(scores, topk, -1).indices
    lay = torch.zeros(1, 2, n, n, dtype=torch.bool).scatter_(-1, picks, True) & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(m.block_layout(q, k), lay)
    assert not lay.diagonal(dim1=-2, dim2=-1).all()  # the diagonal block is not forced
    forced = methods.load("minference", pattern="block_sparse", num_heads=2, head_dim=16, block_size=bs,
                          top_k_blocks=topk, force_diagonal_block=True)
    assert forced.block_layout(q, k).diagonal(dim1=-2, dim2=-1).all()
    want = lay.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :T, :T] & torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, causal=True), masked_attention(q, k, v, want), rtol=1e-5, atol=1e-6)


# ---- SparseK: Lou et al. 2024, the scoring network and the masked attention ------------------
def capped_simplex_projection(u, k):
    """argmin_p |p - u|^2 over 0 <= p <= 1, sum p = k (u 1-D): f(tau) = sum clip(u - tau, 0, 1)
    is piecewise linear and decreasing; tau is found between its breakpoints u_j and u_j - 1."""
    if len(u) <= k:
        return torch.ones_like(u)
    f = lambda t: float((u - t).clamp(0, 1).sum())  # noqa: E731
    pts = sorted(set(torch.cat([u, u - 1]).tolist()))
    for a, b in itertools.pairwise(pts):
        fa, fb = f(a), f(b)
        if fa >= k >= fb:
            tau = a if fa == fb else a + (fa - k) / (fa - fb) * (b - a)
            return (u - tau).clamp(0, 1)
    raise AssertionError("no threshold")


def sparsek_direct(q, k, v, w, b, slope, kk, window):
    """o_i = sum_j m_ij exp(s_ij) v_j / sum_j m_ij exp(s_ij): m_ij = 1 for i - window < j <= i,
    p_j = SparseK(u_{j <= i - window}, kk)_j on the kk best of those, u_j = w . k_j + b + slope j."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros_like(q)
    for bb in range(B):
        for h in range(H):
            hk = h // rep
            u = k[bb, hk] @ w + b + slope * torch.arange(T, dtype=q.dtype)
            for i in range(T):
                m = torch.zeros(T, dtype=q.dtype)
                m[max(0, i - window + 1):i + 1] = 1.0
                n = i - window + 1  # candidates j < n
                if n > 0:
                    p = capped_simplex_projection(u[:n], kk)
                    top = u[:n].topk(min(kk, n)).indices
                    m[top] = p[top]
                s = q[bb, h, i] @ k[bb, hk].T / math.sqrt(D)
                e = m * torch.exp(s - s.max())
                out[bb, h, i] = (e / e.sum()) @ v[bb, hk]
    return out


@pytest.mark.parametrize("slope", [0.0, 0.05])
def test_sparsek_scorer_and_masked_attention_equal_the_paper(slope):
    q, k, v = seeded_qkv(B=1, H=2, Hkv=1, T=40, D=16)
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=16, k=5, window=6, query_chunk=8, position_slope=slope)
    base = methods.load("sparsek", impl="reference", **kw).double()
    assert methods.load("sparsek").position_slope == 0.0  # off by default (module docstring: why)
    want = sparsek_direct(q, k, v, base.score.weight[0].detach(), float(base.score.bias.detach()), slope, 5, 6)
    for impl in base.impls:
        m = methods.load("sparsek", impl=impl, **kw).double()
        m.load_state_dict(base.state_dict())
        tol = 1e-6 if impl == "triton" else 1e-9  # the kernels' threshold search and tiles in fp32
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v, causal=True), want, rtol=tol, atol=tol)
        assert m.last_path == impl
    u = base.scores(k)
    with torch.no_grad():
        torch.testing.assert_close(u[0, 0], k[0, 0] @ base.score.weight[0] + base.score.bias + slope * torch.arange(40))
    if slope:  # the position term changes the output (which keys are selected and their weights)
        flat = methods.load("sparsek", impl="reference", **{**kw, "position_slope": 0.0}).double()
        flat.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(flat(q, k, v, causal=True), want)


@pytest.mark.parametrize("T,ns", [(768, 20), (1000, 9)])
def test_minference_slash_scan_kernel_equals_the_official_convert(T, ns, monkeypatch):
    """The Triton slash walk (methods/kernels/slash_ranges.py, here in the interpreter) gives,
    per block row, the key blocks of the official convert_vertical_slash_indexes loop."""
    from methods import minference as mi

    monkeypatch.setattr(mi, "KERNEL_SCAN_ON_CPU", True)
    g = torch.Generator().manual_seed(T)
    slash = torch.zeros(1, 2, T, dtype=torch.bool)
    for h in range(2):
        slash[0, h, torch.randperm(T, generator=g)[: ns - h]] = True
        slash[0, h, :3] = True  # the main diagonal and its neighbours, as the forced locals
    starts, _ = mi.slash_ranges(slash, n=int(slash.sum(-1).max()))
    for h in range(2):
        s_idx = sorted(slash[0, h].nonzero().flatten().tolist(), reverse=True)
        v_idx = [T + 64]  # no verticals (a sentinel past every row)
        for r, (blocks, _) in enumerate(official_convert(v_idx, s_idx, T)):
            got = [int(x) for x in starts[0, h, r] if int(x) < mi.NONE]
            assert got == sorted(blocks), (h, r)
