"""Query-aware decode-time KV selection with offline statistics or an adaptive budget (issue 24,
item 4): Loki (PCA of keys), Double Sparsity (heavy channels, label cache), Twilight (top-p
pruning of a base selector). Every reference is written here, per batch element and query head,
from the papers' equations and the official code's rules; grouped-query K/V throughout (H=4,
Hkv=2)."""
import math

import numpy as np
import pytest
import torch

from methods.base import AttentionInputError
from methods.decode import KVCache
from runners import run
from tests.decode_helpers import HKV, B, D, G, H, dense_row, load, qkv, softmax_attend, steps


def _calibration(seed=7, T=48):
    q, k, _ = qkv(anisotropic=True, T=T, seed=seed)
    return [(q, k), (q[:, :, :20] * 0.5, k[:, :, :20])]  # two samples, of different lengths


def _read(m, b, h):
    return {int(p) for p in m.last_step["positions"][b, h] if p >= 0}


def _kv_rows(reads):
    """K/V rows read: each (batch, KV head, key) once, whichever heads of its group read it."""
    return sum(len(set().union(*(reads[(b, h)] for h in range(kvh * G, (kvh + 1) * G))))
               for b in range(B) for kvh in range(HKV))


# ---- Loki -----------------------------------------------------------------------------------
def _pca(samples, kvh):
    """Principal components of the calibration keys of KV head kvh: the eigenvectors of their
    covariance (numpy), by decreasing eigenvalue, and the explained variance ratios."""
    rows = np.concatenate([k[:, kvh].reshape(-1, D).numpy() for _, k in samples])
    w, vecs = np.linalg.eigh(np.cov(rows, rowvar=False))
    order = np.argsort(w)[::-1]
    return torch.from_numpy(vecs[:, order].copy()), torch.from_numpy(w[order] / w.sum())


def test_loki_calibration_is_the_pca_of_the_keys():
    m = load("loki")
    samples = _calibration()
    m.calibrate(samples)
    for kvh in range(HKV):
        P, ratio = _pca(samples, kvh)
        torch.testing.assert_close(m.explained_variance_ratio[kvh], ratio)
        # the same components up to sign (the eigenvalues are distinct)
        torch.testing.assert_close((m.pca[kvh] * P).sum(0).abs(), torch.ones(D, dtype=torch.float64))


@pytest.mark.parametrize("v", [0.5, 0.9])
def test_loki_rank_from_explained_variance(v):
    """A fractional top_r in the official code: the components whose cumulative explained
    variance stays below v, the largest count over the KV heads."""
    m = load("loki", variance=v)
    samples = _calibration()
    m.calibrate(samples)
    want = max(sum(1 for c in range(D) if float(_pca(samples, kvh)[1][:c + 1].sum()) < v) for kvh in range(HKV))
    assert m.d == max(1, want) and 1 < m.d < D


def _loki_reference(q, keys, values, P, d, k):
    """Alg. 1 for one query head (official mask_attn_pca_topk): scores from the first d
    components of q P and K P over sqrt(D), the top k keys, exact attention over them."""
    Dh, S = q.shape[0], keys.shape[0]
    s_hat = (keys @ P[:, :d]) @ (q @ P[:, :d]) / math.sqrt(Dh)
    top = sorted(range(S), key=lambda j: -float(s_hat[j]))[:min(k, S)]
    return softmax_attend(q, keys[top], values[top]), set(top)


@pytest.mark.parametrize("kw,k_of", [(dict(), lambda S: int(0.25 * S)),  # the paper's d_f = k_f = 0.25
                                     (dict(d=6, k=5), lambda S: 5)])
def test_loki_decode_against_algorithm_1(kw, k_of):
    m = load("loki", **kw)
    samples = _calibration()
    m.calibrate(samples)
    d = kw.get("d", D // 4)
    assert m.d == d
    P = [_pca(samples, kvh)[0] for kvh in range(HKV)]
    q, k, v = qkv(anisotropic=True, T=40, seed=1)
    for i, out, cache in steps(m, q, k, v, 33):
        reads = {}
        for b in range(B):
            for h in range(H):
                ref, reads[(b, h)] = _loki_reference(q[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1],
                                                     P[h // G], d, k_of(i + 1))
                torch.testing.assert_close(out[b, h, 0], ref)
                assert _read(m, b, h) == reads[(b, h)]
        assert m.last_step["kv_bytes"] == 2 * _kv_rows(reads) * D * 8
        assert m.last_step["index_bytes"] == B * HKV * (i + 1) * d * 8  # d components of every key
        assert not m.last_step["clamped"]
    # the cache holds the keys rotated into PCA space (Alg. 1) and nothing else
    torch.testing.assert_close(cache.keys()[0, 1], k[0, 1] @ P[1] * (m.pca[1] * P[1]).sum(0))
    assert cache.bytes_held() == 2 * B * HKV * 40 * D * 8


def test_loki_every_key_is_dense_decode():
    m = load("loki", k_f=1.0, d=2)
    m.calibrate(_calibration())
    q, k, v = qkv(anisotropic=True, T=30, seed=2)
    for i, out, _ in steps(m, q, k, v, 24):
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))


# ---- Double Sparsity ------------------------------------------------------------------------
def _heavy_reference(samples, r, channel="qk"):
    """offline_calibration.py's statistic per query head and channel, by loops: each sample adds
    its mean over (batch, token) of |q_i k_i| (``qk``), |q_i| or |k_i| (k of the head's KV
    head); the r channels of largest sum."""
    heavy = []
    for h in range(H):
        stat = []
        for c in range(D):
            tot = 0.0
            for q, k in samples:
                x = {"qk": q[:, h, :, c] * k[:, h // G, :, c], "q": q[:, h, :, c], "k": k[:, h // G, :, c]}[channel]
                tot += float(x.abs().sum()) / x.numel()
            stat.append(tot)
        heavy.append(sorted(range(D), key=lambda c: -stat[c])[:r])
    return heavy


@pytest.mark.parametrize("channel", ["qk", "q", "k"])
def test_double_sparsity_calibration_picks_the_outlier_channels(channel):
    m = load("double_sparsity", channel=channel)
    samples = _calibration()
    m.calibrate(samples)
    assert m.r == D // 4  # group_factor 4: the official 32 of 128
    for h, want in enumerate(_heavy_reference(samples, D // 4, channel)):
        assert sorted(m.heavy[h].tolist()) == sorted(want)


def _quantize_label(x, bits):
    """The official pseudo_quantize of one label row: min-max to 2^bits - 1 levels and back."""
    top = 2 ** bits - 1
    lo, hi = float(x.min()), float(x.max())
    scale = top / ((hi - lo) or 1.0)
    return torch.clamp(torch.round((x - lo) * scale), 0, top) / scale + lo


def _ds_reference(q, keys, values, heavy, budget, bits):
    """Alg. 2 for one query head (models/model.py): scores of the query's heavy channels on each
    key's label over sqrt(r), the top ``budget`` keys, exact attention over them."""
    S, r = keys.shape[0], len(heavy)
    ql = q[heavy] if bits is None else _quantize_label(q[heavy], bits)
    s_hat = [float((keys[j, heavy] if bits is None else _quantize_label(keys[j, heavy], bits)) @ ql) / math.sqrt(r)
             for j in range(S)]
    top = sorted(range(S), key=lambda j: -s_hat[j])[:min(budget, S)]
    return softmax_attend(q, keys[top], values[top]), set(top)


@pytest.mark.parametrize("kw", [dict(token_budget=9), dict(token_budget=7, group_factor=2, label_bits=4)])
def test_double_sparsity_decode_against_the_official_label_scores(kw):
    m = load("double_sparsity", **kw)
    samples = _calibration()
    m.calibrate(samples)
    r = D // kw.get("group_factor", 4)
    heavy = _heavy_reference(samples, r)
    q, k, v = qkv(anisotropic=True, T=38, seed=3)
    for i, out, cache in steps(m, q, k, v, 32):
        reads = {}
        for b in range(B):
            for h in range(H):
                ref, reads[(b, h)] = _ds_reference(q[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1], heavy[h],
                                                   kw["token_budget"], kw.get("label_bits"))
                torch.testing.assert_close(out[b, h, 0], ref)
                assert _read(m, b, h) == reads[(b, h)]
        assert m.last_step["kv_bytes"] == 2 * _kv_rows(reads) * D * 8
        assert m.last_step["index_bytes"] == B * H * (i + 1) * r * 8  # every key's label, per query head
    # held: K, V and the label cache (r channels per query head) at capacity
    assert cache.bytes_held() == (2 * B * HKV * D + B * H * r) * 38 * 8


def test_double_sparsity_budget_over_the_cache_is_dense_decode():
    m = load("double_sparsity", token_budget=4096)
    m.calibrate(_calibration())
    q, k, v = qkv(anisotropic=True, T=30, seed=4)
    for i, out, _ in steps(m, q, k, v, 26):
        assert m.last_step["clamped"]
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))


# ---- Twilight -------------------------------------------------------------------------------
def _quest_candidates(q, keys, page, budget):
    """Quest's pages for one query head (Sec. 3.3): per-page channel min/max, the bound
    sum_i max(q_i M_i, q_i m_i), the top max(3, budget // page) pages."""
    S = keys.shape[0]
    pages = [list(range(p, min(p + page, S))) for p in range(0, S, page)]
    bound = [float(torch.maximum(q * keys[idx].max(0).values, q * keys[idx].min(0).values).sum()) for idx in pages]
    chosen = sorted(range(len(pages)), key=lambda p: -bound[p])[:min(max(3, budget // page), len(pages))]
    return sorted(j for p in chosen for j in pages[p])


def _dequantized(x, bits):
    """The official min_max_per_token_quant_kv of one key row."""
    top = 2 ** bits - 1
    lo = float(x.min())
    scale = max(float(x.max()) - lo, 1e-9) / top
    return torch.clamp(torch.round((x - lo) / scale), 0, top) * scale + lo


def _twilight_reference(q, keys, values, cand, top_p, bits):
    """Select-then-prune for one query head: weights over the candidates estimated from the
    b-bit keys, the fewest candidates by decreasing weight whose mass reaches top_p, exact
    attention over them."""
    est = torch.stack([_dequantized(keys[j], bits) @ q for j in cand]) / math.sqrt(q.shape[0])
    p = torch.softmax(est, 0)
    kept, mass = [], 0.0
    for i in sorted(range(len(cand)), key=lambda i: -float(p[i])):
        if mass >= top_p:
            break
        kept.append(cand[i])
        mass += float(p[i])
    return softmax_attend(q, keys[kept], values[kept]), set(kept)


@pytest.mark.parametrize("top_p,bits", [(0.85, 4), (0.5, 2), (0.95, 8)])
def test_twilight_decode_against_select_then_prune(top_p, bits):
    page, budget = 4, 20
    m = load("twilight", page_size=page, token_budget=budget, top_p=top_p, quant_bits=bits)
    q, k, v = qkv(anisotropic=True, T=44, seed=5)
    budgets = []
    for i, out, _ in steps(m, q, k, v, 37):
        reads, sizes = {}, []
        for b in range(B):
            for h in range(H):
                keys, values = k[b, h // G, :i + 1], v[b, h // G, :i + 1]
                cand = _quest_candidates(q[b, h, i], keys, page, budget)
                ref, reads[(b, h)] = _twilight_reference(q[b, h, i], keys, values, cand, top_p, bits)
                torch.testing.assert_close(out[b, h, 0], ref)
                assert _read(m, b, h) == reads[(b, h)]
                sizes.append(len(reads[(b, h)]))
        assert m.last_step["budget"] == pytest.approx(sum(sizes) / len(sizes))  # the step's budget
        assert m.last_step["budget"] <= m.last_step["budget_base"] <= 20  # 5 pages of 4 (the last partial)
        assert m.last_step["kv_bytes"] == 2 * _kv_rows(reads) * D * 8
        budgets.append(m.last_step["budget"])
    assert sum(budgets) / len(budgets) < 20  # the pruner reads fewer keys than the base chose


def test_twilight_top_p_one_over_the_whole_cache_is_dense_decode():
    m = load("twilight", page_size=4, token_budget=4096, top_p=1.0)
    q, k, v = qkv(anisotropic=True, T=30, seed=6)
    for i, out, cache in steps(m, q, k, v, 25):
        assert m.last_step["clamped"] and m.last_step["budget"] == i + 1
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))
    # held: K, V, Quest's page min/max (8 pages) and the 4-bit keys (D/2 bytes) with scale and minimum
    assert cache.bytes_held() == (2 * 30 * D + 2 * 8 * D) * B * HKV * 8 + B * HKV * 30 * (D // 2 + 2 * 8)


def test_twilight_on_double_sparsity_needs_its_calibration():
    m = load("twilight", base="double_sparsity", token_budget=10, top_p=0.9, base_kw={"group_factor": 2})
    q, k, v = qkv(anisotropic=True, T=36, seed=8)
    with pytest.raises(AttentionInputError, match="calibrate"):
        m.prefill(q, k, v, m.new_cache(B, 36, q.dtype))
    samples = _calibration()
    m.calibrate(samples)
    heavy = _heavy_reference(samples, D // 2)
    for i, out, _ in steps(m, q, k, v, 32):
        for b in range(B):
            for h in range(H):
                keys, values = k[b, h // G, :i + 1], v[b, h // G, :i + 1]
                _, cand = _ds_reference(q[b, h, i], keys, values, heavy[h], 10, None)
                ref, read = _twilight_reference(q[b, h, i], keys, values, sorted(cand), 0.9, 4)
                torch.testing.assert_close(out[b, h, 0], ref)
                assert _read(m, b, h) == read


# ---- bad input ------------------------------------------------------------------------------
CASES = [("loki", dict(k=4)), ("double_sparsity", dict(token_budget=4)),
         ("twilight", dict(page_size=4, token_budget=8))]


@pytest.mark.parametrize("name,kw", CASES)
def test_bad_use_is_refused_before_any_compute(name, kw):
    m = load(name, **kw)
    q, k, v = qkv(anisotropic=True, T=12)
    one = lambda t, i: t[:, :, i:i + 1]  # noqa: E731
    if m.needs_calibration:
        with pytest.raises(AttentionInputError, match="calibrate"):  # calibration missing
            m.prefill(q, k, v, m.new_cache(B, 12, q.dtype))
        with pytest.raises(AttentionInputError, match="calibration pairs"):
            m.calibrate([(q[:, :2], k)])
        with pytest.raises(AttentionInputError, match="at least one"):
            m.calibrate([])
        m.calibrate(_calibration())
    with pytest.raises(AttentionInputError, match="another model shape"):
        m.prefill(q, k, v, KVCache(B, 4, D, 16, torch.float64))
    cache = m.new_cache(B, 12, torch.float64)
    with pytest.raises(AttentionInputError, match="decode before prefill"):
        m.decode(one(q, 0), one(k, 0), one(v, 0), cache)
    m.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], cache)
    with pytest.raises(AttentionInputError, match="decode query"):
        m.decode(one(q, 11)[:, :2], one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="filled by"):  # a cache of another method
        load("quest", page_size=4).decode(one(q, 11), one(k, 11), one(v, 11), cache)
    if m.needs_calibration:  # or of another calibration
        other = load(name, **kw)
        other.calibrate(_calibration(seed=11))
        with pytest.raises(AttentionInputError, match="filled by"):
            other.decode(one(q, 11), one(k, 11), one(v, 11), cache)
    m.decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="capacity of 12"):
        m.decode(one(q, 11), one(k, 11), one(v, 11), cache)


@pytest.mark.parametrize("name,kw", CASES)
def test_a_budget_larger_than_the_cache_is_clamped(name, kw):
    big = {"loki": dict(k=99), "double_sparsity": dict(token_budget=99), "twilight": dict(token_budget=99, top_p=1.0)}
    m = load(name, **{**kw, **big[name]})
    if m.needs_calibration:
        m.calibrate(_calibration())
    q, k, v = qkv(anisotropic=True, T=14, seed=9)
    for i, out, _ in steps(m, q, k, v, 12):
        assert m.last_step["clamped"]
        assert {int(p) for p in m.last_step["positions"][1, 3] if p >= 0} == set(range(i + 1))
        torch.testing.assert_close(out[1, 3, 0], dense_row(q, k, v, i, 1, 3))


@pytest.mark.parametrize("name,kw,match", [
    ("loki", dict(d_f=0.0), "d_f"), ("loki", dict(d=D + 1), "d must be"), ("loki", dict(k=0), "k must be"),
    ("loki", dict(variance=1.0), "variance"),
    ("double_sparsity", dict(group_factor=3), "group_factor"), ("double_sparsity", dict(channel="v"), "channel"),
    ("double_sparsity", dict(label_bits=16), "label_bits"), ("double_sparsity", dict(token_budget=0), "token_budget"),
    ("twilight", dict(top_p=0.0), "top_p"), ("twilight", dict(quant_bits=3), "quant_bits"),
    ("twilight", dict(base="sparq"), "base"),
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        load(name, **kw)


# ---- runner=decode ----------------------------------------------------------------------------
RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[64]", "runner.steps=4", "runner.warmup=1", "runner.cpu_threads=1"]


@pytest.mark.parametrize("method,extra", [
    ("loki", []), ("double_sparsity", ["method.token_budget=16"]),
    ("twilight", ["method.page_size=4", "method.token_budget=32"]),
])
def test_decode_runner_calibrates_and_records_the_budget(method, extra, compose_cfg, store):
    cfg = compose_cfg("runner=decode", f"method={method}", *RUN, *extra, tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    mt = rec.metrics
    assert rec.details["decode_fallback"] is None and mt["read_fraction"] < 1
    assert 0 < mt["decode_recall_min"] <= mt["decode_recall_mean"] <= 1 + 1e-6
    if method == "twilight":
        assert "calibration" not in rec.details
        budget = rec.details["per_step"]["budget"]
        assert len(budget) == 4 and all(1 <= x <= 32 for x in budget)
        assert mt["budget_mean"] == pytest.approx(sum(budget) / 4)
    else:  # calibrated on other inputs than the measured ones
        assert rec.details["calibration"]["seed"] != cfg.seed + 64 and rec.details["calibration"]["tokens"] == 68
        assert "budget" not in rec.details["per_step"]


# ---- generation through the decode paths (models/hf_decode.py) --------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _ids(n=40, seed=1):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,full,narrow", [
    ("loki", dict(k_f=1.0), dict(k=6)),
    ("double_sparsity", dict(token_budget=4096), dict(token_budget=6)),
    ("twilight", dict(page_size=4, token_budget=4096, top_p=1.0), dict(page_size=4, token_budget=16, top_p=0.5)),
])
def test_generation_through_the_decode_path(tiny_llama, name, full, narrow):
    from models import hf_decode

    ids, new = _ids(), 6
    dense = hf_decode.generate(hf_decode.load(tiny_llama, "dense", impl="reference"), ids, new)
    model = hf_decode.load(tiny_llama, name, **full)
    if model.config.attnbench_method["name"] != "twilight":  # Loki and Double Sparsity calibrate first
        with pytest.raises(AttentionInputError, match="calibrate"):
            hf_decode.generate(model, ids, new)
        assert len(hf_decode.calibrate(model, [_ids(48, seed=9)])) == 2  # both layers
    wide = hf_decode.generate(model, ids, new)
    assert torch.equal(wide.tokens, dense.tokens)  # every key read: dense decode's tokens
    for w, d in zip(wide.logits, dense.logits):
        torch.testing.assert_close(w, d, rtol=1e-4, atol=1e-4)
    model = hf_decode.load(tiny_llama, name, **narrow)
    if name != "twilight":
        hf_decode.calibrate(model, [_ids(48, seed=9)])
    few = hf_decode.generate(model, ids, new, forced=dense.tokens)
    assert all(s["path"] == type(model.model.layers[0].self_attn._attnbench_method).__name__ for s in few.stats)
    assert all(f["bytes_read_per_step"] < d["bytes_read_per_step"] for f, d in zip(few.stats, dense.stats))



def _smollm2():
    from models import pretrained

    if not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists():
        pytest.skip("the SmolLM2-135M asset is not in the cache")
    return str(pretrained.checkpoint("smollm2_135m")[0])


def test_loki_generates_on_smollm2():
    """The real model (30 layers, 9 query heads over 3 KV heads, head dim 64): Loki calibrated on
    one stretch of Austen prose, generating after another; every key read gives dense decode's
    tokens, a quarter of them (the paper's k_f) reads fewer bytes per step."""
    import transformers

    from models import hf_decode
    from tasks import corpora
    from tasks.real_text import _tokens

    saved = _smollm2()
    tok = transformers.AutoTokenizer.from_pretrained(saved)
    text = _tokens(tok, corpora.prose("austen"), 2000, 112)
    calib, ids = text[:64].unsqueeze(0), text[64:].unsqueeze(0)  # 64 calibration tokens, a 48-token prompt
    dense = hf_decode.generate(hf_decode.load(saved, "dense", impl="reference"), ids, 3)
    full = hf_decode.load(saved, "loki", k_f=1.0)
    assert len(hf_decode.calibrate(full, [calib])) == 30
    got = hf_decode.generate(full, ids, 3)
    assert torch.equal(got.tokens, dense.tokens)
    quarter = hf_decode.load(saved, "loki")
    hf_decode.calibrate(quarter, [calib])
    few = hf_decode.generate(quarter, ids, 3, forced=dense.tokens)
    assert all(s["path"] == "Loki" for s in few.stats)
    assert sum(s["bytes_read_per_step"] for s in few.stats) < 0.6 * sum(s["bytes_read_per_step"] for s in dense.stats)
