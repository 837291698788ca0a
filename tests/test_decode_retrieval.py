"""TidalDecode, RetrievalAttention and Squeezed Attention (issue 24, item 4): decode paths that
select keys by layer-shared top-k, by a query-linked IVF search, and by clusters of a fixed
context. Every reference is written here, per batch element and head, from the papers'
equations (k-means by a plain Lloyd loop); grouped-query K/V throughout (H=4, Hkv=2)."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from methods.decode import KVCache
from runners import run
from tests.decode_helpers import HKV, B, D, G, H, load, qkv, softmax_attend


def _top(scores, k, allowed=None):
    """Indices of the k largest of ``scores`` [n] among ``allowed`` (all when None)."""
    pool = range(scores.shape[0]) if allowed is None else allowed
    return set(sorted(pool, key=lambda j: -float(scores[j]))[:k])


def _positions(m, b, h):
    return {int(p) for p in m.last_step["positions"][b, h] if p >= 0}


def _lloyd(x, C, iters):
    """k-means on the rows of x [n, D], one point at a time: start at the C evenly spaced rows
    round(i (n - 1) / (C - 1)), assign each row to its nearest centroid (L2, lowest index on a
    tie), move each centroid to its members' mean (an empty one stays)."""
    n = x.shape[0]
    start = [round(i * (n - 1) / (C - 1)) if C > 1 else 0 for i in range(C)]
    c = [x[s].clone() for s in start]

    def assign():
        return [min(range(C), key=lambda i: float(((x[j] - c[i]) ** 2).sum())) for j in range(n)]

    lab = assign()
    for _ in range(iters):
        for i in range(C):
            mem = [j for j in range(n) if lab[j] == i]
            if mem:
                c[i] = x[mem].mean(0)
        lab = assign()
    return torch.stack(c), lab


# ---- TidalDecode ------------------------------------------------------------------------------
def _layers(n, tokens, path):
    """The caches of an n-layer model: each its layer index, one shared selection store."""
    shared = {}
    caches = [path.new_cache(B, tokens, torch.float64) for _ in range(n)]
    for i, c in enumerate(caches):
        c.layer_idx, c.shared = i, shared
    return caches


def test_tidal_decode_layers_reuse_the_selecting_layers_positions():
    """Five layers, each its own q, k, v: layer 0 dense, layer 1 selects (full attention, keeps
    its top 6 per query head), layer 2 reads exactly those positions, layer 3 re-selects, layer 4
    reads layer 3's choice (the official llama_tidal_attention_forward with sparse_layer_start=1,
    correction_layer=3)."""
    budget, L, T = 6, 20, 25
    m = load("tidal_decode", token_budget=budget, sparse_layer_start=1, reselection_layers=[3])
    inputs = [qkv(T, seed=10 + layer) for layer in range(5)]
    caches = _layers(5, T, m)
    for layer, (q, k, v) in enumerate(inputs):
        m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], caches[layer])
    for i in range(L, T):
        chosen = None
        for layer, (q, k, v) in enumerate(inputs):
            out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], caches[layer])
            picks, rows = {}, 0
            for b in range(B):
                for kvh in range(HKV):
                    union = set()
                    for h in range(kvh * G, (kvh + 1) * G):
                        keys, vals = k[b, kvh, :i + 1], v[b, kvh, :i + 1]
                        picks[b, h] = _top(keys @ q[b, h, i], budget)
                        if layer in (0, 1, 3):  # dense; selecting layers attend fully
                            torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, vals))
                        else:  # the positions the last selecting layer chose, read here
                            torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, vals, chosen[b, h]))
                            assert _positions(m, b, h) == chosen[b, h]
                            union |= chosen[b, h]
                    rows += len(union)
            if layer in (0, 1, 3):
                assert m.last_step["positions"] is None
                assert m.last_step["kv_bytes"] == 2 * B * HKV * (i + 1) * D * 8
            else:
                assert m.last_step["kv_bytes"] == 2 * rows * D * 8 and m.last_step["index_bytes"] == 0
            if layer in (1, 3):
                chosen = picks


def test_tidal_decode_alone_reads_its_own_top_k_and_a_full_budget_is_dense():
    q, k, v = qkv(30, seed=3)
    for budget in (5, 4096):
        m = load("tidal_decode", token_budget=budget)
        cache = m.new_cache(B, 30, q.dtype)  # no layer index: one layer on its own
        m.prefill(q[:, :, :26], k[:, :, :26], v[:, :, :26], cache)
        for i in range(26, 30):
            out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
            assert m.last_step["clamped"] == (budget > i)
            for b in range(B):
                for h in range(H):
                    keys, vals = k[b, h // G, :i + 1], v[b, h // G, :i + 1]
                    idx = _top(keys @ q[b, h, i], budget)
                    assert _positions(m, b, h) == idx
                    torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, vals, idx))
            assert m.last_step["index_bytes"] == B * HKV * (i + 1) * D * 8  # every key scored


def test_tidal_decode_refuses_a_reusing_layer_without_a_selection():
    m = load("tidal_decode", token_budget=4, sparse_layer_start=0, reselection_layers=[])
    q, k, v = qkv(13)
    one = lambda t, i: t[:, :, i:i + 1]  # noqa: E731
    caches = _layers(2, 13, m)
    for c in caches:
        m.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], c)
    with pytest.raises(AttentionInputError, match="holds nothing"):  # layer 1 before layer 0
        m.decode(one(q, 10), one(k, 10), one(v, 10), caches[1])
    caches = _layers(2, 13, m)
    for c in caches:
        m.prefill(q[:, :, :10], k[:, :, :10], v[:, :, :10], c)
    for i in (10, 11):  # layer 0 runs ahead by a token
        m.decode(one(q, i), one(k, i), one(v, i), caches[0])
    with pytest.raises(AttentionInputError, match="layer 0's selection for token 11"):
        m.decode(one(q, 10), one(k, 10), one(v, 10), caches[1])
    caches[1].shared = None
    with pytest.raises(AttentionInputError, match="shares no selection store"):
        m.decode(one(q, 10), one(k, 10), one(v, 10), caches[1])


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    yield
    torch.set_num_threads(n)


def test_tidal_decode_generates_in_a_model(tmp_path, one_thread):
    """A 4-layer Llama through models.hf_decode: layers 0 dense, 1 selects, 2 reuses, 3
    re-selects; a budget over the cache generates dense decode's tokens; a small one reads less
    in the reusing layer only."""
    transformers = pytest.importorskip("transformers")
    from models import hf_decode

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))

    def gen(name, **kw):  # each layer builds its method from one composed config (Hydra's compose once)
        model = hf_decode.load(str(tmp_path), name)
        cfg = methods.compose_method(name)
        for key, x in kw.items():
            cfg[key] = x
        model.config.attnbench_method = cfg
        return hf_decode.generate(model, ids, 4)

    kw = dict(sparse_layer_start=1, reselection_layers=[3])
    dense = gen("dense", impl="reference")
    wide = gen("tidal_decode", token_budget=4096, **kw)
    assert torch.equal(wide.tokens, dense.tokens)
    narrow = gen("tidal_decode", token_budget=8, **kw)
    assert [s["path"] for s in narrow.stats] == ["TidalDecode"] * 4
    read = [s["bytes_read_per_step"] for s in narrow.stats]
    assert read[0] == read[1] == read[3] == dense.stats[0]["bytes_read_per_step"]
    assert read[2] < read[0]


# ---- k-means ------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [1, 2, 6])
def test_kmeans_against_a_plain_lloyd_loop(iters):
    from methods.squeezed_attention import kmeans

    x = torch.randn(2, 3, 23, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c, lab = kmeans(x, 4, iters)
    for i in range(2):
        for j in range(3):
            rc, rl = _lloyd(x[i, j], 4, iters)
            torch.testing.assert_close(c[i, j], rc)
            assert lab[i, j].tolist() == rl
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 24, 1)


# ---- Squeezed Attention -----------------------------------------------------------------------------
def _squeezed_scores(q, cent, counts):
    """S_i = exp(q.c_i / sqrt(D)) / sum_l N_l exp(q.c_l / sqrt(D)) for one query head."""
    z = [float(cent[i] @ q) / math.sqrt(q.shape[0]) for i in range(len(cent))]
    den = sum(n * math.exp(x) for n, x in zip(counts, z))
    return [math.exp(x) / den for x in z]


@pytest.mark.parametrize("selection", ["threshold", "fraction"])
def test_squeezed_attention_reads_the_passing_clusters(selection):
    L, T, w, pc, sp, iters = 36, 41, 6, 20.0, 0.6, 5
    m = load("squeezed_attention", percent_clusters=pc, sparsity=sp, observation_window=w,
              selection=selection, kmeans_iters=iters)
    q, k, v = qkv(T, seed=5)
    cache = m.new_cache(B, T, q.dtype)
    m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    n = L - w
    C = math.floor(pc / 100 * n)
    ref = {}
    for b in range(B):
        for kvh in range(HKV):
            cent, lab = _lloyd(k[b, kvh, :n], C, iters)
            torch.testing.assert_close(cache.aux["centroids"][b, kvh], cent)
            ref[b, kvh] = cent, lab, [lab.count(i) for i in range(C)]
    # the threshold: the sp-quantile of every clustered key's S over the observation queries, every head
    per_key = sorted(_squeezed_scores(q[b, h, t], ref[b, h // G][0], ref[b, h // G][2])[ref[b, h // G][1][j]]
                     for b in range(B) for h in range(H) for t in range(L - w, L) for j in range(n))
    T_ref = per_key[math.ceil(sp * len(per_key)) - 1]
    assert float(cache.aux["threshold"]) == pytest.approx(T_ref, rel=1e-9)
    for i in range(L, T):
        out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
        kept_all = 0
        for b in range(B):
            for h in range(H):
                cent, lab, counts = ref[b, h // G]
                s = _squeezed_scores(q[b, h, i], cent, counts)
                if selection == "threshold":
                    keep = {c for c in range(C) if s[c] >= T_ref}
                else:  # largest S until (1 - sp) n clustered keys are covered
                    keep, covered = set(), 0
                    for c in sorted(range(C), key=lambda c: -s[c]):
                        if covered >= (1 - sp) * n:
                            break
                        keep.add(c)
                        covered += counts[c]
                idx = {j for j in range(n) if lab[j] in keep} | set(range(n, i + 1))
                kept_all += len(idx) - (i + 1 - n)
                assert _positions(m, b, h) == idx
                torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], k[b, h // G, :i + 1],
                                                                 v[b, h // G, :i + 1], idx))
        assert m.last_step["stats"]["kept_fraction"] == pytest.approx(kept_all / (B * H * n))
        assert m.last_step["index_bytes"] == B * HKV * (C * (D * 8 + 4) + n * 4)  # centroids, sizes, labels


def _quantile(scores_of, label_of, n, sp, L, w):
    """The sp-quantile of every clustered key's S over the observation queries, every head."""
    per_key = sorted(scores_of(b, h, t)[label_of(b, h // G, j)]
                     for b in range(B) for h in range(H) for t in range(L - w, L) for j in range(n))
    return per_key[math.ceil(sp * len(per_key)) - 1]


def test_squeezed_attention_hierarchical_lookup():
    """Two levels (the official --hierarchical_lookup): L2 = k-means of the keys, L1 = k-means of
    the L2 centroids; T1, T2 global quantiles of each level's scores; at decode the L1 clusters
    over T1, then their L2 children over T2 with the L2 denominator over the children only."""
    L, T, w, pc, pc1, sp, sp1, iters = 60, 66, 6, 20.0, 6.0, 0.6, 0.5, 4
    m = load("squeezed_attention", percent_clusters=pc, sparsity=sp, observation_window=w, kmeans_iters=iters,
             hierarchical=True, percent_clusters_l1=pc1, sparsity_l1=sp1)
    q, k, v = qkv(T, seed=9)
    cache = m.new_cache(B, T, q.dtype)
    m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    n = L - w
    C2, C1 = math.floor(pc / 100 * n), math.floor(pc1 / 100 * n)
    ref = {}
    for b in range(B):
        for kvh in range(HKV):
            c2, lab = _lloyd(k[b, kvh, :n], C2, iters)
            c1, par = _lloyd(c2, C1, iters)
            n2 = [lab.count(i) for i in range(C2)]
            n1 = [sum(n2[j] for j in range(C2) if par[j] == i) for i in range(C1)]
            torch.testing.assert_close(cache.aux["centroids_l1"][b, kvh], c1)
            ref[b, kvh] = c2, lab, n2, c1, par, n1
    r = lambda b, h: ref[b, h // G]  # noqa: E731
    T1 = _quantile(lambda b, h, t: _squeezed_scores(q[b, h, t], r(b, h)[3], r(b, h)[5]),
                   lambda b, kvh, j: ref[b, kvh][4][ref[b, kvh][1][j]], n, sp1, L, w)
    T2 = _quantile(lambda b, h, t: _squeezed_scores(q[b, h, t], r(b, h)[0], r(b, h)[2]),
                   lambda b, kvh, j: ref[b, kvh][1][j], n, sp, L, w)
    assert float(cache.aux["threshold_l1"]) == pytest.approx(T1, rel=1e-9)
    assert float(cache.aux["threshold"]) == pytest.approx(T2, rel=1e-9)
    partial = False
    for i in range(L, T):
        out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
        l2_rows = 0
        for b in range(B):
            for kvh in range(HKV):
                c2, lab, n2, c1, par, n1 = ref[b, kvh]
                group = set()
                for h in range(kvh * G, (kvh + 1) * G):
                    s1 = _squeezed_scores(q[b, h, i], c1, n1)
                    under = {j for j in range(C2) if s1[par[j]] >= T1}
                    group |= under
                    partial |= 0 < len(under) < C2
                    keep = set()
                    if under:
                        s2 = _squeezed_scores(q[b, h, i], c2, [n2[j] if j in under else 0 for j in range(C2)])
                        keep = {j for j in under if s2[j] >= T2}
                    idx = {j for j in range(n) if lab[j] in keep} | set(range(n, i + 1))
                    assert _positions(m, b, h) == idx
                    torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], k[b, kvh, :i + 1],
                                                                     v[b, kvh, :i + 1], idx))
                l2_rows += len(group)
        assert m.last_step["index_bytes"] == B * HKV * (C1 * (D * 8 + 4) + n * 4) + l2_rows * (D * 8 + 4)
    assert partial  # the L1 level pruned something and kept something


def test_squeezed_attention_hierarchical_needs_a_threshold():
    with pytest.raises(ValueError, match="hierarchical"):
        load("squeezed_attention", hierarchical=True, selection="fraction")


@pytest.mark.parametrize("kw", [dict(sparsity=0.0), dict(sparsity=0.0, selection="fraction"),
                                dict(sparsity=0.9, observation_window=64)])  # nothing clustered
def test_squeezed_attention_without_pruning_is_dense(kw):
    m = load("squeezed_attention", percent_clusters=10.0, **{"observation_window": 4, **kw})
    q, k, v = qkv(40, seed=6)
    cache = m.new_cache(B, 40, q.dtype)
    m.prefill(q[:, :, :36], k[:, :, :36], v[:, :, :36], cache)
    for i in range(36, 40):
        out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1]))


# ---- RetrievalAttention -------------------------------------------------------------------------------
def _nearest(x, cent):
    return min(range(len(cent)), key=lambda i: float(((x - cent[i]) ** 2).sum()))


@pytest.mark.parametrize("max_links", [None, 3])
def test_retrieval_attention_searches_its_query_linked_ivf(max_links):
    """The index (k-means lists, query-to-key links from the prefill queries, keys leaving the
    window added to their nearest list), the search (nprobe lists by q.c, exact top_k of the
    candidates), attention over sinks + window + retrieved, and the recall of the true top_k."""
    L, T, sinks, win, C, nprobe, topk, links, iters = 40, 46, 2, 5, 4, 1, 4, 3, 4
    m = load("retrieval_attention", top_k=topk, num_sink=sinks, window=win, num_clusters=C, nprobe=nprobe,
              query_links=links, max_links=max_links, kmeans_iters=iters)
    q, k, v = qkv(T, seed=7)
    cache = m.new_cache(B, T, q.dtype)
    m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    a, e = sinks, L - win
    index = {}
    for b in range(B):
        for kvh in range(HKV):
            cent, lab = _lloyd(k[b, kvh, a:e], C, iters)
            torch.testing.assert_close(cache.aux["centroids"][b, kvh], cent)
            lists = {c: {a + j for j in range(e - a) if lab[j] == c} for c in range(C)}
            counts = {c: {} for c in range(C)}
            for h in range(kvh * G, (kvh + 1) * G):
                for i in range(a, L):  # each prefill query: its top keys (indexed, causal) to its first list
                    qi = q[b, h, i]
                    first = max(range(C), key=lambda c: float(cent[c] @ qi))
                    for j in _top(k[b, kvh] @ qi, links, [j for j in range(a, min(e, i + 1))]):
                        counts[first][j] = counts[first].get(j, 0) + 1
            E = max_links or math.ceil((e - a) / C)  # each list: its E most linked keys, lowest first on a tie
            linked = {c: set(sorted(counts[c], key=lambda j: (-counts[c][j], j))[:E]) for c in range(C)}
            assert sum(len(x) for x in counts.values()) > sum(len(x) for x in linked.values())  # the bound bites
            got = cache.aux["links"][b, kvh]
            assert {c: {int(s) for s in got[c] if s >= 0} for c in range(C)} == linked
            index[b, kvh] = cent, lists, linked
    for i in range(L, T):
        out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
        left = i - win  # the key that left the window joins its nearest list
        recall, scanned = [], 0
        for b in range(B):
            for kvh in range(HKV):
                cent, lists, linked = index[b, kvh]
                lists[_nearest(k[b, kvh, left], cent)].add(left)
                group = set()
                for h in range(kvh * G, (kvh + 1) * G):
                    qh, keys = q[b, h, i], k[b, kvh, :i + 1]
                    probed = _top(cent @ qh, nprobe)
                    cand = set().union(*(lists[c] | linked[c] for c in probed))
                    group |= cand
                    got = _top(keys @ qh, topk, sorted(cand))
                    static = set(range(sinks)) | set(range(i + 1 - win, i + 1))
                    assert _positions(m, b, h) == static | got
                    torch.testing.assert_close(out[b, h, 0], softmax_attend(qh, keys, v[b, kvh, :i + 1], static | got))
                    indexed = sorted(set().union(*lists.values()))
                    recall.append(len(got & _top(keys @ qh, topk, indexed)) / topk)
                scanned += len(group)
        assert m.last_step["stats"]["topk_recall"] == pytest.approx(sum(recall) / len(recall))
        # the search read the centroids and the probed lists' keys (each once per KV head), no other key
        assert m.last_step["index_bytes"] == (B * HKV * C + scanned) * D * 8
        assert scanned < B * HKV * (i + 1 - win - sinks)
        assert not m.last_step["clamped"]


def test_retrieval_attention_full_budget_is_dense_and_a_short_prefill_scans_flat():
    q, k, v = qkv(40, seed=8)
    for kw, L in ((dict(top_k=4096, nprobe=64, num_sink=2, window=4), 30),
                  (dict(top_k=3, num_sink=2, window=4), 5),  # nothing indexed at the prefill
                  (dict(top_k=3, num_sink=50, window=4), 30)):  # nothing indexed: all sinks
        m = load("retrieval_attention", **kw)
        cache = m.new_cache(B, 40, q.dtype)
        m.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
        for i in range(L, 40):
            out = m.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache)
            for b in range(B):
                for h in range(H):
                    keys, vals = k[b, h // G, :i + 1], v[b, h // G, :i + 1]
                    static = set(range(min(kw["num_sink"], i + 1))) | set(range(i - 3, i + 1))
                    flat = [j for j in range(i + 1) if j not in static]  # every indexed key a candidate
                    idx = static | _top(keys @ q[b, h, i], kw["top_k"], flat)
                    torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, vals, idx))
            assert m.last_step["stats"]["topk_recall"] == 1.0
        assert m.last_step["clamped"] == (kw["top_k"] > 40 and kw["num_sink"] < 40)


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("tidal_decode", dict(token_budget=4)),
                                     ("retrieval_attention", dict(top_k=4, num_sink=1, window=2)),
                                     ("squeezed_attention", dict(observation_window=2))])
def test_bad_input_is_refused_before_any_compute(name, kw):
    m = load(name, **kw)
    q, k, v = qkv(12)
    one = lambda t, i: t[:, :, i:i + 1]  # noqa: E731
    with pytest.raises(AttentionInputError, match="another model shape"):
        m.prefill(q, k, v, KVCache(B, 4, D, 16, torch.float64))
    cache = m.new_cache(B, 12, torch.float64)
    with pytest.raises(AttentionInputError, match="decode before prefill"):
        m.decode(one(q, 0), one(k, 0), one(v, 0), cache)
    m.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], cache)
    other = "quest" if name != "quest" else "sparq"
    with pytest.raises(AttentionInputError, match=f"filled by {name}"):
        load(other).decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="decode query"):
        m.decode(one(q, 11)[:, :2], one(k, 11), one(v, 11), cache)
    m.decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="capacity of 12"):
        m.decode(one(q, 11), one(k, 11), one(v, 11), cache)


@pytest.mark.parametrize("name,kw,match", [
    ("tidal_decode", dict(token_budget=0), "token_budget"),
    ("tidal_decode", dict(reselection_layers=[1]), "after sparse_layer_start"),
    ("retrieval_attention", dict(nprobe=0), "nprobe"), ("retrieval_attention", dict(num_clusters=0), "num_clusters"),
    ("retrieval_attention", dict(max_links=0), "max_links"),
    ("squeezed_attention", dict(sparsity=1.0), "sparsity"), ("squeezed_attention", dict(selection="top"), "selection"),
    ("squeezed_attention", dict(percent_clusters=0), "percent_clusters"),
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        load(name, **kw)


# ---- runner=decode ----------------------------------------------------------------------------------
RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[64]", "runner.steps=3", "runner.warmup=1", "runner.cpu_threads=1"]


@pytest.mark.parametrize("method,extra,stat", [
    ("tidal_decode", ["method.token_budget=16"], None),
    ("retrieval_attention", ["method.top_k=8", "method.num_sink=4", "method.window=8"], "topk_recall"),
    ("squeezed_attention", ["method.observation_window=8", "method.percent_clusters=10"], "kept_fraction"),
])
def test_decode_runner_records_them(method, extra, stat, compose_cfg, store):
    (rec,) = run(compose_cfg("runner=decode", f"method={method}", *RUN, *extra, tiny=False))
    assert rec.status == "ok", rec.error
    mt = rec.metrics
    assert mt["read_fraction"] < 1 and 0 < mt["decode_recall_min"] <= mt["decode_recall_mean"] < 1 + 1e-6
    if stat:
        assert len(rec.details["per_step"][stat]) == 3 and 0 < mt[f"decode_{stat}_mean"] <= 1
