"""Sparse methods: exact with a full budget, fast paths equal references, densities, bad input."""
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

import methods
from methods import masks
from methods.base import AttentionInputError, masked_attention
from methods.minference import MInference, load_patterns
from methods.sparsek import sparsek
from tests.conftest import seeded_qkv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from minference_search import main as minference_main  # noqa: E402

F64 = torch.float64
T = 63  # odd: not a multiple of any block size


def exact(q, k, v, causal):
    mask = masks.attention_mask(q.shape[0], 1, q.shape[2], k.shape[2], causal, None)
    return masked_attention(q, k, v, mask)


def _nsa_selection_only(m):
    with torch.no_grad():  # gates: compressed 0, selected 1, window 0
        m.gate.bias.copy_(torch.tensor([-float("inf"), float("inf"), -float("inf")]))
    return m


FULL_BUDGET = {  # (method, kwargs covering everything, causal settings)
    "sliding_window": (dict(window=T), (False, True)),
    "bigbird": (dict(block_size=8, num_window_blocks=2 * 8 + 1, num_random_blocks=0), (False, True)),
    "minference-a_shape": (dict(pattern="a_shape", num_sink=0, window=T), (True,)),
    "minference-vertical_slash": (dict(pattern="vertical_slash", vertical_size=T, slash_size=1), (True,)),
    "minference-block_sparse": (dict(pattern="block_sparse", block_size=8, top_k_blocks=8), (True,)),
    "nsa": (dict(block_size=8, num_selected=8, window=4, compress_block=8, compress_stride=4), (True,)),
    "sparsek": (dict(k=T, window=3), (True,)),
}


@pytest.mark.parametrize("case", list(FULL_BUDGET))
def test_full_budget_is_exact_attention(case):
    name = case.split("-")[0]
    kw, settings = FULL_BUDGET[case]
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16)
    for impl in methods.load(name, **kw).impls:
        m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl=impl, **kw).double()
        if name == "nsa":
            _nsa_selection_only(m)
        for causal in settings:
            torch.testing.assert_close(m(q, k, v, causal=causal), exact(q, k, v, causal),
                                       rtol=1e-9, atol=1e-10)


SMALL = {  # budgets that really drop pairs at T = 63
    "sliding_window": dict(window=9),
    "bigbird": dict(block_size=8, num_window_blocks=3, num_global_blocks=2, num_random_blocks=1),
    "minference": dict(pattern="vertical_slash", forced_sink=2, forced_local=4, vertical_size=6, slash_size=6),
    "minference-lines": dict(pattern="vertical_slash", forced_sink=2, forced_local=4, vertical_size=6, slash_size=6,
                             slash_mode="lines"),
    "minference-a": dict(pattern="a_shape", num_sink=4, window=8),
    "minference-b": dict(pattern="block_sparse", block_size=8, top_k_blocks=2),
    "nsa": dict(block_size=8, num_selected=2, window=8, compress_block=8, compress_stride=4),
    "sparsek": dict(k=5, window=6, query_chunk=10),
}


@pytest.mark.parametrize("case", list(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_equals_reference_on_cpu(case, dtype):
    name = case.split("-")[0]
    probe = methods.load(name, **SMALL[case])
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16, dtype=torch.float32)
    kpm = torch.ones(2, T, dtype=torch.bool)
    kpm[1, 50:] = False
    for fast_impl, causal, pad in itertools.product(probe.impls[1:], (False, True), (None, kpm)):
        if not (probe.supports_causal if causal else probe.supports_noncausal):
            continue
        m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl=fast_impl, **SMALL[case])
        ref = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl="reference", **SMALL[case])
        ref.load_state_dict(m.state_dict())
        with torch.no_grad():
            got = m(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, key_padding_mask=pad)
            want = ref(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, key_padding_mask=pad)
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        if m.last_density is not None and fast_impl == "gather":
            assert m.last_density == pytest.approx(ref.last_density)
        if fast_impl == "triton" and (pad is None or name in ("sliding_window", "bigbird")):
            assert m.last_path == "triton"  # the kernel ran (in Triton's interpreter here)
            assert m.last_density >= ref.last_density - 1e-9  # whole tiles: at least the pairs


DEFAULTS_4K = ["sliding_window", "bigbird", "minference", "nsa", "sparsek"]


@pytest.mark.parametrize("name", DEFAULTS_4K)
def test_default_budgets_at_4k_are_sparse_and_counted(name):
    n = 4096
    m = methods.load(name, num_heads=2, num_kv_heads=2, head_dim=16, impl="reference")
    causal = not m.supports_noncausal or name == "bigbird"
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=n, D=16, dtype=torch.float32)
    with torch.no_grad():
        m(q, k, v, causal=causal)
    budget = m.cost(n, n, causal).density
    # MInference's official 64-wide slash ranges make its budget a loose bound: its count is sparse
    assert (m.last_density if name == "minference" else budget) < 0.75, (name, budget)
    assert 0 < m.last_density <= budget + 1e-6, (name, m.last_density, budget)
    if name in ("sliding_window", "bigbird", "sparsek"):  # data-independent: the budget is the count
        assert m.last_density == pytest.approx(budget, rel=1e-6)


def test_sliding_window_density_is_a_count_of_the_mask():
    m = methods.load("sliding_window", num_heads=1, head_dim=8, window=5, impl="reference")
    q = torch.randn(1, 1, 20, 8)
    for causal in (False, True):
        m(q, q, q, causal=causal)
        i = torch.arange(20)
        d = i[:, None] - i[None, :]
        allowed = (d.abs() < 5) & ((d >= 0) if causal else True)
        dense = 210 if causal else 400
        assert m.last_density == pytest.approx(float(allowed.sum()) / dense)
        assert m.cost(20, 20, causal).density == pytest.approx(float(allowed.sum()) / dense)


# ---- BigBird --------------------------------------------------------------------------
def test_bigbird_random_blocks_fixed_in_eval_and_train_and_differ_by_head():
    m = methods.load("bigbird", num_heads=4, head_dim=8, block_size=4, num_random_blocks=2)
    lay_train = m.train().layout(16, 16, False).clone()
    m._layouts.clear()
    lay_eval = m.eval().layout(16, 16, False)
    assert torch.equal(lay_train, lay_eval)
    assert not all(torch.equal(lay_eval[0], lay_eval[h]) for h in range(1, 4))
    other = methods.load("bigbird", num_heads=4, head_dim=8, block_size=4, num_random_blocks=2, seed=1)
    assert not torch.equal(other.layout(16, 16, False), lay_eval)
    # every non-global query block has window + global + its random blocks
    row = lay_eval[0, 5]
    assert int(row.sum()) == 3 + 2 + 2


def test_bigbird_causal_keeps_only_past_blocks():
    m = methods.load("bigbird", num_heads=2, head_dim=8, block_size=4, num_random_blocks=2)
    lay = m.layout(16, 16, True)
    assert not torch.triu(lay, diagonal=1).any()


def test_block_larger_than_the_sequence():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=50, D=8)
    for name, kw in [("bigbird", dict(block_size=128)), ("minference", dict(pattern="block_sparse", block_size=128)),
                     ("nsa", dict(block_size=128, compress_block=64, compress_stride=32))]:
        m = methods.load(name, num_heads=2, head_dim=8, impl="reference", **kw).double()
        if name == "nsa":
            _nsa_selection_only(m)
        torch.testing.assert_close(m(q, k, v, causal=True), exact(q, k, v, True))


@pytest.mark.parametrize("name", ["minference", "nsa", "sparsek"])
def test_causal_only_methods_refuse_non_causal(name):
    m = methods.load(name, num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(AttentionInputError, match="causal only"):
        m(q, q, q, causal=False)


# ---- MInference ------------------------------------------------------------------------
def test_minference_decode_falls_back_to_dense():
    m = methods.load("minference", num_heads=2, head_dim=8, vertical_size=2, slash_size=2)
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=1, tk=40, D=8, dtype=torch.float32)
    out = m(q, k, v, causal=True)
    assert m.last_fallback == "dense"
    torch.testing.assert_close(out, exact(q, k, v, True))


def test_vertical_slash_finds_planted_columns_and_diagonals():
    g = torch.Generator().manual_seed(0)
    n, d = 256, 16
    q = torch.randn(1, 1, n, d, generator=g) * 0.1
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    k[0, 0, 100] = q[0, 0, -64:].mean(0) * 400  # a key every late query attends to
    m = methods.load("minference", num_heads=1, head_dim=d, forced_sink=1, forced_local=1, vertical_size=3,
                     slash_size=2, impl="reference")
    isv, iss = m.vertical_slash_sets(q, k)
    assert isv[0, 0, 100] and isv[0, 0, 0]  # planted column and the forced sink
    assert iss[0, 0, 0]  # the forced nearest diagonal


def test_minference_block_lists_by_chunks_equal_the_layout():
    """The Triton path's lists, built a few query blocks at a time, are the layout's lists;
    the layout built in chunks is the one built at once (causal blocks only; with
    force_diagonal_block each query block keeps its own)."""
    from methods.kernels.block_sparse import layout_to_lists

    q, k, _ = seeded_qkv(B=2, H=4, Hkv=2, T=150, D=16)
    for diag in (False, True):
        m = methods.load("minference", num_heads=4, num_kv_heads=2, head_dim=16, pattern="block_sparse",
                         block_size=16, top_k_blocks=3, force_diagonal_block=diag)
        whole = m.block_layout(q, k)
        m.score_bytes = 1  # one query block at a time
        assert torch.equal(m.block_layout(q, k), whole)
        assert whole.sum(-1).min() >= 1 and not (whole & ~torch.ones_like(whole[0, 0]).tril()).any()
        assert whole.diagonal(dim1=-2, dim2=-1).all() == diag  # the official code does not force it
        for got, want in zip(m.block_lists(q, k), layout_to_lists(whole)):
            assert torch.equal(got, want)


def test_minference_per_head_budgets_equal_each_budget_alone(tmp_path):
    """Heads of different budgets (one top-k of the largest, each head keeping its own): each
    head's verticals, slashes and key blocks are those of a model where every head has its budget."""
    q, k, _ = seeded_qkv(B=2, H=3, Hkv=3, T=150, D=16, dtype=torch.float32)

    def model(heads):
        path = tmp_path / "p.json"
        path.write_text(json.dumps({"num_heads": 3, "heads": heads}))
        return methods.load("minference", pattern="searched", pattern_file=str(path), num_heads=3, head_dim=16,
                            block_size=16, last_q=32)

    vs = [dict(pattern="vertical_slash", forced_sink=min(2, n), forced_local=min(3, m), vertical_size=n, slash_size=m)
          for n, m in ((5, 9), (0, 4), (17, 0))]  # budgets at least the forced sinks and window (no ties)
    bs = [dict(pattern="block_sparse", top_k_blocks=n) for n in (1, 4, 0)]
    for heads, build in ((vs, lambda m: m.vertical_slash_sets(q, k)), (bs, lambda m: (m.block_layout(q, k),))):
        mixed = build(model(heads))
        for h in range(3):
            alone = build(model([heads[h]] * 3))
            for got, want in zip(mixed, alone):
                assert torch.equal(got[:, h], want[:, h]), (heads[h], h)


def test_pattern_search_respects_budget_and_round_trips(tmp_path):
    from tasks.fidelity import structured_qkv

    q, k, v = structured_qkv(1, 3, 3, 256, 16, "cpu", torch.float32, 0, causal=True)
    cands = [dict(pattern="a_shape", num_sink=4, window=w) for w in (16, 64)] + [
        dict(pattern="vertical_slash", forced_sink=4, forced_local=1, vertical_size=vv, slash_size=2) for vv in (8, 32)] + [
        dict(pattern="block_sparse", top_k_blocks=b) for b in (1, 2)]
    m = MInference(num_heads=3, head_dim=16, block_size=32, impl="reference")
    heads = m.calibrate([(q, k), (q.flip(2), k.flip(2))], budget=0.4, candidates=cands)
    assert len(heads) == 3 and all(h["density"] <= 0.4 for h in heads)
    assert all(0 < h["recall"] <= 1 for h in heads)
    assert m.pattern == "searched" and m.heads == heads
    path = tmp_path / "p.json"
    assert minference_main(["--out", str(path), "--budget", "0.3", "--seq-len", "256", "--num-heads", "2",
                            "--head-dim", "16"]) == 0
    data = json.loads(path.read_text())
    assert data["num_heads"] == 2 and len(load_patterns(path, 2)) == 2
    m = methods.load("minference", pattern="searched", pattern_file=str(path), num_heads=2, head_dim=16,
                     impl="reference")
    q2, k2, v2 = seeded_qkv(B=1, H=2, Hkv=2, T=256, D=16, dtype=torch.float32)
    assert torch.isfinite(m(q2, k2, v2, causal=True)).all()
    with pytest.raises(ValueError, match="has 2 heads, the model has 4"):
        methods.load("minference", pattern="searched", pattern_file=str(path), num_heads=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        methods.load("minference", pattern="searched", pattern_file=str(tmp_path / "none.json"))


# ---- SparseK operator ------------------------------------------------------------------
def test_sparsek_operator_is_a_capped_simplex_projection():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 30, generator=g, dtype=F64) * 2
    for k in (1, 3.5, 10, 30):
        p = sparsek(u, k)
        assert ((p >= 0) & (p <= 1)).all()
        torch.testing.assert_close(p.sum(-1), torch.full((5,), float(k), dtype=F64))
    valid = torch.rand(5, 30, generator=g) > 0.3
    p = sparsek(u, 4, valid)
    assert (p[~valid] == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.minimum(valid.sum(-1).to(F64), torch.tensor(4.0, dtype=F64)))
    # the projection is the closest point of the set: no feasible perturbation is closer
    p = sparsek(u[:1], 3)
    for _ in range(50):
        d = torch.randn(30, generator=g, dtype=F64) * 0.05
        d -= d.mean()
        alt = p[0] + d
        if ((alt >= 0) & (alt <= 1)).all():
            assert (alt - u[0]).norm() >= (p[0] - u[0]).norm() - 1e-12


def test_sparsek_operator_gradcheck():
    u = torch.randn(3, 12, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 9:] = False
    assert torch.autograd.gradcheck(lambda x: sparsek(x, 4, valid), (u,), eps=1e-6, atol=1e-5)


def test_sparsek_gather_gradients_equal_reference_by_checkpointed_chunks():
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=8, k=5, window=6)
    m = methods.load("sparsek", impl="gather", query_chunk=10, **kw).double()  # 4 chunks, each recomputed
    ref = methods.load("sparsek", impl="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    grads = []
    for mod in (m, ref):
        q, k, v = (t.clone().requires_grad_() for t in seeded_qkv(B=1, H=4, Hkv=2, T=37, D=8))
        mod(q, k, v, causal=True).pow(2).sum().backward()
        grads.append([q.grad, k.grad, v.grad, mod.score.weight.grad, mod.score.bias.grad])
    assert m.last_path == "gather"
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_sparsek_trains_end_to_end_through_the_soft_mask():
    m = methods.load("sparsek", num_heads=2, head_dim=8, k=4, window=3).double()
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=30, D=8)
    m(q, k, v, causal=True).pow(2).sum().backward()
    assert m.score.weight.grad is not None and m.score.weight.grad.abs().sum() > 0


def test_nsa_triton_selection_by_row_chunks_equals_reference():
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, **SMALL["nsa"])
    m, ref = methods.load("nsa", impl="triton", **kw), methods.load("nsa", impl="reference", **kw)
    ref.load_state_dict(m.state_dict())
    m.importance_bytes = 1  # the smallest chunk: 64 query rows at a time, three chunks here
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=150, D=16)
    with torch.no_grad():
        got, want = m(q, k, v, causal=True), ref(q, k, v, causal=True)
    assert m.last_path == "triton"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nsa_triton_training_has_the_reference_gradients():
    """impl=triton with gradients: the selection's and the window's backward kernels, the
    compressed branch by autograd; every input and parameter gradient as the reference's."""
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, **SMALL["nsa"])
    m, ref = methods.load("nsa", impl="triton", **kw), methods.load("nsa", impl="reference", **kw)
    ref.load_state_dict(m.state_dict())
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=4, Hkv=2, T=70, D=16, dtype=torch.float32))
    got, want = m(q, k, v, causal=True), ref(q, k, v, causal=True)
    assert m.last_path == "triton"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    names = ["q", "k", "v"] + [n for n, _ in m.named_parameters()]
    grads = [torch.autograd.grad(o, [q, k, v, *mod.parameters()], g) for o, mod in ((got, m), (want, ref))]
    for name, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_nsa_gradients_reach_every_branch():
    m = methods.load("nsa", num_heads=2, head_dim=8, block_size=8, num_selected=2, window=8,
                     compress_block=8, compress_stride=4).double()
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=1, H=2, Hkv=1, T=40, D=8))
    m(q, k, v, causal=True).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- GPU, bf16 -------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(SMALL))
def test_fast_path_equals_reference_on_gpu_bf16(case):
    name = case.split("-")[0]
    probe = methods.load(name, **SMALL[case])
    n = 1000
    q, k, v = (t.cuda().bfloat16() for t in seeded_qkv(B=1, H=4, Hkv=2, T=n, D=64, dtype=torch.float32))
    kw = {**SMALL[case]}
    for impl in probe.impls[1:]:
        m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=64, impl=impl, **kw).cuda()
        ref = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=64, impl="reference", **kw).cuda()
        ref.load_state_dict(m.state_dict())
        causal = probe.supports_causal
        with torch.no_grad():
            got, want = m(q, k, v, causal=causal), ref(q, k, v, causal=causal)
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
        assert err < 3e-2, (impl, err)
        if impl in ("flex", "triton"):
            assert m.real_kernel, impl


@pytest.mark.parametrize("T,chunk", [(80, 16), (300, 192)])  # five chunks of one tile; two of three tiles
def test_sparsek_kernel_by_chunks_equals_reference(T, chunk):
    """impl=triton over several query chunks and tiles of 64 queries (each tile's candidates
    start where its lowest k-th best score admits them)."""
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=7, window=9, query_chunk=10)
    m, ref = methods.load("sparsek", impl="triton", **kw), methods.load("sparsek", impl="reference", **kw)
    ref.load_state_dict(m.state_dict())
    m.kernel_chunk = chunk
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=T, D=16)
    with torch.no_grad():
        got, want = m(q, k, v, causal=True), ref(q, k, v, causal=True)
    assert m.last_path == "triton" and m.last_density == pytest.approx(ref.last_density)
    cfg = m.last_kernel_config  # what runner=kernel records as details.kernel_config
    assert cfg["path"] == "triton" and cfg["query_chunk"] == max(chunk, 10) and cfg["tile_rows"] == 64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("bisect", ["kernel", "pytorch"])
def test_sparsek_fast_selection_equals_the_full_one(padded, bisect, monkeypatch):
    """The gather path's forward selection (sorted shared candidates, binary searches; the
    bisection in one kernel or by PyTorch passes; newer candidates below the shared k-th best
    left out of the top-k pool) gives the same keys and weights as the full row-wise bisection,
    chunk by chunk."""
    from methods.kernels import sparsek as sparsek_kernels

    if bisect == "pytorch":
        monkeypatch.setattr(sparsek_kernels, "usable", lambda q: False)
    T, w, c = 300, 16, 64
    m = methods.load("sparsek", num_heads=4, num_kv_heads=2, head_dim=16, k=20, window=w, query_chunk=c)
    m.bisect_in_interpreter = bisect == "kernel"
    _, k, _ = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16, dtype=torch.float32)
    kpm = None
    if padded:
        kpm = torch.ones(2, T, dtype=torch.bool)
        kpm[1, 200:] = False
    u = m.scores(k).float()

    def dense(sel):
        idx, wsel, ok = sel
        return torch.zeros(*idx.shape[:-1], T).scatter_add_(-1, idx, wsel * ok)

    for r0 in (0, w // 2, w + 3, 150, T - c):  # no candidates yet, a few, many
        rows = torch.arange(r0, min(r0 + c, T))
        want = dense(m._soft_mask_rows(u, rows, T, kpm))
        got = dense(m._soft_mask_rows_fast(u, rows, T, kpm))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.2, 3.0])  # most candidates fractional (weights in (0, 1)); few
@pytest.mark.parametrize("iters", [None, 20])
def test_sparsek_kernel_plan_is_each_rows_kth_best_threshold_and_pairs(scale, iters, monkeypatch):
    """The kernel path's selection (``SparseK._kernel_plan``: one kernel per chunk, in the
    interpreter here): each row's k-th best candidate score (-inf-like with fewer than k), its
    tau (sum_j clip(u_j - tau, 0, 1) = k over the candidates j <= row - window, computed here
    from an independent sort), and the pairs attended. Chunks with no candidates, fewer than
    k, shared parts shorter than k, and newer lists longer than the kernel's tile of 64.
    tau is exact (the root of f's linear piece once no breakpoint is inside the bracket): with
    20 halvings, where a bisection alone would stop 1e-6 from it, the mass is k to 1e-9."""
    from methods.kernels import sparsek as kern

    if iters is not None:
        monkeypatch.setattr(kern, "select_iters", lambda dtype: iters)
    T, w, kk = 400, 16, 20
    m = methods.load("sparsek", num_heads=4, num_kv_heads=2, head_dim=16, k=kk, window=w)
    u = torch.randn(2, 2, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    shared = None
    for first, c in ((0, 10), (w + 3, 30), (30, 150), (150, 100), (T - 130, 130)):
        plan = m._kernel_plan(u, shared, first, c, T)
        shared = plan["shared"]  # grown chunk by chunk, as attend does
        s0 = max(first - w + 1, 0)
        torch.testing.assert_close(plan["sv"], u[..., :s0].sort(-1).values, rtol=0, atol=0)
        assert bool((torch.gather(u, -1, plan["order"].long()) == plan["sv"]).all())
        rows = torch.arange(first, first + c)
        cand = (torch.arange(T) <= rows.view(-1, 1) - w).view(1, 1, c, T)
        vals = torch.where(cand, u.unsqueeze(2), -float("inf")).sort(-1, descending=True).values
        n = cand.sum(-1).expand(2, 2, -1)
        many = n > kk
        torch.testing.assert_close(plan["kth"][many], vals[..., kk - 1][many], rtol=0, atol=0)
        assert bool((plan["kth"][~many] < -1e29).all()) and bool((plan["tau"][~many] < -1e29).all())
        tau = plan["tau"].unsqueeze(-1)
        mass = torch.where(cand, (u.unsqueeze(2) - tau).clamp(0, 1), 0.0).sum(-1)
        torch.testing.assert_close(mass[many], torch.full_like(mass[many], float(kk)), rtol=0, atol=1e-9)
        want_pairs = torch.where(many, kk, n).sum()  # distinct scores: the best k, or every candidate
        assert int(plan["pairs"]) == int(want_pairs)


@pytest.mark.parametrize("name,kw", [("sliding_window", dict(window=9)),
                                     ("bigbird", dict(block_size=8, num_random_blocks=1))])
def test_triton_path_trains_with_the_references_gradients(name, kw):
    """Sliding window and BigBird keep impl=triton under autograd (the block-sparse kernel has a
    backward): gradients equal the reference's."""
    q, k, v = (t.requires_grad_() for t in seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16, dtype=torch.float32))
    fast = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl="triton", **kw)
    ref = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl="reference", **kw)
    for causal in (False, True):
        out = fast(q, k, v, causal=causal)
        assert fast.last_path == "triton"
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref(q, k, v, causal=causal), (q, k, v), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_minference_calibrate_switches_to_the_searched_heads():
    """calibrate(samples) picks, per head, the candidate with the most causal attention mass
    within the budget (checked here against that mass computed directly) and then runs it."""
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=256, D=16, dtype=torch.float32)
    m = methods.load("minference", num_heads=2, head_dim=16, impl="reference")
    heads = m.calibrate([(q, k)], budget=0.5)
    assert m.pattern == "searched" and len(heads) == 2 and all(h["density"] <= 0.5 for h in heads)
    p = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(
        torch.ones(256, 256, dtype=torch.bool).triu(1), float("-inf")), -1)
    keys = m.computed_keys(q, k, causal=True)
    for h in range(2):
        assert float((p[0, h] * keys[0, h]).sum(-1).mean()) == pytest.approx(heads[h]["recall"], abs=1e-4)
    assert torch.isfinite(m(q, k, v, causal=True)).all()


def test_nsa_chosen_bits_pack_the_selected_blocks():
    """The flex path's packed selection (8 blocks a byte, so that the mask indexes fewer than 2^31
    elements at 128k) holds exactly the chosen blocks: unpacked here bit by bit, against a set
    built from the indices; -1 (no block) sets nothing, and a count not a multiple of 8 works."""
    from methods.nsa import NSA

    g = torch.Generator().manual_seed(0)
    nsel = 21
    sel = torch.stack([torch.randperm(nsel, generator=g)[:5] for _ in range(2 * 3 * 7)]).view(2, 3, 7, 5)
    sel[0, 1, 2, 3:] = -1
    bits = NSA.chosen_bits(sel, nsel)
    assert bits.dtype == torch.uint8 and bits.shape == (2, 3, 7, 3)
    for idx in itertools.product(range(2), range(3), range(7)):
        want = {int(j) for j in sel[idx] if j >= 0}
        got = {j for j in range(nsel) if (int(bits[idx][j // 8]) >> (j % 8)) & 1}
        assert got == want, idx


def test_sparsek_kernel_path_reads_nothing_back_to_the_host_between_its_kernels(monkeypatch):
    """impl=triton's chunk loop (the shared part merged in, the newer part cut by a count the
    kernels read, the pairs summed on the device) calls no read-back between its kernels: the
    only one is the density at the end of the call. The kernels themselves run unspied (the
    interpreter reads its tensors on the host)."""
    from methods.kernels import sparsek as kern

    state = {"inside": False, "reads": []}

    def spy(name, original):
        def f(self, *a, **kw):
            if not state["inside"]:
                state["reads"].append(name)
            return original(self, *a, **kw)
        return f

    def unspied(fn):
        def f(*a, **kw):
            state["inside"] = True
            try:
                return fn(*a, **kw)
            finally:
                state["inside"] = False
        return f

    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=7, window=9)
    m = methods.load("sparsek", impl="triton", **kw)
    m.kernel_chunk = 64
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=300, D=16)
    with torch.no_grad():
        want = m(q, k, v, causal=True)
    monkeypatch.setattr(kern, "sparsek_select", unspied(kern.sparsek_select))
    monkeypatch.setattr(kern, "sparsek_tile_attention", unspied(kern.sparsek_tile_attention))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    with torch.no_grad():
        got = m(q, k, v, causal=True)
    assert m.last_path == "triton" and state["reads"] == ["__float__"]  # last_density, once
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("slope", [0.0, 0.3])  # the position term: more scores near each other, more free pairs
def test_sparsek_kernel_gradients_equal_the_reference(slope):
    """impl=triton under autograd (the tile kernels' backward, several chunks of several tiles,
    grouped KV heads): the gradients of q, k, v and of the scoring network (through the
    SparseK weights) equal those of impl=reference, which differentiates the operator on full
    rows (SparseKOp) and a materialised soft mask."""
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, k=7, window=9, position_slope=slope)
    m, ref = methods.load("sparsek", impl="triton", **kw), methods.load("sparsek", impl="reference", **kw)
    ref.load_state_dict(m.state_dict())
    m.kernel_chunk = 64
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=150, D=16, dtype=torch.float32)
    go = torch.randn(2, 4, 150, 16, generator=torch.Generator().manual_seed(7))
    grads = []
    for mod in (m, ref):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mod(*x, causal=True)
        (out * go).sum().backward()
        grads.append([t.grad for t in x] + [mod.score.weight.grad, mod.score.bias.grad])
    assert m.last_path == "triton" and m.last_density == pytest.approx(ref.last_density)
    for name, got, want in zip(("q", "k", "v", "w", "b"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    assert float(grads[1][3].abs().max()) > 1e-3  # the scores' gradient is not vacuous


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
def test_sparsek_kernel_forward_and_gradients_on_gpu(dtype, tol):
    """The compiled kernels (not the interpreter: real atomics, real tiles) at a size with many
    chunks and tiles: output and the gradients of q, k, v and the scorer against impl=reference
    in float64 on the same inputs (rounded to the dtype: the selection moves with a 0.4% change
    of k), relative to each tensor's largest entry. float32: the kernels' dots run in TF32;
    bfloat16: the scores stay float32 (SparseK.scores), the attention is bf16 (on the CPU the
    gather path's errors are 0.3-0.7% here)."""
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=64, k=32, window=64, position_slope=0.1)
    m = methods.load("sparsek", impl="triton", **kw).cuda().to(dtype)
    ref = methods.load("sparsek", impl="reference", **kw).cuda().double()
    ref.load_state_dict(m.state_dict())
    m.kernel_chunk = 256
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=1500, D=64, dtype=torch.float32)
    go = torch.randn(1, 4, 1500, 64, generator=torch.Generator().manual_seed(7))
    results = []
    for mod, dt in ((m, dtype), (ref, torch.float64)):
        x = [t.cuda().to(dtype).to(dt).requires_grad_() for t in (q, k, v)]  # the same (rounded) inputs
        out = mod(*x, causal=True)
        (out * go.cuda().to(dt)).sum().backward()
        results.append([out] + [t.grad for t in x] + [mod.score.weight.grad])
    assert m.last_path == "triton"
    for name, got, want in zip(("out", "q", "k", "v", "w"), *results):
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err < tol, (name, err)


@pytest.mark.parametrize("impl", ["reference", "gather"])
def test_sparsek_in_bfloat16_keeps_its_scores_in_float32(impl):
    """A bfloat16 SparseK with a position term (u_j up to 150 here) selects and weights keys as
    the float64 one does: the scores are computed in float32 (in bf16, u rounded to steps of 1
    above 128 moved the weights clip(u - tau, 0, 1) wholesale: an error of 0.15 to 0.19)."""
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=64, k=32, window=64, position_slope=0.1)
    m = methods.load("sparsek", impl=impl, **kw).to(torch.bfloat16)
    ref = methods.load("sparsek", impl="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    assert m.scores(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)).dtype == torch.float32
    q, k, v = seeded_qkv(B=1, H=4, Hkv=2, T=1500, D=64, dtype=torch.float32)
    with torch.no_grad():
        got = m(*(t.bfloat16() for t in (q, k, v)), causal=True).double()
        want = ref(*(t.bfloat16().double() for t in (q, k, v)), causal=True)  # the same rounded inputs
    assert float((got - want).abs().max() / want.abs().max()) < 0.02
