"""Triton kernels (methods/kernels/) against masked exact attention.

On the CPU they run in Triton's interpreter (fp32/fp16, small shapes; conftest sets
TRITON_INTERPRET=1 when there is no GPU), on the GPU in bf16 at head dim 128.
"""
import math

import pytest
import torch

from methods.base import masked_attention
from methods.kernels import block_sparse, nsa_compressed, nsa_gate, nsa_selected, vertical_slash

CPU_DTYPES = [torch.float32, torch.float16]


def _inputs(B, H, Hkv, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g).to(device, dtype) for n in (H, Hkv, Hkv)]


def _check(out, ref, dtype):
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype], err


def _grid(T, device):
    qi = torch.arange(T, device=device).view(T, 1)
    ki = torch.arange(T, device=device).view(1, T)
    return qi, ki, qi - ki


def block_sparse_case(dtype, device, T, D, bm, bn, causal, seed=0, padded=True):
    B, H, Hkv = 2, 4, 2
    q, k, v = _inputs(B, H, Hkv, T, D, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lay = (torch.rand(B, H, math.ceil(T / bm), math.ceil(T / bn), generator=g) < 0.6).to(device)
    wl, wr, sink = (torch.tensor(x, device=device) for x in ([10**6, 40, 5, 10**6], [10**6, 40, 5, 3], [0, 0, 4, 2]))
    kpm = torch.ones(B, T, dtype=torch.bool, device=device)
    kpm[1, T - 15:] = False
    idx, cnt = block_sparse.layout_to_lists(lay)
    if not padded and bm == bn == block_sparse._tile(bm):  # the kernel's unmasked loop has tiles to run
        _, _, nin = block_sparse.inside_first(idx, cnt, block_m=bm, block_n=bn, causal=causal, win_l=wl, win_r=wr,
                                     sink=sink, tq=T, tk=T)
        assert int(nin.sum()) > 0
    kpm = kpm if padded else torch.ones_like(kpm)
    out = block_sparse.block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, causal=causal,
                                     win_l=wl, win_r=wr, sink=sink, key_padding_mask=kpm if padded else None)
    qi, ki, d = _grid(T, device)
    h = lambda x: x.view(1, H, 1, 1)  # noqa: E731
    mask = lay[:, :, qi // bm, ki // bn] & (((d < h(wl)) & (d > -h(wr))) | (ki < h(sink))) & kpm[:, None, None]
    if causal:
        mask = mask & (d >= 0)
    return out, masked_attention(q, k, v, mask)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks,padded", [((8, 8), True), ((16, 32), True), ((16, 16), False)])
def test_block_sparse_kernel_cpu(dtype, causal, blocks, padded):  # 8: a pattern block inside a 16-tile;
    out, ref = block_sparse_case(dtype, "cpu", 63, 16, *blocks, causal, padded=padded)  # 16 x 16 unpadded:
    _check(out, ref, dtype)  # tiles wholly inside the mask take the unmasked loop


def test_inside_first_puts_unmasked_tiles_first():
    lay = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0)) < 0.7
    idx, cnt = block_sparse.layout_to_lists(lay)
    wl, wr, sink = torch.tensor([block_sparse.BIG, 20, 5]), torch.tensor([block_sparse.BIG, 20, 5]), torch.tensor([0, 0, 8])
    oidx, ocnt, nin = block_sparse.inside_first(idx, cnt, block_m=8, block_n=8, causal=True, win_l=wl, win_r=wr,
                                       sink=sink, tq=44, tk=44)
    assert torch.equal(ocnt, cnt)
    qi, ki, d = _grid(44, "cpu")
    for h in range(3):
        keep = (((d < wl[h]) & (d > -wr[h])) | (ki < sink[h])) & (d >= 0)
        for i in range(6):
            row = oidx[0, h, i, :cnt[0, h, i]].tolist()
            assert sorted(row) == idx[0, h, i, :cnt[0, h, i]].tolist()  # the same tiles
            for j, t in enumerate(row):  # the first nin wholly kept, the others not
                full = 8 * t + 8 <= 44 and bool(keep[8 * i:8 * i + 8, 8 * t:8 * t + 8].all())
                assert full == (j < nin[0, h, i]), (h, i, j, t)


def test_window_layout_covers_exactly_the_tiles_with_kept_pairs():
    T, bm, bn = 70, 16, 8
    w, sink = torch.tensor([9]), torch.tensor([3])
    for causal in (False, True):
        lay = block_sparse.window_layout(T, T, bm, bn, causal, w, w, sink, "cpu")[0]
        qi, ki, d = _grid(T, "cpu")
        mask = ((d < 9) & (d > -9)) | (ki < 3)
        if causal:
            mask &= d >= 0
        want = torch.zeros_like(lay)
        for i, j in mask.nonzero().tolist():
            want[i // bm, j // bn] = True
        assert torch.equal(lay, want)


def vertical_slash_case(dtype, device, T, D, block, seed=0):
    B, H, Hkv = 2, 4, 2
    q, k, v = _inputs(B, H, Hkv, T, D, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    vert = (torch.rand(B, H, T, generator=g) < 0.1).to(device)
    slash = (torch.rand(B, H, T, generator=g) < 0.1).to(device)
    out = vertical_slash.vertical_slash_attention(q, k, v, vert, slash, block=block)
    qi, ki, d = _grid(T, device)
    mask = (vert[:, :, None, :] | slash[:, :, d.clamp(min=0)]) & (d >= 0)
    return out, masked_attention(q, k, v, mask)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_vertical_slash_kernel_cpu(dtype):
    out, ref = vertical_slash_case(dtype, "cpu", 75, 16, 16)
    _check(out, ref, dtype)


def test_vertical_slash_work_counts_visited_tiles():
    T, bl = 64, 16
    vert = torch.zeros(1, 1, T, dtype=torch.bool)
    slash = torch.zeros(1, 1, T, dtype=torch.bool)
    slash[..., 0] = True  # the main diagonal only: the 4 diagonal tiles
    plan = vertical_slash.vertical_slash_plan(vert, slash, bl)
    assert vertical_slash.vertical_slash_work(plan) == 4 * bl * bl
    vert[..., 1] = True  # one column, gathered by all 4 query tiles (masked in the first,
    plan = vertical_slash.vertical_slash_plan(vert, slash, bl)  # where phase A covers it): a chunk each
    assert vertical_slash.vertical_slash_work(plan) == (4 + 4) * bl * bl


def nsa_case(dtype, device, T, D, bs, n, H=4, Hkv=2, seed=0, launch=None):
    B = 2
    q, k, v = _inputs(B, H, Hkv, T, D, dtype, device, seed)
    nblk = math.ceil(T / bs)
    g = torch.Generator().manual_seed(seed + 1)
    sel = torch.stack([torch.randperm(nblk, generator=g)[:n] for _ in range(B * Hkv * T)]).view(B, Hkv, T, n)
    cur = torch.arange(T).view(1, 1, T, 1) // bs
    sel = torch.where(sel <= cur, sel, -1).to(device)
    out = nsa_selected.nsa_selected_attention(q, k, v, sel, bs, launch=launch)
    from methods.nsa import NSA

    chosen = NSA.chosen_mask(sel, nblk).repeat_interleave(H // Hkv, 1)  # [B, H, T, nblk]
    qi, ki, d = _grid(T, device)
    mask = chosen[..., torch.arange(T, device=device) // bs] & (d >= 0)
    return out, masked_attention(q, k, v, mask)


def nsa_grad_case(dtype, device, T, D, bs, n, H, Hkv, tol):
    """dq, dk, dv of the selection's backward against autograd through the masked reference;
    block 0 chosen by every token (its tokens span several dK/dV work items)."""
    B = 2
    q, k, v = (x.requires_grad_() for x in _inputs(B, H, Hkv, T, D, dtype, device, 4))
    nblk = math.ceil(T / bs)
    g = torch.Generator().manual_seed(5)
    rest = torch.stack([torch.randperm(nblk - 1, generator=g)[:n - 1] + 1 for _ in range(B * Hkv * T)])
    sel = torch.cat([torch.zeros(B * Hkv * T, 1, dtype=torch.long), rest], 1).view(B, Hkv, T, n)
    cur = torch.arange(T).view(1, 1, T, 1) // bs
    sel = torch.where(sel <= cur, sel, -1).to(device)
    out = nsa_selected.nsa_selected_attention(q, k, v, sel, bs)
    from methods.nsa import NSA

    chosen = NSA.chosen_mask(sel, nblk).repeat_interleave(H // Hkv, 1)
    qi, ki, d = _grid(T, device)
    mask = chosen[..., torch.arange(T, device=device) // bs] & (d >= 0)
    ref = masked_attention(q.float(), k.float(), v.float(), mask)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6)).to(device)
    got = torch.autograd.grad(out.float(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b_ in zip("qkv", got, want):
        err = float((a.float() - b_.float()).abs().max() / b_.float().abs().max())
        assert err < tol, (name, err)


@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])  # groups of 2, 3 (padded), 1
@pytest.mark.parametrize("small_group", [0, 4])  # dQ per token; dQ by key block (atomically)
def test_nsa_selection_backward_cpu(heads, small_group, monkeypatch):
    from methods.kernels.nsa_selected import NSASelectedAttention

    monkeypatch.setattr(NSASelectedAttention, "segment", 7)  # block 0's 61 tokens: 9 work items
    monkeypatch.setattr(nsa_selected, "NSA_SMALL_GROUP", small_group)  # the forward's order too
    nsa_grad_case(torch.float32, "cpu", 61, 16, 8, 3, *heads, tol=1e-4)


def test_nsa_block_tokens_lists_each_choice_once():
    sel = torch.tensor([[[[0, -1], [0, 1], [1, 0], [-1, -1]]]])  # [1, 1, T=4, n=2]
    ent, work = nsa_selected.nsa_block_tokens(sel, 2, segment=2)  # choices: token * 2 + slot
    assert ent[0, :5].tolist() == [0, 2, 5, 3, 4] and work.tolist() == [[0, 0, 0, 2], [0, 0, 2, 3], [0, 1, 3, 5]]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bs", [8, 16])
# per token; by key block (segments of 5 choices), with tiles of 64 and of 16 rows
@pytest.mark.parametrize("launch", [(0, 0, 2, 2), (1, 5, 4, 2), (1, 5, 2, 2, 16)])
def test_nsa_selection_kernel_cpu(dtype, bs, launch):
    out, ref = nsa_case(dtype, "cpu", 61, 16, bs, 3, launch=launch)
    _check(out, ref, dtype)


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)])  # groups of 1 and 3 (padded to 4)
def test_nsa_selection_by_block_in_token_chunks_cpu(heads, monkeypatch):
    """The selection by key block over chunks of 64 tokens (the partial outputs' memory bound; 100
    tokens: a whole chunk and a partial one), its log-sum-exp as the per-token kernel's."""
    monkeypatch.setattr(nsa_selected, "NSA_BLOCK_BYTES", 1)
    out, ref = nsa_case(torch.float32, "cpu", 100, 16, 16, 4, *heads, launch=(1, 64, 4, 2))
    _check(out, ref, torch.float32)
    q, k, v = _inputs(1, heads[0], heads[1], 100, 16, torch.float32, "cpu", 2)
    sel = torch.randint(0, 10, (1, heads[1], 100, 4)).clamp_max((torch.arange(100) // 16).view(1, 1, 100, 1))
    lse = [torch.empty(1, heads[0], 100) for _ in range(2)]
    orders = [(0, 0, 2, 2), (1, 64, 4, 2)]
    outs = [nsa_selected.nsa_selected_attention(q, k, v, sel, 16, launch=c, lse=x) for c, x in zip(orders, lse)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[1], lse[0], rtol=1e-5, atol=1e-5)


def test_kernels_refuse_a_head_dim_they_cannot_tile():
    q, k, v = _inputs(1, 2, 2, 16, 24, torch.float32, "cpu")
    idx, cnt = block_sparse.layout_to_lists(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="power-of-two head dim"):
        block_sparse.block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16, causal=False)


# ---- GPU, bf16, head dim 128 ----------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("blocks,padded", [((64, 64), True), ((128, 64), True), ((50, 50), True),
                                           ((64, 64), False), ((128, 128), False)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_kernel_gpu_bf16(blocks, padded, causal):
    out, ref = block_sparse_case(torch.bfloat16, "cuda", 1000, 128, *blocks, causal, padded=padded)
    _check(out, ref, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_vertical_slash_kernel_gpu_bf16():
    out, ref = vertical_slash_case(torch.bfloat16, "cuda", 1000, 128, 64)
    _check(out, ref, torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(4, 2), (32, 2), (8, 8)])  # GQA groups of 2 and 16 query heads; MHA
@pytest.mark.parametrize("launch", [(0, 0, 2, 2), (1, 256, 4, 2)])  # per token; by key block
def test_nsa_selection_kernel_gpu_bf16(heads, launch):
    out, ref = nsa_case(torch.bfloat16, "cuda", 1000, 128, 64, 16, *heads, launch=launch)
    _check(out, ref, torch.bfloat16)


# ---- causal linear attention (Performer) ------------------------------------------------------
def linear_case(dtype, device, T, M, D, chunk, H=4, Hkv=2, seed=0):
    from methods.kernels.linear_attn import causal_linear_attention

    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(2, H, T, M, generator=g).to(device, dtype)  # non-negative
    fk = torch.rand(2, Hkv, T, M, generator=g).to(device, dtype)
    v = torch.randn(2, Hkv, T, D, generator=g).to(device, dtype)
    out = causal_linear_attention(fq, fk, v, chunk=chunk)
    fk, v = (x.repeat_interleave(H // Hkv, 1) for x in (fk, v))
    att = torch.tril(fq.double() @ fk.double().transpose(-1, -2))  # [B, H, T, T]
    return out, (att @ v.double()) / att.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(70, 24, 16, 16), (33, 16, 32, 32), (100, 80, 16, 16)])  # odd T, M
def test_causal_linear_kernel_cpu(dtype, shape):  # 24 features: not a power of 2; 80: two row blocks
    out, ref = linear_case(dtype, "cpu", *shape)
    _check(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [128, 256])
def test_causal_linear_kernel_gpu_bf16(M):
    out, ref = linear_case(torch.bfloat16, "cuda", 1000, M, 128, 64)
    _check(out, ref, torch.bfloat16)


def performer_case(dtype, device, T, M, D, chunk, kernel="softmax", H=4, Hkv=2, seed=0, shift=1.5):
    """The fused kernel (feature map on chip) against impl=reference's prefix sums in fp64."""
    import methods
    from methods.kernels.linear_attn import performer_causal

    q, k, v = _inputs(2, H, Hkv, T, D, torch.float64, "cpu", seed)
    k = k + shift  # keys away from zero: the keys' stabiliser then matters
    ref = methods.load("performer", num_heads=H, num_kv_heads=Hkv, head_dim=D, num_features=M,
                       kernel=kernel, impl="reference").double()
    with torch.no_grad():
        want = ref(q, k, v, causal=True)
    w = ref.projection.double()
    out = performer_causal(*(x.to(device, dtype) for x in (q, k, v)), w.to(device), chunk=chunk,
                           relu=kernel == "relu")
    return out, want.to(device)


# fp16 only at head dim 16: wider logits (D=32) push early keys' features below fp16's range
# (6e-8), as they do on the unfused path; bf16 (the GPU test) has the range
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (70, 24, 16, 16)), (torch.float16, (70, 24, 16, 16)),
                                         (torch.float32, (100, 80, 32, 32))])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_fused_kernel_cpu(dtype, shape, kernel):
    out, ref = performer_case(dtype, "cpu", *shape, kernel=kernel)
    _check(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [128, 256])
def test_performer_fused_kernel_gpu_bf16(M):
    out, ref = performer_case(torch.bfloat16, "cuda", 1000, M, 128, 64)
    _check(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])  # groups of 2, 3 (padded to 4), 1
def test_nsa_compressed_kernels_cpu(dtype, heads):
    nsa_compressed_case(dtype, "cpu", 150, 16, 8, 8, 4, *heads)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(32, 2), (12, 4), (64, 4), (8, 8)])
def test_nsa_compressed_kernels_gpu_bf16(heads):
    nsa_compressed_case(torch.bfloat16, "cuda", 3000, 128, 64, 32, 16, *heads)


def topn_case(device, t0, nsel, c, n=16, bs=64):
    """The fused top-n against NSA.select: the same blocks in the same order (best first,
    ties to the earlier block), the forced ones in, -1 where fewer are visible."""
    import methods

    m = methods.load("nsa", num_heads=4, num_kv_heads=2, head_dim=16, block_size=bs, num_selected=n)
    imp = torch.rand(1, 2, c, nsel, generator=torch.Generator().manual_seed(nsel)).to(device)
    imp[..., 5:9] = imp[..., 4:5]  # ties
    want = m.select(imp.clone(), t0)
    for warps in (None, 4):
        got = nsa_compressed.nsa_topn(imp, t0, bs, n, warps=warps).long()
        assert torch.equal(got, want), warps


@pytest.mark.parametrize("t0,nsel,c", [(0, 10, 80), (64, 40, 64), (0, 3, 20)])  # 3 blocks: fewer than n
def test_nsa_topn_cpu(t0, nsel, c):
    topn_case("cpu", t0, nsel, c, n=5, bs=8)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("nsel", [1024, 4096])
def test_nsa_topn_gpu(nsel):
    topn_case("cuda", nsel * 64 - 256, nsel, 256)  # the last rows of a long sequence


def gate_case(dtype, device):
    g = torch.Generator().manual_seed(5)
    gates = torch.rand(2, 3, 37, 3, generator=g).to(device, dtype)
    outs = [torch.randn(2, 3, 37, 32, generator=g).to(device, dtype) for _ in range(3)]
    want = sum(gates[..., i:i + 1].double() * o.double() for i, o in enumerate(outs))
    _check(nsa_gate.gate_combine(gates, *outs, dtype), want, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gate_combine_cpu(dtype):
    gate_case(dtype, "cpu")


@pytest.mark.gpu
@gpu
def test_gate_combine_gpu_bf16():
    gate_case(torch.bfloat16, "cuda")


def nsa_compressed_grad_case(dtype, device, T, D, cl, cs, H, Hkv, tol):
    """dq, dkc, dvc of the compressed attention's backward against autograd through a dense
    PyTorch computation (rows that see no block included: their output is zero)."""
    g = torch.Generator().manual_seed(7)
    n = (T - cl) // cs + 1
    q = torch.randn(1, H, T, D, generator=g).to(device, dtype).requires_grad_()
    kc, vc = (torch.randn(1, Hkv, n, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    out, lse = nsa_compressed.nsa_compressed_attention(q, kc, vc, cl, cs)
    assert not lse.requires_grad
    vis = (torch.arange(n, device=device) * cs + cl - 1).view(1, n) <= torch.arange(T, device=device).view(T, 1)
    kk, vv = (x.float().repeat_interleave(H // Hkv, 1) for x in (kc, vc))
    s = (q.float() @ kk.transpose(-1, -2)) / math.sqrt(D)
    ref = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0) @ vv
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8)).to(device)
    got = torch.autograd.grad(out.float(), (q, kc, vc), grad)
    want = torch.autograd.grad(ref, (q, kc, vc), grad)
    for name, a, b_ in zip(("q", "kc", "vc"), got, want):
        err = float((a.float() - b_.float()).abs().max() / b_.float().abs().max())
        assert err < tol, (name, err)


@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (2, 2)])
def test_nsa_compressed_backward_cpu(heads, monkeypatch):
    from methods.kernels.nsa_compressed import NSACompressedAttention

    monkeypatch.setattr(NSACompressedAttention, "tiles", (16, 16))  # 36 blocks: 3 key tiles, 10 query tiles
    nsa_compressed_grad_case(torch.float32, "cpu", 150, 16, 8, 4, *heads, tol=1e-4)


def nsa_compressed_case(dtype, device, T, D, bs, cl, cs, H=4, Hkv=2):
    """o_cmp and the selection-block importance against a dense PyTorch computation."""
    B = 1
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    n = (T - cl) // cs + 1
    kc, vc = (torch.randn(B, Hkv, n, D, generator=g).to(device, dtype) for _ in range(2))
    o, imp = nsa_compressed.nsa_compressed(q, kc, vc, bs, cl, cs)
    t = torch.arange(T, device=device).view(T, 1)
    ends = torch.arange(n, device=device) * cs + cl - 1
    vis = ends.view(1, n) <= t  # [T, n]
    kk, vv = (x.float().repeat_interleave(H // Hkv, 1) for x in (kc, vc))
    s = (q.float() @ kk.transpose(-1, -2)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)  # [B, H, T, n]
    _check(o, p @ vv, dtype)
    nsel = math.ceil(T / bs)
    starts = torch.arange(n, device=device) * cs
    lo = torch.arange(nsel, device=device) * bs
    shared = torch.minimum(starts.view(n, 1) + cl, lo.view(1, nsel) + bs) - torch.maximum(starts.view(n, 1),
                                                                                         lo.view(1, nsel))
    overlap = shared.clamp(min=0).float() / cs  # Eq. 9: tokens shared over the stride
    want = p.view(B, Hkv, H // Hkv, T, n).sum(2) @ overlap  # [B, Hkv, T, nsel]
    torch.testing.assert_close(imp, want, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    _, lse = nsa_compressed.nsa_compressed_attention(q, kc, vc, cl, cs)  # the rows in chunks: the same scores
    parts = [nsa_compressed.nsa_importance(q, kc, lse, bs, cl, cs, a, min(a + 64, T)) for a in range(0, T, 64)]
    torch.testing.assert_close(torch.cat(parts, 2), imp, rtol=0, atol=0)
    few = nsa_compressed.nsa_importance(q, kc, lse, bs, cl, cs, 0, T, launch=(16, 32, 4, 2))  # < 16 tokens a program
    torch.testing.assert_close(few, want, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    # small tiles: later query tiles see whole key tiles (the kernels' unmasked loops)
    assert (T - 16 - cl + 1) // cs + 1 >= 16, "too short for a whole tile of 16 compressed blocks"
    o16, lse16 = nsa_compressed.nsa_compressed_attention(q, kc, vc, cl, cs, launch=(16, 16, 4, 2))
    _check(o16, p @ vv, dtype)
    for atomic in (0, 1):  # the importance rows read, added to and written, or added to atomically
        imp16 = nsa_compressed.nsa_importance(q, kc, lse16, bs, cl, cs, 0, T, launch=(16, 16, 4, 2, atomic))
        torch.testing.assert_close(imp16, want, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 64"):
        nsa_compressed.nsa_importance(q, kc, lse, bs, cl, cs, 10, T)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [(8, 8), (16, 32)])
def test_block_sparse_kernel_gradients_cpu(causal, blocks):
    block_sparse_grad_case(torch.float32, "cpu", 45, 16, *blocks, causal, tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_kernel_gradients_gpu_bf16(causal):
    block_sparse_grad_case(torch.bfloat16, "cuda", 1000, 128, 64, 64, causal, tol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(32, 2), (8, 8)])
def test_nsa_compressed_backward_gpu_bf16(heads):
    nsa_compressed_grad_case(torch.bfloat16, "cuda", 3000, 128, 32, 16, *heads, tol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [(32, 2), (8, 8), (12, 4)])  # groups of 16 heads, of one, of 3
def test_nsa_selection_backward_gpu_bf16(heads):
    nsa_grad_case(torch.bfloat16, "cuda", 1000, 128, 64, 8, *heads, tol=3e-2)


def block_sparse_grad_case(dtype, device, T, D, bm, bn, causal, tol):
    """dq, dk, dv of the Triton backward against autograd through the masked reference."""
    torch.manual_seed(0)
    B, H, Hkv = 2, 4, 2
    q, k, v = (torch.randn(B, n, T, D, device=device, dtype=dtype, requires_grad=True) for n in (H, Hkv, Hkv))
    lay = torch.rand(1, H, math.ceil(T / bm), math.ceil(T / bn), device=device) < 0.5
    lay[..., 0] = True  # every query row keeps something
    wl, wr, sink = (torch.tensor(x, device=device) for x in ([10**6, 20, 5, 10**6], [10**6, 20, 5, 3], [0, 0, 4, 2]))
    kpm = torch.ones(B, T, dtype=torch.bool, device=device)
    kpm[1, T - 9:] = False
    idx, cnt = block_sparse.layout_to_lists(lay)
    out = block_sparse.block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, causal=causal, win_l=wl,
                                     win_r=wr, sink=sink, key_padding_mask=kpm)
    qi, ki, d = _grid(T, device)
    h = lambda x: x.view(1, H, 1, 1)  # noqa: E731
    mask = lay[:, :, qi // bm, ki // bn] & (((d < h(wl)) & (d > -h(wr))) | (ki < h(sink))) & kpm[:, None, None]
    if causal:
        mask = mask & (d >= 0)
    ref = masked_attention(q.float(), k.float(), v.float(), mask)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b_ in zip(got, want):
        err = float((a.float() - b_.float()).abs().max() / b_.float().abs().max())
        assert err < tol, err
