"""Decode paths of existing methods (issue 24, item 4's last bullet): NSA (its three branches over
the cache), SparseK (scores kept, top-k plus window) and the linear family as recurrent state
updates (Lightning, Cottention, BASED, Performer). Each decode step's output must equal the
method's own causal prefill at that row, for every row of a short sequence, with grouped-query
K/V (H=4, Hkv=2); what the cache holds and what a step reads are recomputed here."""
import math

import pytest
import torch

import methods
from methods.base import AttentionInputError
from methods.decode import KVCache, decode_path
from methods.recurrent_decode import StateCache
from runners import run
from tests.decode_helpers import HKV, B, D, G, H, qkv

T = 40

NSA_KW = dict(block_size=8, num_selected=3, window=8, compress_block=8, compress_stride=4, impl="reference")
PATHS = [
    ("nsa", NSA_KW, "NSADecode"),
    ("nsa", {**NSA_KW, "compress_stride": 8, "num_selected": 2, "window": 5}, "NSADecode"),
    ("sparsek", dict(k=4, window=4, impl="gather"), "SparseKDecode"),
    ("sparsek", dict(k=3, window=6, impl="reference", position_slope=0.3), "SparseKDecode"),
    ("lightning", dict(), "LightningDecode"),
    ("lightning", dict(decay=True, num_layers=3, layer_idx=1, impl="reference"), "LightningDecode"),
    ("cottention", dict(), "CottentionDecode"),
    ("cottention", dict(length_scale="output"), "CottentionDecode"),
    ("cottention", dict(length_scale="none", impl="reference"), "CottentionDecode"),
    ("based", dict(window=5), "BasedDecode"),
    ("based", dict(window=0, impl="reference"), "BasedDecode"),
    ("performer", dict(num_features=32), "PerformerDecode"),
    ("performer", dict(num_features=32, kernel="relu", impl="reference"), "PerformerDecode"),
]


def _load(name, **kw):
    m = methods.load(name, num_heads=H, head_dim=D, num_kv_heads=HKV, max_seq_len=512, **kw)
    with torch.no_grad():  # trained-looking weights: gates and scores that differ per head and key
        g = torch.Generator().manual_seed(7)
        if name == "nsa":
            m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
            m.gate.bias.copy_(torch.randn(3, generator=g))
        if name == "sparsek":
            m.score.weight.copy_(torch.randn(m.score.weight.shape, generator=g))
    return m


def _steps(path, q, k, v, L):
    cache = path.new_cache(B, q.shape[2], q.dtype)
    pre = path.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], cache)
    yield L - 1, pre, cache
    for i in range(L, q.shape[2]):
        yield i, path.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache), cache


@pytest.mark.parametrize("L", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kw,cls", PATHS)
def test_decode_step_equals_the_methods_own_prefill_row(name, kw, cls, dtype, L):
    m = _load(name, **kw)
    path = decode_path(m)
    assert type(path).__name__ == cls and path.decode_fallback is None
    q, k, v = qkv(T, dtype=dtype, seed=3)
    with torch.no_grad():
        want = m(q, k, v, causal=True)  # the method's own prefill over all T tokens
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
        if name == "nsa":  # its gates are computed in fp32 (the gate's weights)
            tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else tol
        for i, out, cache in _steps(path, q, k, v, L):
            if i == L - 1:
                torch.testing.assert_close(out, want[:, :, :L], **tol)  # the prefill itself
                continue
            torch.testing.assert_close(out[:, :, 0], want[:, :, i], **tol)
            info = path.last_step
            assert info["bytes_read"] == info["index_bytes"] + info["kv_bytes"] > 0


# ---- what the caches hold, recomputed here -----------------------------------------------------
def _state_bytes(name, kw, dtype):
    el = 8 if dtype == torch.float64 else 4
    if name == "lightning":  # S per KV head; per query head with decay
        return B * (H if kw.get("decay") else HKV) * D * D * el
    if name == "cottention":  # value scaling is per query head
        return B * (H if kw.get("length_scale", "value") == "value" else HKV) * D * D * el
    if name == "based":  # Taylor S and z per KV head, plus the window's K/V rows (the inputs' dtype)
        f = 1 + D + D * D
        return B * HKV * (f * D + f) * el + 2 * B * HKV * kw["window"] * D * el
    m = kw["num_features"]  # performer: S, z and the running maximum (softmax kernel)
    return B * HKV * (m * D + m + (kw.get("kernel", "softmax") == "softmax")) * el


@pytest.mark.parametrize("name,kw,cls", [p for p in PATHS if p[0] not in ("nsa", "sparsek")])
def test_linear_decode_holds_a_state_of_fixed_size(name, kw, cls):
    path = decode_path(_load(name, **kw))
    q, k, v = qkv(T, seed=4)
    want = _state_bytes(name, kw, torch.float64)
    with torch.no_grad():
        for i, _, cache in _steps(path, q, k, v, 9):
            assert cache.bytes_held() == want  # however long the sequence
            if i >= 9:
                rows = 2 * B * HKV * min(kw.get("window", 0), i + 1) * D * 8
                assert path.last_step["kv_bytes"] == rows and path.last_step["bytes_read"] == want
    assert isinstance(cache, StateCache) == (kw.get("window", 0) == 0)


def test_nsa_decode_compresses_blocks_as_they_complete_and_reads_selection_plus_window():
    """With the compression MLP at its initial block means and no position embedding, each
    compressed key is the mean of its block (computed here); every position a step reads is in
    the chosen blocks (at or before t) or the window, each counted once."""
    m = _load("nsa", **NSA_KW)
    path = decode_path(m)
    q, k, v = qkv(T, seed=5)
    l, d, bs, w = 8, 4, 8, 8
    with torch.no_grad():
        for i, _, cache in _steps(path, q, k, v, 11):
            n = 0 if i + 1 < l else (i + 1 - l) // d + 1
            means = torch.stack([k[:, :, j * d:j * d + l].mean(2) for j in range(n)], 2) if n else None
            if n:
                torch.testing.assert_close(cache.aux["cmp_k"][:, :, :n], means)
            assert not cache.aux["cmp_k"][:, :, n:].any()  # blocks still incomplete: not yet compressed
            if i < 11:
                continue
            pos = path.last_step["positions"]  # [B, H, n]
            for b in range(B):
                for h in range(H):
                    got = [p for p in pos[b, h].tolist() if p >= 0]
                    assert len(got) == len(set(got)) and max(got) == i  # once each; the new token read
                    blocks = {p // bs for p in got if i - p >= w}
                    assert len(blocks) <= 3 and all(i - p < w or p // bs in blocks for p in got)
                    assert set(range(max(0, i - w + 1), i + 1)) <= set(got)  # the window
                assert torch.equal(pos[b, 0], pos[b, 1]) and torch.equal(pos[b, 2], pos[b, 3])  # per GQA group
            rows = sum(len({p for p in pos[b, h * G].tolist() if p >= 0}) for b in range(B) for h in range(HKV))
            assert path.last_step["kv_bytes"] == 2 * rows * D * 8
            assert path.last_step["index_bytes"] == 2 * B * HKV * n * D * 8


def test_sparsek_decode_reads_the_top_k_scores_and_the_window():
    """The scores are w . k_j + b + slope * j (computed here); a step reads the window and the
    k best-scoring keys before it (those the SparseK operator gives a weight > 0)."""
    kk, w, slope = 3, 6, 0.3
    m = _load("sparsek", k=kk, window=w, impl="reference", position_slope=slope)
    path = decode_path(m)
    q, k, v = qkv(T, seed=6)
    wt, bias = m.score.weight.detach().double()[0], float(m.score.bias.detach())
    u = k @ wt + bias + slope * torch.arange(T, dtype=torch.float64)  # [B, Hkv, T]
    with torch.no_grad():
        for i, _, cache in _steps(path, q, k, v, 5):
            torch.testing.assert_close(cache.aux["score"][:, :, :i + 1], u[:, :, :i + 1], rtol=1e-6, atol=1e-6)
            if i < 5:
                continue
            pos = path.last_step["positions"]
            for b in range(B):
                for h in range(H):
                    got = {p for p in pos[b, h].tolist() if p >= 0}
                    win = set(range(max(0, i - w + 1), i + 1))
                    assert win <= got
                    top = set(u[b, h // G, :max(0, i - w + 1)].topk(min(kk, max(0, i - w + 1))).indices.tolist())
                    assert got - win <= top  # only top-k keys besides the window (weight 0 ones are skipped)
            assert path.last_step["index_bytes"] == B * HKV * max(0, i - w + 1) * 8


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,cls", [PATHS[0], PATHS[2], PATHS[4], PATHS[9], PATHS[11]])
def test_bad_input_is_refused(name, kw, cls):
    path = decode_path(_load(name, **kw))
    q, k, v = qkv(12)
    one = lambda t, i: t[:, :, i:i + 1]  # noqa: E731
    cache = path.new_cache(B, 12, torch.float64)
    with pytest.raises(AttentionInputError, match="decode before prefill"):
        path.decode(one(q, 0), one(k, 0), one(v, 0), cache)
    with pytest.raises(AttentionInputError, match="another model shape"):
        path.prefill(q, k, v, KVCache(B, 1, D, 12, torch.float64))
    path.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], cache)
    held = cache.bytes_held()
    with pytest.raises(AttentionInputError, match="one token"):
        path.decode(q[:, :, :2], k[:, :, :2], v[:, :, :2], cache)
    with pytest.raises(AttentionInputError, match="decode query"):
        path.decode(one(q, 11)[:, :2], one(k, 11), one(v, 11), cache)
    other = "dense" if name != "dense" else "quest"
    with pytest.raises(AttentionInputError, match=f"filled by {name}"):
        decode_path(_load(other)).decode(one(q, 11), one(k, 11), one(v, 11), cache)
    assert cache.seen == 11 and cache.bytes_held() == held  # nothing was written
    path.decode(one(q, 11), one(k, 11), one(v, 11), cache)


# ---- runner=decode -------------------------------------------------------------------------------
RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[40]", "runner.steps=3", "runner.warmup=1", "runner.cpu_threads=1"]


@pytest.mark.parametrize("method,extra,path", [
    ("nsa", ["method.impl=reference", "method.block_size=8", "method.num_selected=2", "method.window=8",
             "method.compress_block=8", "method.compress_stride=4"], "NSADecode"),
    ("sparsek", ["method.k=4", "method.window=8"], "SparseKDecode"),
    ("lightning", [], "LightningDecode"),
])
def test_decode_runner_records_the_decode_path(method, extra, path, compose_cfg, store):
    (rec,) = run(compose_cfg("runner=decode", f"method={method}", *RUN, *extra, tiny=False))
    assert rec.status == "ok", rec.error
    assert rec.details["decode_path"] == path and rec.details["decode_fallback"] is None
    assert rec.details["phases"] == {"prefill": f"{method} (its own causal prefill)", "decode": path}
    mt = rec.metrics
    assert mt["read_fraction"] < 1 and math.isfinite(mt["decode_rel_err_max"])
    if method == "lightning":  # a state: no key read, the same bytes however long the context
        assert mt["decode_recall_mean"] is None and rec.details["per_step"]["recall"] == [None] * 3
        # batch 1, a state per KV head:
        assert mt["kv_bytes_held_end"] == mt["kv_bytes_held_prefill"] == 1 * HKV * D * D * 4
    else:
        assert 0 < mt["decode_recall_min"] <= 1 + 1e-6


# ---- the decode leaderboard: table and plots from runner=decode records ------------------------
def test_decode_report_table_and_plots(compose_cfg, store, tmp_path):
    from analysis.leaderboard import decode_report, main
    from analysis.records import load
    from analysis.tables import decode_table

    runs = [("dense", ["method.impl=reference"]), ("quest", ["method.page_size=4", "method.token_budget=8"]),
            ("lightning", [])]
    for method, extra in runs:
        cfg = compose_cfg("runner=decode", f"method={method}", *RUN, *extra, "runner.seq_lens=[24,40]", tiny=False)
        assert all(r.status == "ok" for r in run(cfg))
    df = load(store)
    table = decode_table(df)
    assert list(table["method"]) == ["dense"] * 2 + ["lightning"] * 2 + ["quest"] * 2  # dense first
    assert list(table["L"]) == [24, 40] * 3
    assert list(table["decode path"]) == ["DenseAdapter"] * 2 + ["LightningDecode"] * 2 + ["Quest"] * 2
    for _, row in table.iterrows():  # each cell is its record's figure
        r = df[(df["method"] == row["method"]) & (df["seq_len"] == row["L"])].iloc[0]
        assert row["step p50 ms"] == f"{r['latency.decode_step.p50']:.3f}"
        assert row["selection share"] == f"{r['latency.decode_index.p50'] / r['latency.decode_step.p50']:.0%}"
        assert row["KiB read / step"] == f"{r['metric.bytes_read_per_step'] / 1024:.1f}"
        recall = r["metric.decode_recall_mean"]  # none for Lightning's state: no key read
        assert row["recall"] == ("-" if row["method"] == "lightning" else f"{recall:.3f}")
    files = decode_report(df, tmp_path / "decode")
    assert [f.name for f in files] == ["decode_table.md", "step_latency.png", "recall_vs_bytes.png"]
    assert all(f.stat().st_size > 1000 for f in files[1:])
    assert "| quest " in files[0].read_text() and "LightningDecode" in files[0].read_text()
    assert main(["--store", store, "--decode-dir", str(tmp_path / "again")]) == 0  # the one command
    assert (tmp_path / "again" / "recall_vs_bytes.png").exists()


# ---- generation in a transformers model through these decode paths ------------------------------
@pytest.mark.parametrize("name,kw,cls", [
    ("nsa", dict(block_size=4, num_selected=2, window=4, compress_block=4, compress_stride=2, impl="reference"),
     "NSADecode"),
    ("lightning", dict(), "LightningDecode"),
])
def test_generation_through_the_decode_path_gives_the_prefill_logits(name, kw, cls, tmp_path):
    """A tiny Llama (4 query heads, 2 KV heads) generates through each layer's decode path; fed
    the same tokens (teacher forcing), each step's logits equal those of the method's own
    prefill over the whole sequence at that position, and the stats name the decode path."""
    transformers = pytest.importorskip("transformers")
    from models import hf, hf_decode

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    forced = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    got = hf_decode.generate(hf_decode.load(str(tmp_path), name, **kw), ids, 6, forced=forced)
    assert [s["path"] for s in got.stats] == [cls, cls] and all(s["decode_fallback"] is None for s in got.stats)
    with torch.no_grad():
        pre = hf.load(str(tmp_path), name, **kw)(input_ids=torch.cat([ids, forced], 1)).logits
    for j, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, pre[:, 20 + j], rtol=1e-4, atol=1e-4)
