"""The attention phase the decode-time selectors share (``methods.decode.select_then_attend``):
its reference path and its Triton gather-kernel path (CPU under TRITON_INTERPRET=1, fp32,
small shapes) against a softmax over the chosen keys written here; every selector's decode
through the kernel path against its reference path; and, on CUDA, no host synchronisation."""
import math

import pytest
import torch

import methods.decode as md
from methods.decode import KVCache, Selection, select_then_attend, top_k_selection
from methods.kernels import decode as kdecode
from tests.decode_helpers import HKV, B, D, G, H, load, qkv, softmax_attend

needs_kernel = pytest.mark.skipif(not kdecode.usable(torch.zeros(1)) and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel's tensors: CUDA, else the interpreter's CPU
TOL = 2e-3 if DEV == "cuda" else 2e-5  # fp32 through tl.dot is TF32 on the GPU


def _filled(S, dtype=torch.float32, seed=0, capacity=None, device="cpu"):
    _, k, v = qkv(S, seed=seed, dtype=dtype)
    cache = KVCache(B, HKV, D, capacity or S + 5, dtype, device)
    cache.append(k.to(device), v.to(device))
    return cache, k, v


def _selection(S, n, seed=1, pad=True, group="overlap"):
    """Distinct slots per query head (a random permutation's first n) and, with ``pad``, the
    last two of each head marked as padding; ``group``: the heads of a KV head's group choose
    independently ("overlap"), the same slots ("same") or disjoint ones ("disjoint")."""
    g = torch.Generator().manual_seed(seed)
    if group == "overlap":
        slots = torch.stack([torch.stack([torch.randperm(S, generator=g)[:n] for _ in range(H)]) for _ in range(B)])
    elif group == "same":
        slots = torch.stack([torch.randperm(S, generator=g)[:n] for _ in range(B * HKV)]).view(B, HKV, 1, n)
        slots = slots.expand(B, HKV, G, n).reshape(B, H, n)
    else:
        slots = torch.stack([torch.randperm(S, generator=g)[:G * n] for _ in range(B * HKV)]).view(B, H, n)
    valid = torch.ones(B, H, n, dtype=torch.bool)
    if pad:
        valid[..., -2:] = False
        slots[..., -1] = S + 3  # padding may point anywhere: past the held keys too
    return Selection(slots=slots, valid=valid if pad else None)


def _expected(q, k, v, sel):
    out = torch.zeros(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            n = sel.slots.shape[-1] if sel.slots is not None else k.shape[2]
            idx = range(k.shape[2]) if sel.slots is None else [
                int(sel.slots[b, h, j]) for j in range(n) if sel.valid is None or sel.valid[b, h, j]]
            out[b, h, 0] = softmax_attend(q[b, h, 0].double(), k[b, h // G].double(), v[b, h // G].double(), idx)
    return out


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=needs_kernel)])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("group", ["overlap", "same", "disjoint"])
def test_select_then_attend_is_softmax_over_the_chosen_keys(impl, pad, group):
    S, dev = 37, DEV if impl == "kernel" else "cpu"
    tol = TOL if impl == "kernel" else 2e-5
    cache, k, v = _filled(S, device=dev)
    q = qkv(1, seed=5, dtype=torch.float32)[0]
    sel = _selection(S, 9, pad=pad, group=group)
    on = Selection(slots=sel.slots.to(dev), valid=None if sel.valid is None else sel.valid.to(dev))
    out = select_then_attend(q.to(dev), cache, on, impl=impl)
    assert out.shape == (B, H, 1, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.cpu().double(), _expected(q, k, v, sel), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=needs_kernel)])
def test_select_then_attend_every_key_and_another_query(impl):
    S, dev = 20, DEV if impl == "kernel" else "cpu"
    tol = TOL if impl == "kernel" else 2e-5
    cache, k, v = _filled(S, device=dev)
    q, q2 = qkv(1, seed=5, dtype=torch.float32)[0], qkv(1, seed=6, dtype=torch.float32)[0]
    torch.testing.assert_close(select_then_attend(q.to(dev), cache, Selection(), impl=impl).cpu().double(),
                               _expected(q, k, v, Selection()), atol=tol, rtol=tol)
    sel = _selection(S, 6, pad=False)
    out = select_then_attend(q.to(dev), cache, Selection(slots=sel.slots.to(dev)), q=q2.to(dev), impl=impl)
    torch.testing.assert_close(out.cpu().double(), _expected(q2, k, v, sel), atol=tol, rtol=tol)


def test_top_k_selection_takes_the_largest_scores_and_expands_pages():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(B, H, 7, generator=g)
    sel = top_k_selection(scores, 3, page_size=4, length=26, clamped=False)
    for b in range(B):
        for h in range(H):
            pages = sorted(range(7), key=lambda p: -float(scores[b, h, p]))[:3]
            want = {p * 4 + j for p in pages for j in range(4) if p * 4 + j < 26}
            got = {int(s) for s, ok in zip(sel.slots[b, h], sel.valid[b, h], strict=True) if ok}
            assert got == want
    assert top_k_selection(scores, 99).slots.shape == (B, H, 7)  # at most all


def test_bad_impl_is_named():
    cache, _, _ = _filled(8)
    with pytest.raises(ValueError, match="impl must be one of"):
        select_then_attend(qkv(1, dtype=torch.float32)[0], cache, Selection(), impl="fast")


SELECTORS = [
    ("quest", dict(page_size=4, token_budget=12)),
    ("sparq", dict(r=4, k=10)),
    ("loki", dict(d=4, k=10)),
    ("double_sparsity", dict(group_factor=4, token_budget=10)),
    ("tidal_decode", dict(token_budget=10)),
    ("retrieval_attention", dict(top_k=6, num_sink=4, window=8, nprobe=2, query_links=2)),
    ("squeezed_attention", dict(percent_clusters=20, sparsity=0.5, observation_window=8)),
    ("twilight", dict(token_budget=16, page_size=4, top_p=0.9)),
]


@needs_kernel
@pytest.mark.parametrize("name,kw", SELECTORS, ids=[s[0] for s in SELECTORS])
def test_each_selector_decodes_alike_through_the_gather_kernel(name, kw, monkeypatch):
    """The decode of each selector with the kernel path forced (as on CUDA) equals its reference
    path step for step (fp32; the same selections, so the same keys)."""
    L, T = 48, 51
    q, k, v = (t.to(DEV, torch.float32) for t in qkv(T, seed=2, anisotropic=True))
    outs = {}
    for fits in (False, True):
        monkeypatch.setattr(md, "_kernel_fits", lambda q, fits=fits: fits)
        m = load(name, **kw).to(DEV)
        if m.needs_calibration:
            cq, ck, _ = qkv(40, seed=9, dtype=torch.float32, anisotropic=True)
            m.calibrate([(cq.to(DEV), ck.to(DEV))])
        cache = m.new_cache(B, T, torch.float32, DEV)
        m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
        outs[fits] = [m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache) for i in range(L, T)]
        if fits:
            assert m.last_step["positions"] is not None or name == "squeezed_attention"
    for ref, ker in zip(outs[False], outs[True], strict=True):
        torch.testing.assert_close(ker, ref, atol=TOL, rtol=TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kw", [("quest", dict(page_size=16, token_budget=256)), ("sparq", dict(k=256)),
                                     ("tidal_decode", dict(token_budget=256))])
def test_select_and_attend_on_cuda_do_not_synchronise(name, kw):
    L = 4096
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(L + 2, seed=1))
    m = load(name, **kw).cuda()
    cache = m.new_cache(B, L + 2, torch.bfloat16, "cuda")
    m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    m.append(cache, k[:, :, L:L + 1], v[:, :, L:L + 1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sel = m.select(q[:, :, L:L + 1], cache)
        out = m.attend_selected(q[:, :, L:L + 1], cache, sel)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = md.select_then_attend(q[:, :, L:L + 1], cache, sel, impl="reference")
    if name != "sparq":
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert math.isfinite(float(out.float().abs().sum()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,extra,captured", [("dense", [], True), ("quest", ["method.token_budget=64"], True),
                                                   ("squeezed_attention", [], True)])
def test_decode_runner_times_the_step_from_a_cuda_graph(method, extra, captured, compose_cfg):
    """On CUDA the runner also replays the last step's select + attend from a CUDA graph (a path
    that synchronises with the host would say why not in details.graph)."""
    from runners import run

    cfg = compose_cfg("runner=decode", f"method={method}", "device=cuda", "dtype=bfloat16", "model.num_heads=8",
                      "model.num_kv_heads=2", "model.head_dim=64", "runner.seq_lens=[1024]", "runner.steps=4",
                      "runner.warmup=1", *extra, tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    if captured:
        g = rec.latency_ms["decode_step_graph"]
        assert 0 < g["p50"] <= rec.latency_ms["decode_step"]["p50"]
    else:
        assert "decode_step_graph" not in rec.latency_ms and rec.details["graph"].startswith("not captured")
