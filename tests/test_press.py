"""KV-cache presses (methods.press and its methods) on hand-built caches: the tokens each press
keeps, computed here from the paper's rule with loops; decode on the compressed cache against
softmax over the kept keys written here; ratio bounds; bytes held measured after compaction;
misuse refused; runner=decode with a press."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from methods.decode import SinkWindowAdapter
from runners import run
from runners.records import read

PRESSES = ["snapkv", "h2o", "random_press", "streaming_llm_press", "pyramidkv"]
B, H, HKV, D, L = 2, 4, 2, 8, 24
G = H // HKV


def _load(name, **kw):
    if name in ("snapkv", "pyramidkv"):
        kw.setdefault("window_size", 4)
    return methods.load(name, num_heads=H, head_dim=D, num_kv_heads=HKV, **kw)


def _qkv(T=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g, dtype=torch.float64).float() for n in (H, HKV, HKV)]


def _pressed(name, T=L, spare=0, **kw):
    m = _load(name, **kw)
    q, k, v = _qkv(T)
    cache = m.new_cache(B, T + spare)
    m.prefill(q, k, v, cache)
    return m, cache, (q, k, v)


def _kept(cache):
    return [[set(cache.head_positions()[b, h].tolist()) for h in range(HKV)] for b in range(B)]


def _probs(q, k, b, h, i, T):
    """Causal softmax of query head h at position i over keys 0..T-1 (fp64 lists)."""
    s = [float(q[b, h, i].double() @ k[b, h // G, j].double()) / math.sqrt(D) if j <= i else -math.inf
         for j in range(T)]
    mx = max(s)
    e = [math.exp(x - mx) for x in s]
    return [x / sum(e) for x in e]


def _top(scores, n):
    return set(sorted(range(len(scores)), key=lambda j: -scores[j])[:n])


# ---- which tokens each press keeps -----------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_snapkv_keeps_the_window_and_the_pooled_votes(ratio):
    """SnapKV (Listing 1): votes of the last w queries for prefix token j, averaged over a
    kernel of 5 with zero padding, the group's heads averaged; the window always kept."""
    m, cache, (q, k, _) = _pressed("snapkv", ratio=ratio)
    w, n = 4, int(L * (1 - ratio))
    for b in range(B):
        for hk in range(HKV):
            pooled = [0.0] * (L - w)
            for h in range(hk * G, (hk + 1) * G):
                votes = [0.0] * (L - w)
                for i in range(L - w, L):
                    p = _probs(q, k, b, h, i, L)
                    for j in range(L - w):
                        votes[j] += p[j]
                for j in range(L - w):
                    pooled[j] += sum(votes[j + t] for t in range(-2, 3) if 0 <= j + t < L - w) / 5 / G
            want = set(range(L - w, L)) | _top(pooled, n - w)
            assert _kept(cache)[b][hk] == want
    assert m.last_kept == n and cache.length == n


def test_h2o_keeps_recent_tokens_and_heavy_hitters():
    """H2O: accumulated causal attention over every prefill query, the group's heads averaged;
    half the budget the most recent tokens, half the heavy hitters among the rest."""
    _, cache, (q, k, _) = _pressed("h2o", ratio=0.5)
    n = 12
    r = n // 2
    for b in range(B):
        for hk in range(HKV):
            acc = [0.0] * L
            for h in range(hk * G, (hk + 1) * G):
                for i in range(L):
                    for j, p in enumerate(_probs(q, k, b, h, i, L)):
                        acc[j] += p / G
            want = set(range(L - r, L)) | _top(acc[:L - r], n - r)
            assert _kept(cache)[b][hk] == want


def test_streaming_llm_press_keeps_sinks_and_recent():
    _, cache, _ = _pressed("streaming_llm_press", ratio=0.75, num_sink=2)  # 6 of 24: 2 sinks + 4 recent
    for b in range(B):
        for hk in range(HKV):
            assert _kept(cache)[b][hk] == {0, 1, 20, 21, 22, 23}


def test_random_press_draws_distinct_tokens_per_head_repeatably():
    _, c1, _ = _pressed("random_press", ratio=0.5, seed=3)
    _, c2, _ = _pressed("random_press", ratio=0.5, seed=3)
    _, c3, _ = _pressed("random_press", ratio=0.5, seed=4)
    pos = c1.head_positions()
    assert pos.shape == (B, HKV, 12) and bool((pos.diff(dim=-1) > 0).all())  # distinct, sorted
    assert bool((pos >= 0).all() & (pos < L).all())
    assert torch.equal(pos, c2.head_positions()) and not torch.equal(pos, c3.head_positions())
    flat = [tuple(pos[b, h].tolist()) for b in range(B) for h in range(HKV)]
    assert len(set(flat)) > 1  # the heads draw independently


@pytest.mark.parametrize("ratio,layers,beta,want", [
    (0.5, 4, 2.0, [18, 14, 10, 6]),  # a = 12: min 6, max 18, steps 4
    (0.5, 4, 20.0, [20, 15, 9, 4]),  # max 23.4 >= L - w = 20: max = 20, min = 24 - 20 = 4, steps 16/3
    (0.75, 4, 20.0, [6, 6, 6, 6]),  # a = 6: min 0.3 < w = 4: SnapKV's budget everywhere (kvpress's fallback)
    (0.5, 1, 2.0, [18]),
])
def test_pyramidkv_budgets_decrease_with_depth(ratio, layers, beta, want):
    """kvpress's PyramidKV budget at L = 24, window 4 (worked out in the parameters); each layer
    keeps SnapKV's choice at its budget."""
    for i in range(layers):
        m, cache, _ = _pressed("pyramidkv", ratio=ratio, num_layers=layers, layer_idx=i, beta=beta)
        _, snap, _ = _pressed("snapkv", ratio=1 - (want[i] + 0.5) / L)  # SnapKV keeping want[i] tokens
        assert cache.length == want[i] and torch.equal(cache.head_positions(), snap.head_positions())


# ---- decode on the compressed cache ----------------------------------------------------------
@pytest.mark.parametrize("name", PRESSES)
def test_decode_on_the_compressed_cache_is_softmax_over_the_kept_keys(name):
    m, cache, (q, k, v) = _pressed(name, spare=2)
    kept = _kept(cache)
    g = torch.Generator().manual_seed(9)
    for step in range(2):
        qt, kt, vt = (torch.randn(B, n, 1, D, generator=g) for n in (H, HKV, HKV))
        out = m.decode(qt, kt, vt, cache)
        k = torch.cat([k, kt], 2)
        v = torch.cat([v, vt], 2)
        for b in range(B):
            for h in range(H):
                keep = sorted(kept[b][h // G] | set(range(L, L + step + 1)))
                kk, vv = k[b, h // G, keep].double(), v[b, h // G, keep].double()
                p = torch.softmax(kk @ qt[b, h, 0].double() / math.sqrt(D), 0)
                torch.testing.assert_close(out[b, h, 0].double(), p @ vv, rtol=1e-5, atol=1e-5)
                assert sorted(m.last_step["positions"][b, h].tolist()) == keep
        assert m.last_step["kv_bytes"] == 2 * B * HKV * (len(kept[0][0]) + step + 1) * D * 4


@pytest.mark.parametrize("name", [*PRESSES, "razor_attention", "fastgen"])
def test_a_decode_step_runs_sdpa_without_cudnn_and_reads_nothing_back(name, monkeypatch):
    """Inside a model (models.hf_decode: step_record "bytes") a decode step calls SDPA with
    cuDNN's backend off (cuDNN builds an execution graph per key length: PyramidKV's layers,
    each with its own length growing every step, took ~600 ms a step on an H200, SnapKV ~50)
    and reads no tensor back to the host; PyramidKV's deeper layer, RazorAttention's and FastGen's
    per-head rows included. The spied step gives the same output as an unspied one."""
    if name == "razor_attention":
        m = _razor(ratio=0.8, min_window=6, retrieval_heads=[1])  # per-head rows
    elif name == "fastgen":
        m = methods.load("fastgen", num_heads=H, head_dim=D, num_kv_heads=HKV, recovery=0.7)  # heads differ: per-head rows
        special = torch.zeros(B, L, dtype=torch.bool)
        special[:, 0] = True
        m.set_token_classes(special, torch.zeros(B, L, dtype=torch.bool))
    else:
        m = _load(name, **({"num_layers": 4, "layer_idx": 1} if name == "pyramidkv" else {}))
    m.step_record = "bytes"
    q, k, v = _qkv()
    step = [torch.randn(B, n, 1, D, generator=torch.Generator().manual_seed(3)) for n in (H, HKV, HKV)]
    caches = [m.new_cache(B, L + 2) for _ in range(2)]
    for c in caches:
        m.prefill(q, k, v, c)
    assert (caches[0].rows is not None) == (name in ("razor_attention", "fastgen"))  # per-head rows
    want = m.decode(*step, caches[0])
    cudnn, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*a, **kw)

    def read_back(*a, **kw):
        raise AssertionError("a decode step read a tensor back to the host")

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        for attr in ("__bool__", "item", "tolist", "__int__", "__float__"):
            mp.setattr(torch.Tensor, attr, read_back)
        out = m.decode(*step, caches[1])
    assert cudnn and not any(cudnn) and torch.backends.cuda.cudnn_sdp_enabled() == before
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRESSES)
def test_prefill_is_exact_and_bytes_held_shrink_by_the_ratio(name):
    m = _load(name, ratio=0.5)
    q, k, v = _qkv()
    cache = m.new_cache(B, L)
    full = cache.bytes_held()
    out = m.prefill(q, k, v, cache)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                           is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    n = cache.length
    if name != "pyramidkv":  # PyramidKV's layer 0 keeps more than the average
        assert n == L // 2
    # measured from the tensors the cache now owns: they were replaced by smaller ones
    assert cache.k.shape == (B, HKV, n, D) and cache.bytes_held() == 2 * B * HKV * n * D * 4
    assert cache.bytes_held() == pytest.approx(full * n / L)


def test_a_press_cache_with_different_counts_per_head_holds_each_head_own_rows():
    """compact with -1 padding: each (batch, KV head) gets tensors of its kept rows plus the
    spare slots; bytes_held is their sum; appends go after each head's own rows; a head past its
    capacity is refused."""
    from methods.press import PressCache

    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(B, HKV, 10, D, generator=g), torch.randn(B, HKV, 10, D, generator=g)
    cache = PressCache(B, HKV, D, 12)
    cache.append(k, v)
    keep = torch.tensor([[[0, 3, 9, -1, -1], [1, 2, 4, 6, 8]], [[5, -1, -1, -1, -1], [0, 1, 2, 3, 4]]])
    cache.compact(keep)
    counts = [[3, 5], [1, 5]]
    assert cache.bytes_held() == 2 * sum(c + 2 for row in counts for c in row) * D * 4
    kt, vt = torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g)
    cache.append(kt, vt)
    for b in range(B):
        for h in range(HKV):
            kept = [int(i) for i in keep[b, h] if i >= 0]
            kh, vh, pos = cache.head_kv(b, h)
            assert pos.tolist() == [*kept, 10]
            assert torch.equal(kh, torch.cat([k[b, h, kept], kt[b, h]])) and torch.equal(vh, torch.cat([v[b, h, kept], vt[b, h]]))
            assert torch.equal(cache.keys()[b, h, :len(kept) + 1], kh)  # the padded copy
    cache.append(kt, vt)
    with pytest.raises(AttentionInputError, match="capacity"):
        cache.append(kt, vt)


def test_decode_slots_left_after_compaction():
    """A cache built for L + 3 tokens keeps room for the 3 decode tokens after compaction."""
    m, cache, _ = _pressed("streaming_llm_press", ratio=0.5, spare=3)
    assert cache.capacity == 12 + 3 and cache.bytes_held() == 2 * B * HKV * 15 * D * 4
    for _ in range(3):
        m.decode(*(torch.randn(B, n, 1, D) for n in (H, HKV, HKV)), cache)
    with pytest.raises(AttentionInputError, match="capacity"):
        m.decode(*(torch.randn(B, n, 1, D) for n in (H, HKV, HKV)), cache)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*PRESSES, "razor_attention", "eigen_attention"])
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_a_ratio_outside_0_1_is_refused(name, ratio):
    with pytest.raises(ValueError, match=r"ratio .* must be in \(0, 1\)"):
        _load(name, ratio=ratio)


def test_a_press_on_a_cache_it_cannot_handle_is_refused():
    m, cache, (q, k, v) = _pressed("h2o")
    with pytest.raises(AttentionInputError, match="already compressed"):
        m.compress(cache, q[:, :, :cache.length])
    # a cache that evicts as it stores (StreamingLLM's rolling buffer) holds not every token
    sw = SinkWindowAdapter(methods.load("dense", num_heads=H, head_dim=D, num_kv_heads=HKV), 2, 6)
    c = sw.new_cache(B, L)
    sw.prefill(q, k, v, c)
    with pytest.raises(AttentionInputError, match="every prefilled token"):
        m.compress(c, q)
    # queries that are not the prefill's
    c = m.new_cache(B, L)
    c.append(k, v)
    with pytest.raises(AttentionInputError, match="prefill's"):
        m.compress(c, q[:, :, :5])
    # SnapKV's window must be shorter than the prefill; nothing is written before the error
    snap = _load("snapkv", window_size=L)
    c = snap.new_cache(B, L)
    with pytest.raises(AttentionInputError, match="observation window"):
        snap.prefill(q, k, v, c)
    with pytest.raises(AttentionInputError, match="keep must"):
        c.compact(torch.zeros(B, HKV, 2, dtype=torch.long) + L)


@pytest.mark.parametrize("name,kw,match", [
    ("snapkv", {"kernel_size": 4}, "kernel_size"), ("snapkv", {"pooling": "sum"}, "pooling"),
    ("h2o", {"recent_share": 1.5}, "recent_share"), ("pyramidkv", {"layer_idx": 32}, "layer_idx"),
    ("pyramidkv", {"beta": 0.5}, "beta"), ("streaming_llm_press", {"num_sink": -1}, "num_sink"),
    ("razor_attention", {"compensation": "sum"}, "compensation"),
    ("razor_attention", {"local_capacity": 5}, "local_capacity"),  # 4 sinks + compensation + >= 1 recent
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        _load(name, **kw)


# ---- runner=decode -----------------------------------------------------------------------------
RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[48]", "runner.steps=4", "runner.warmup=1", "runner.cpu_threads=1", "runner.inputs=random"]


def test_decode_runner_with_a_press_records_the_compressed_cache(compose_cfg, store):
    """StreamingLLM press at ratio 0.75 (12 of 48: 4 sinks, 8 recent): the bytes held after the
    prefill, the recall of each step recomputed here from the same inputs."""
    from tasks.fidelity import random_qkv

    cfg = compose_cfg("runner=decode", "method=streaming_llm_press", *RUN, "method.ratio=0.75", tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    (stored,) = read(store)
    assert stored["details"]["press"]["kept_per_head"] == 12 and stored["details"]["press"]["ratio"] == 0.75
    assert rec.metrics["kv_bytes_held_prefill"] == 2 * 1 * 2 * (12 + 4) * 16 * 4  # 4 decode slots left
    assert rec.metrics["prefill_rel_err"] < 1e-5
    q, k, _ = (t.double() for t in random_qkv(1, 4, 2, 52, 16, "cpu", torch.float32, 48))
    for step, i in enumerate(range(48, 52)):
        keep = [0, 1, 2, 3, *range(40, i + 1)]
        recall = sum(float(torch.softmax(k[0, h // 2, :i + 1] @ q[0, h, i] / 4.0, 0)[keep].sum()) for h in range(4)) / 4
        assert rec.details["per_step"]["recall"][step] == pytest.approx(recall, rel=1e-4)
    assert rec.metrics["read_fraction"] < 0.5


# ---- RazorAttention ------------------------------------------------------------------------------
def _razor(**kw):
    return methods.load("razor_attention", num_heads=H, head_dim=D, num_kv_heads=HKV, **kw)


@pytest.mark.parametrize("retrieval", [[1], []])
def test_razor_attention_keeps_retrieval_heads_whole_and_compensates_the_others(retrieval):
    """The paper's reading (a ratio, compensation="weighted"). Non-retrieval heads: 4 sinks +
    max(6, int(24 * 0.2)) = 6 recent + one compensation token (Eq. 4: the mean of the 14 dropped
    keys and values); decode against Eq. 5 written here."""
    m = _razor(ratio=0.8, min_window=6, retrieval_heads=retrieval, compensation="weighted")
    q, k, v = _qkv()
    cache = m.new_cache(B, L + 1)
    m.prefill(q, k, v, cache)
    kept = sorted([*range(4), *range(18, 24)])
    dropped = list(range(4, 18))
    # per (batch, KV head): a retrieval head holds all L, the others 4 + 6 + 1; each + the decode slot
    rows = sum(L + 1 if h in retrieval else len(kept) + 2 for h in range(HKV))
    assert cache.bytes_held() == 2 * B * rows * D * 4 + B * HKV * 4  # K, V + log N_d per head
    for b in range(B):
        for h in range(HKV):
            kh, vh, pos = cache.head_kv(b, h)
            want = list(range(L)) if h in retrieval else [*kept, -2]  # -2: the compensation token
            assert pos.tolist() == want
            if h not in retrieval:
                torch.testing.assert_close(kh[-1], k[b, h, dropped].mean(0))
                torch.testing.assert_close(vh[-1], v[b, h, dropped].mean(0))
    qt, kt, vt = (torch.randn(B, n, 1, D, generator=torch.Generator().manual_seed(5)) for n in (H, HKV, HKV))
    out = m.decode(qt, kt, vt, cache)
    for b in range(B):
        for h in range(H):
            hk = h // G
            qq = qt[b, h, 0].double()
            if hk in retrieval:
                kk = torch.cat([k[b, hk], kt[b, hk]]).double()
                vv = torch.cat([v[b, hk], vt[b, hk]]).double()
                ref = torch.softmax(kk @ qq / math.sqrt(D), 0) @ vv
            else:
                kk = torch.cat([k[b, hk, kept], kt[b, hk]]).double()
                vv = torch.cat([v[b, hk, kept], vt[b, hk]]).double()
                k_hat, v_hat = k[b, hk, dropped].double().mean(0), v[b, hk, dropped].double().mean(0)
                e = torch.exp(kk @ qq / math.sqrt(D))
                e_hat = len(dropped) * math.exp(float(k_hat @ qq) / math.sqrt(D))
                ref = (e_hat * v_hat + e @ vv) / (e_hat + e.sum())
                assert sorted(p for p in m.last_step["positions"][b, h].tolist() if p >= 0) == [*kept, L]
            torch.testing.assert_close(out[b, h, 0].double(), ref, rtol=1e-5, atol=1e-5)


def _echo_induction_by_loops(q, k, P):
    """Per KV head: the largest over its query heads of the mean causal softmax on the same
    token's earlier copy (echo) and on the token after it (induction), written out with loops."""
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    echo, ind = [], []
    for hk in range(Hkv):
        es, is_ = [], []
        for h in range(hk * g, (hk + 1) * g):
            pe, pi = 0.0, 0.0
            for i in range(P, 2 * P):
                s = [float(q[0, h, i].double() @ k[0, hk, j].double()) / math.sqrt(q.shape[-1]) if j <= i else -math.inf
                     for j in range(2 * P)]
                mx = max(s)
                e = [math.exp(x - mx) for x in s]
                p = [x / sum(e) for x in e]
                pe += p[i - P] / P
                if i < 2 * P - 1:
                    pi += p[i - P + 1] / (P - 1)
            es.append(pe)
            is_.append(pi)
        echo.append(max(es))
        ind.append(max(is_))
    return echo, ind


def _repeated_qk(P, Hq, Hkv, strengths, seed=1):
    """Keys of P random tokens repeated twice; query head pair 2 hk + {0, 1} of KV head hk looks
    for the token after the earlier copy (induction) with strength strengths[hk][0] and for the
    same token (echo) with strengths[hk][1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(P, D, generator=g)
    k = torch.cat([base, base]).expand(1, Hkv, 2 * P, D).clone()
    q = torch.randn(1, Hq, 2 * P, D, generator=g)
    for hk, (si, se) in enumerate(strengths):
        for i in range(P, 2 * P):
            q[0, 2 * hk, i] = si * base[(i - P + 1) % P] + q[0, 2 * hk, i] * 0.1
            q[0, 2 * hk + 1, i] = se * base[i - P] + q[0, 2 * hk + 1, i] * 0.1
    return q, k


def test_razor_attention_calibration_finds_the_induction_and_echo_heads():
    """Repeated random tokens (P = 8): KV head 0's queries look for the token after the earlier
    copy (induction), KV head 1's for the same token (echo), heads 2 and 3 at random. Scores
    recomputed here by loops. Per layer (selection=layer): at least one head of each kind; alone
    (selection=model, one layer of 4 KV heads): round(4 x 0.14) = 1 induction head, round(4 x
    0.01) = 0 echo heads."""
    P, Hkv, Hq = 8, 4, 8
    q, k = _repeated_qk(P, Hq, Hkv, [(6, 0), (0, 6), (0, 0), (0, 0)])
    m = methods.load("razor_attention", num_heads=Hq, head_dim=D, num_kv_heads=Hkv, selection="layer")
    scores = m.calibrate(q, k, P)
    echo, ind = _echo_induction_by_loops(q, k, P)
    assert scores["echo"] == pytest.approx(echo, rel=1e-6) and scores["induction"] == pytest.approx(ind, rel=1e-6)
    assert m.retrieval == [0, 1]
    alone = methods.load("razor_attention", num_heads=Hq, head_dim=D, num_kv_heads=Hkv)
    alone.calibrate(q, k, P)
    assert alone.retrieval == [0]


def test_razor_attention_picks_retrieval_heads_among_all_the_model_kv_heads():
    """Five layers of 4 KV heads (N = 20) with induction and echo strengths drawn per head: the
    retrieval heads are the round(20 x 0.2) = 4 of largest induction score over all layers plus
    the round(20 x 0.1) = 2 of largest echo score, ranked here from the loop-computed scores;
    layers without any keep no head whole (selection=layer would keep one in every layer)."""
    P, Hkv, Hq, layers = 8, 4, 8, 5
    g = torch.Generator().manual_seed(3)
    presses, ind_all, echo_all = {}, {}, {}
    for li in range(layers):
        strengths = (torch.rand(Hkv, 2, generator=g) * 6).tolist()
        q, k = _repeated_qk(P, Hq, Hkv, strengths, seed=10 + li)
        p = methods.load("razor_attention", num_heads=Hq, head_dim=D, num_kv_heads=Hkv, induction_share=0.2,
                         echo_share=0.1)
        p.set_layer(li, layers)
        p.calibrate_layer(q, k, None, period=P)
        presses[li] = p
        echo_all[li], ind_all[li] = _echo_induction_by_loops(q, k, P)
    got = presses[0].calibrate_model(presses)
    by_ind = sorted(((ind_all[li][h], li, h) for li in range(layers) for h in range(Hkv)), reverse=True)[:4]
    by_echo = sorted(((echo_all[li][h], li, h) for li in range(layers) for h in range(Hkv)), reverse=True)[:2]
    want = {(li, h) for _, li, h in by_ind} | {(li, h) for _, li, h in by_echo}
    for li in range(layers):
        assert presses[li].retrieval == sorted(h for l2, h in want if l2 == li)
        assert got[li]["retrieval_heads"] == presses[li].retrieval
    assert 4 <= sum(len(p.retrieval) for p in presses.values()) == len(want) <= 6
    assert any(not p.retrieval for p in presses.values())  # the shares are of the model, not of each layer


@pytest.mark.parametrize("compensation", ["mean", "none"])
@pytest.mark.parametrize("retrieval", [[1], []])
def test_razor_attention_official_defaults_keep_a_fixed_local_capacity(compensation, retrieval):
    """Huawei's deployment code (Golden-Stick RAConfig / DeployRACompressCell._compress): no
    ratio, 4 sinks, local_capacity entries per non-retrieval head (12 here, of 24 tokens):
    "mean": 4 sinks + the mean of the 13 dropped tokens + 7 recent, attended as a plain key;
    "none": 4 sinks + 8 recent. Decode against softmax over those keys written here; a prompt
    of at most local_capacity tokens is kept whole."""
    m = _razor(local_capacity=12, retrieval_heads=retrieval, compensation=compensation)
    assert m.ratio is None and m.num_sink == 4
    assert methods.load("razor_attention", num_heads=H, head_dim=D, num_kv_heads=HKV).local_capacity == 256
    q, k, v = _qkv()
    cache = m.new_cache(B, L + 1)
    m.prefill(q, k, v, cache)
    recent = list(range(17, L)) if compensation == "mean" else list(range(16, L))
    dropped = list(range(4, recent[0]))
    rows = sum(L + 1 if h in retrieval else 12 + 1 for h in range(HKV))
    assert cache.bytes_held() == 2 * B * rows * D * 4 and "compensation" not in cache.aux
    qt, kt, vt = (torch.randn(B, n, 1, D, generator=torch.Generator().manual_seed(6)) for n in (H, HKV, HKV))
    out = m.decode(qt, kt, vt, cache)
    for b in range(B):
        for h in range(H):
            hk = h // G
            keep = list(range(L)) if hk in retrieval else [*range(4), *recent]
            kk, vv = torch.cat([k[b, hk, keep], kt[b, hk]]).double(), torch.cat([v[b, hk, keep], vt[b, hk]]).double()
            if hk not in retrieval and compensation == "mean":
                kk = torch.cat([kk, k[b, hk, dropped].double().mean(0, keepdim=True)])
                vv = torch.cat([vv, v[b, hk, dropped].double().mean(0, keepdim=True)])
            ref = torch.softmax(kk @ qt[b, h, 0].double() / math.sqrt(D), 0) @ vv
            torch.testing.assert_close(out[b, h, 0].double(), ref, rtol=1e-5, atol=1e-5)
    short = _razor(local_capacity=L, retrieval_heads=retrieval, compensation=compensation)
    c2 = short.new_cache(B, L)
    short.prefill(q, k, v, c2)
    assert all(c2.head_kv(b, h)[2].tolist() == list(range(L)) for b in range(B) for h in range(HKV))


def test_razor_attention_refuses_to_run_without_retrieval_heads():
    m = _razor()
    q, k, v = _qkv()
    cache = m.new_cache(B, L)
    with pytest.raises(AttentionInputError, match="no retrieval heads"):
        m.prefill(q, k, v, cache)
    assert cache.seen == 0  # refused before anything was written
    with pytest.raises(AttentionInputError, match="calibrate needs"):
        m.calibrate(q, k, 5)
    with pytest.raises(ValueError, match="retrieval_heads"):
        _razor(retrieval_heads=[2])


# ---- FastGen ---------------------------------------------------------------------------------------
FASTGEN_LADDER = ["special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full"]


@pytest.mark.parametrize("recovery", [0.2, 0.3, 0.7, 0.75, 0.97])  # 0.3, 0.7: heads differ
def test_fastgen_picks_the_cheapest_policy_that_recovers_the_attention(recovery):
    """Per KV head: the group's averaged causal attention A; policies built here from the token
    classes (special 0 and 5, punctuation 7 and 15), the top int(0.3 L) of column sums and the
    last int(0.3 L) tokens; the first whose kept columns hold >= T of A's mass (L rows)."""
    m = methods.load("fastgen", num_heads=H, head_dim=D, num_kv_heads=HKV, recovery=recovery)
    q, k, v = _qkv()
    special = torch.zeros(B, L, dtype=torch.bool)
    special[:, [0, 5]] = True
    punct = torch.zeros(B, L, dtype=torch.bool)
    punct[:, [7, 15]] = True
    m.set_token_classes(special, punct)
    cache = m.new_cache(B, L + 1)
    m.prefill(q, k, v, cache)
    rows = 0
    for b in range(B):
        for hk in range(HKV):
            col = [0.0] * L
            for h in range(hk * G, (hk + 1) * G):
                for i in range(L):
                    for j, p in enumerate(_probs(q, k, b, h, i, L)):
                        col[j] += p / G
            sp = {0, 5}
            pu = sp | {7, 15}
            fr = pu | _top(col, 7)
            lo = fr | set(range(L - 7, L))
            ladder = [sp, pu, fr, lo, set(range(L))]
            pick = next(i for i, c in enumerate(ladder) if sum(col[j] for j in c) / L >= recovery - 1e-6 or i == 4)
            assert m.policies[b][hk] == FASTGEN_LADDER[pick]
            assert {p for p in cache.head_positions()[b, hk].tolist() if p >= 0} == ladder[pick]
            rows += len(ladder[pick]) + 1  # its kept tokens + the decode slot
    # bytes measured from the tensors: each (batch, KV head) holds its own rows, no padding
    assert cache.bytes_held() == 2 * rows * D * 4
    # decode: each head over its own kept tokens (the others' empty slots masked) and the new one
    qt, kt, vt = (torch.randn(B, n, 1, D, generator=torch.Generator().manual_seed(2)) for n in (H, HKV, HKV))
    out = m.decode(qt, kt, vt, cache)
    for b in range(B):
        for h in range(H):
            keep = sorted(p for p in cache.head_positions()[b, h // G].tolist() if p >= 0)
            kk = torch.cat([k[b, h // G], kt[b, h // G]])[keep].double()
            vv = torch.cat([v[b, h // G], vt[b, h // G]])[keep].double()
            ref = torch.softmax(kk @ qt[b, h, 0].double() / math.sqrt(D), 0) @ vv
            torch.testing.assert_close(out[b, h, 0].double(), ref, rtol=1e-5, atol=1e-5)
            assert sorted(p for p in m.last_step["positions"][b, h].tolist() if p >= 0) == keep


def test_fastgen_refuses_token_classes_of_another_shape():
    m = methods.load("fastgen", num_heads=H, head_dim=D, num_kv_heads=HKV)
    q, k, v = _qkv()
    m.set_token_classes(torch.zeros(B, L - 1, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match="token classes"):
        m.prefill(q, k, v, m.new_cache(B, L))
    with pytest.raises(AttentionInputError, match="bool mask"):
        m.set_token_classes(torch.zeros(B, L))
    with pytest.raises(ValueError, match="recovery"):
        methods.load("fastgen", recovery=1.5)


# ---- Eigen Attention ---------------------------------------------------------------------------------
def _basis(x, r):
    """Top r right singular vectors per KV head, via the eigenvectors of X^T X (fp64)."""
    out = []
    for h in range(x.shape[1]):
        rows = x[:, h].reshape(-1, x.shape[-1]).double()
        w, vec = torch.linalg.eigh(rows.T @ rows)
        out.append(vec[:, w.argsort(descending=True)[:r]])
    return out


@pytest.mark.parametrize("calibrated", [False, True])
def test_eigen_attention_attends_in_the_low_rank_space(calibrated):
    """Prefill and decode against softmax((q U_K)(K U_K)^T / sqrt(D)) (V U_V) U_V^T written here
    (the bases from X^T X's eigenvectors; a projection, so the sign of each vector cancels); the
    cache holds r = D / 2 values per token."""
    m = methods.load("eigen_attention", num_heads=H, head_dim=D, num_kv_heads=HKV, ratio=0.5)
    q, k, v = _qkv()
    _, kc, vc = _qkv(T=40, seed=7)
    if calibrated:
        m.calibrate(kc, vc)
    src_k, src_v = (kc, vc) if calibrated else (k, v)
    uk, uv = _basis(src_k, 4), _basis(src_v, 4)
    cache = m.new_cache(B, L + 1)
    dense = 2 * B * HKV * (L + 1) * D * 4
    out = m.prefill(q, k, v, cache)
    assert cache.k.shape == (B, HKV, L + 1, 4)
    assert cache.bytes_held() == dense // 2 + 2 * HKV * D * 4 * 4  # half the K/V + the two bases
    qt, kt, vt = (torch.randn(B, n, 1, D, generator=torch.Generator().manual_seed(3)) for n in (H, HKV, HKV))
    o_t = m.decode(qt, kt, vt, cache)
    k2, v2 = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    for b in range(B):
        for h in range(H):
            Pk, Pv = uk[h // G] @ uk[h // G].T, uv[h // G] @ uv[h // G].T  # projections onto the bases
            for i, o, kk, vv, qq in [(i, out[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1], q[b, h, i])
                                     for i in (0, 11, L - 1)] + [(L, o_t[b, h, 0], k2[b, h // G], v2[b, h // G],
                                                                  qt[b, h, 0])]:
                s = (kk.double() @ Pk @ qq.double()) / math.sqrt(D)
                ref = torch.softmax(s, 0) @ (vv.double() @ Pv)
                torch.testing.assert_close(o.double(), ref, rtol=1e-4, atol=1e-5)


def test_eigen_attention_refuses_bad_calibration_and_foreign_caches():
    m = methods.load("eigen_attention", num_heads=H, head_dim=D, num_kv_heads=HKV, ratio=0.5)
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match="calibrate needs"):
        m.calibrate(k[:, :1], v[:, :1])
    dense_cache = methods.load("snapkv", num_heads=H, head_dim=D, num_kv_heads=HKV).new_cache(B, L)
    with pytest.raises(AttentionInputError, match="rank 4"):
        m.prefill(q, k, v, dense_cache)


@pytest.mark.parametrize("method,extra,smaller", [
    ("snapkv", ["method.window_size=8"], True),
    ("h2o", [], True),
    ("pyramidkv", ["method.window_size=8", "method.num_layers=4", "method.layer_idx=3"], True),
    ("random_press", [], True),
    ("razor_attention", ["method.retrieval_heads=[]", "method.local_capacity=16"], True),
    ("razor_attention", ["method.retrieval_heads=[1]", "method.local_capacity=16"], True),  # head 0 frees its rows
    ("fastgen", ["method.recovery=0.3"], None),
    ("eigen_attention", [], True),
])
def test_every_press_runs_through_runner_decode(method, extra, smaller, compose_cfg, store):
    """Each press on runner=decode: a record, the press's details, the bytes held after the
    prefill against dense's (smaller unless a head keeps everything)."""
    cfg = compose_cfg("runner=decode", f"method={method}", *RUN, *extra, tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    assert rec.details["press"]["press"] == method
    dense = 2 * 1 * 2 * 52 * 16 * 4
    held = rec.metrics["kv_bytes_held_prefill"]
    if smaller is not None:
        assert (held < 0.8 * dense) == smaller
    assert 0 <= rec.metrics["decode_recall_min"] <= 1 + 1e-6


# ---- generation in a transformers model through a press --------------------------------------------
def test_generation_through_a_press_equals_the_model_with_the_evicted_keys_masked(tmp_path):
    """A tiny GQA Llama generates through StreamingLLM-as-press (ratio 0.75: of a 40-token prompt
    4 sinks and the 6 most recent kept) under teacher forcing (the forced tokens play a question
    asked after the compression: the query-agnostic setting); its logits equal the eager model's
    with a 4D mask written here (prompt rows causal, later rows: sinks, kept recent, new tokens)."""
    transformers = pytest.importorskip("transformers")
    from models import hf_decode

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    P, N = 40, 6
    ids = torch.randint(0, 64, (2, P), generator=torch.Generator().manual_seed(1))
    forced = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(2))
    got = hf_decode.generate(hf_decode.load(str(tmp_path), "streaming_llm_press", ratio=0.75), ids, N, forced=forced)
    T = P + N
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[P:, 4:P - 6] = False  # evicted after the prefill, for every later token
    mask = torch.zeros(2, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(input_ids=torch.cat([ids, forced], 1), attention_mask=mask).logits
    for j, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, want[:, P - 1 + j], rtol=1e-4, atol=1e-4)
    assert all(s["bytes_held"] == 2 * 2 * 2 * (10 + N) * 8 * 4 for s in got.stats)  # 10 kept + N new
