"""The decode contract (methods/decode.py), its methods (Quest, SparQ, StreamingLLM), the decode
paths of existing methods, and runner=decode. Every reference is written here, per batch element
and head, from the papers' equations; grouped-query K/V throughout (H=4, Hkv=2)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods.base import AttentionInputError
from methods.decode import DenseAdapter, KVCache, SinkWindowAdapter, decode_path
from runners import run
from runners.records import read
from tests.decode_helpers import HKV, B, D, G, H, dense_row, load, qkv, softmax_attend, steps


# ---- dense decode: the reference -------------------------------------------------------------
@pytest.mark.parametrize("name,fallback", [("dense", None), ("bigbird", "dense")])
def test_methods_without_a_decode_path_decode_densely_and_say_so(name, fallback):
    m = load(name, impl="reference")
    path = decode_path(m)
    assert isinstance(path, DenseAdapter) and path.decode_fallback == fallback
    q, k, v = qkv(40)
    for i, out, cache in steps(path, q, k, v, 32):
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))
        assert path.last_step["positions"] is None and cache.length == i + 1
        assert path.last_step["kv_bytes"] == 2 * B * HKV * (i + 1) * D * 8
    assert cache.bytes_held() == 2 * B * HKV * 40 * D * 8


# ---- Quest ----------------------------------------------------------------------------------
def _quest_reference(q, keys, values, page_size, budget):
    """Quest for one query head, from Sec. 3.3 and the official evaluation/quest_attention.py
    (``keep_last_page=False``; the system's rule, the default: tests/test_quest.py):
    per-page channel min/max (pages from slot 0, the last one partial), the bound
    U = sum_i max(q_i M_i, q_i m_i), the top max(3, budget // page) pages, exact attention."""
    S = keys.shape[0]
    pages = [list(range(p, min(p + page_size, S))) for p in range(0, S, page_size)]
    bound = []
    for idx in pages:
        kp = keys[idx]
        M, m = kp.max(0).values, kp.min(0).values
        bound.append(float(sum(max(q[c] * M[c], q[c] * m[c]) for c in range(q.shape[0]))))
        assert bound[-1] >= float((kp @ q).max()) - 1e-9  # an upper bound of the page's best score
    n = min(max(3, budget // page_size), len(pages))
    chosen = sorted(range(len(pages)), key=lambda p: -bound[p])[:n]
    read = sorted(j for p in chosen for j in pages[p])
    return softmax_attend(q, keys[read], values[read]), set(read)


@pytest.mark.parametrize("budget", [12, 20])
def test_quest_decode_against_the_official_page_selection(budget):
    page = 4
    m = load("quest", page_size=page, token_budget=budget, keep_last_page=False)  # the script's rule
    q, k, v = qkv(46)
    taken = 0
    for i, out, _ in steps(m, q, k, v, 37):  # decode crosses page boundaries (40, 44)
        rows = 0  # K/V rows read: each (batch, KV head, key) once, whichever heads of the group read it
        for b in range(B):
            for kvh in range(HKV):
                union = set()
                for h in range(kvh * G, (kvh + 1) * G):
                    ref, read = _quest_reference(q[b, h, i], k[b, kvh, :i + 1], v[b, kvh, :i + 1], page, budget)
                    torch.testing.assert_close(out[b, h, 0], ref)
                    assert {int(p) for p in m.last_step["positions"][b, h] if p >= 0} == read
                    union |= read
                rows += len(union)
        assert not m.last_step["clamped"]
        assert m.last_step["kv_bytes"] == 2 * rows * D * 8
        assert m.last_step["index_bytes"] == 2 * B * HKV * math.ceil((i + 1) / page) * D * 8  # every page's min, max
        taken += 1
    assert taken == 9


def test_quest_budget_larger_than_the_cache_is_clamped_to_dense():
    m = load("quest", page_size=4, token_budget=4096)
    q, k, v = qkv(30)
    for i, out, cache in steps(m, q, k, v, 26):
        assert m.last_step["clamped"]
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))
    # held: K, V and the page minima and maxima at the cache's capacity (30 slots, 8 pages)
    assert cache.bytes_held() == (2 * 30 + 2 * 8) * B * HKV * D * 8


# ---- SparQ ----------------------------------------------------------------------------------
def _sparq_reference(q, keys, values, r, k, reallocation):
    """SparQ Alg. 1 for one query head, as the official sparq_attn computes it: the r largest
    |q_i|, scores softened by sqrt(D ||q[i1]||_1 / ||q||_1), the top k keys attended exactly,
    alpha * y + (1 - alpha) * mean(V) (torch.lerp(V_mean, y, alpha))."""
    Dh, S = q.shape[0], keys.shape[0]
    i1 = sorted(range(Dh), key=lambda c: -abs(float(q[c])))[:r]
    tau = math.sqrt(Dh * float(q[i1].abs().sum()) / float(q.abs().sum()))
    s_hat = torch.softmax(keys[:, i1] @ q[i1] / tau, 0)
    i2 = sorted(range(S), key=lambda j: -float(s_hat[j]))[:min(k, S)]
    y = softmax_attend(q, keys[i2], values[i2])
    if not reallocation:
        return y, set(i2), set(i1)
    alpha = float(s_hat[i2].sum())
    return alpha * y + (1 - alpha) * values.mean(0), set(i2), set(i1)


@pytest.mark.parametrize("reallocation,k_mode", [(True, "store_twice"), (False, "store_once"), (True, "store_once")])
def test_sparq_decode_against_algorithm_1(reallocation, k_mode):
    r, kk = 4, 7
    m = load("sparq", r=r, k=kk, reallocation=reallocation, k_mode=k_mode)
    q, k, v = qkv(36, seed=1)
    for i, out, _ in steps(m, q, k, v, 30):
        rows = comps = 0
        for b in range(B):
            for kvh in range(HKV):
                keys, components = set(), set()
                for h in range(kvh * G, (kvh + 1) * G):
                    ref, read, i1 = _sparq_reference(q[b, h, i], k[b, kvh, :i + 1], v[b, kvh, :i + 1], r, kk,
                                                     reallocation)
                    torch.testing.assert_close(out[b, h, 0], ref)
                    assert {int(p) for p in m.last_step["positions"][b, h]} == read
                    keys, components = keys | read, components | i1
                rows, comps = rows + len(keys), comps + len(components)
        assert m.last_step["kv_bytes"] == 2 * rows * D * 8
        # step 1 reads each component of the group's union over every key, and the value mean
        assert m.last_step["index_bytes"] == comps * (i + 1) * 8 + (B * HKV * D * 8 if reallocation else 0)


def test_sparq_defaults_follow_the_compression_ratio_and_all_of_it_is_dense():
    m = load("sparq")
    q, k, v = qkv(8)
    cache = m.new_cache(B, 320, q.dtype)
    assert m.r == round(D / 8) and m.top_k(cache) == round(320 / 16)  # the official r, k for ratio 8
    full = load("sparq", r=D, k=10_000)  # every component, every key: alpha = 1, exact attention
    for i, out, _ in steps(full, q, k, v, 5):
        assert full.last_step["clamped"]
        for b in range(B):
            for h in range(H):
                torch.testing.assert_close(out[b, h, 0], dense_row(q, k, v, i, b, h))


# ---- sinks + window: StreamingLLM and the existing methods --------------------------------------
def _sink_window_row(q, k, v, i, b, h, sinks, window):
    keep = [j for j in range(i + 1) if j < sinks or i - j < window]
    return softmax_attend(q[b, h, i], k[b, h // G, keep], v[b, h // G, keep]), keep


@pytest.mark.parametrize("name,kw,sinks,window,L", [
    ("streaming_llm", dict(num_sink=2, window=6, impl="reference"), 2, 6, 20),
    ("streaming_llm", dict(num_sink=2, window=6, impl="reference"), 2, 6, 21),  # the prefill wraps the ring
    ("streaming_llm", dict(num_sink=0, window=5, impl="flex"), 0, 5, 20),
    ("sliding_window", dict(window=5, impl="reference"), 0, 5, 23),
    ("minference", dict(pattern="a_shape", num_sink=3, window=6, impl="reference"), 3, 6, 2),  # L < sinks
])
def test_sink_window_decode_matches_its_own_prefill_and_evicts(name, kw, sinks, window, L):
    m = load(name, **kw)
    path = decode_path(m)
    assert path.decode_fallback is None
    assert isinstance(path, SinkWindowAdapter) == (name != "streaming_llm")
    q, k, v = qkv(32, seed=2)
    prefill = m(q, k, v, causal=True)  # the method's own prefill over all 32 tokens
    for i, out, cache in steps(path, q, k, v, L):
        torch.testing.assert_close(out[:, :, 0], prefill[:, :, i])
        for b in range(B):
            for h in range(H):
                ref, keep = _sink_window_row(q, k, v, i, b, h, sinks, window)
                torch.testing.assert_close(out[b, h, 0], ref)
        assert sorted(cache.positions().tolist()) == keep  # the cache holds exactly what is read
        assert path.last_step["kv_bytes"] == 2 * B * HKV * len(keep) * D * 8
    assert cache.bytes_held() == 2 * B * HKV * (sinks + window) * D * 8  # constant, however long


def test_models_lm_decode_of_streaming_llm_keeps_its_pattern():
    """models.lm calls ``decode(q, k, v)`` with the whole cache (SparseMethod's decode)."""
    m = load("streaming_llm", num_sink=2, window=6, impl="reference")
    q, k, v = qkv(24, seed=3)
    torch.testing.assert_close(m.decode(q[:, :, -1:], k, v)[:, :, 0], m(q, k, v, causal=True)[:, :, -1])


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_compute():
    m = load("quest", page_size=4, token_budget=8)
    q, k, v = qkv(12)
    one = lambda t, i: t[:, :, i:i + 1]  # noqa: E731
    with pytest.raises(AttentionInputError, match="another model shape"):
        m.prefill(q, k, v, KVCache(B, 4, D, 16, torch.float64))
    cache = m.new_cache(B, 12, torch.float64)
    with pytest.raises(AttentionInputError, match="decode before prefill"):
        m.decode(one(q, 0), one(k, 0), one(v, 0), cache)
    m.prefill(q[:, :, :11], k[:, :, :11], v[:, :, :11], cache)
    with pytest.raises(AttentionInputError, match="already holds 11 tokens"):
        m.prefill(q, k, v, cache)
    with pytest.raises(AttentionInputError, match="filled by quest"):
        load("sparq").decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="filled by quest"):  # other hyperparameters
        load("quest", page_size=8).decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="one token"):
        m.decode(q[:, :, :2], k[:, :, :2], v[:, :, :2], cache)
    with pytest.raises(AttentionInputError, match="decode query"):
        m.decode(one(q, 11)[:, :2], one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="float32"):
        m.decode(*(one(t, 11).float() for t in (q, k, v)), cache)
    m.decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="capacity of 12"):
        m.decode(one(q, 11), one(k, 11), one(v, 11), cache)
    with pytest.raises(AttentionInputError, match="needs the KVCache"):
        m.decode(one(q, 11), k, v)


@pytest.mark.parametrize("name,kw,match", [
    ("quest", dict(page_size=0), "page_size"), ("sparq", dict(r=D + 1), "r must be"),
    ("sparq", dict(k_mode="thrice"), "k_mode"), ("streaming_llm", dict(window=0), "window"),
])
def test_bad_hyperparameters_are_named(name, kw, match):
    with pytest.raises(ValueError, match=match):
        load(name, **kw)


# ---- runner=decode ----------------------------------------------------------------------------
RUN = ["device=cpu", "dtype=float32", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
       "runner.seq_lens=[48]", "runner.steps=4", "runner.warmup=1", "runner.cpu_threads=1"]


@pytest.mark.parametrize("method,extra", [
    ("quest", ["method.page_size=4", "method.token_budget=16"]),
    ("dense", ["method.impl=reference"]),
    ("bigbird", ["method.impl=reference", "method.block_size=8"]),
])
def test_decode_runner_writes_a_record(method, extra, compose_cfg, store):
    cfg = compose_cfg("runner=decode", f"method={method}", *RUN, *extra, tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    (stored,) = read(store)
    assert stored["run_id"] == rec.run_id and stored["runner"] == "decode" and stored["seq_len"] == 48
    for phase in ("decode_step", "decode_index", "decode_attention"):
        assert set(rec.latency_ms[phase]) == {"p20", "p50", "p80", "p99"}
        assert 0 < rec.latency_ms[phase]["p20"] <= rec.latency_ms[phase]["p99"]
    mt = rec.metrics
    assert len(rec.details["per_step"]["rel_err"]) == 4
    dense_held = 2 * 1 * 2 * 52 * 16 * 4
    assert mt["dense_kv_bytes_end"] == dense_held and mt["prefill_rel_err"] < 1e-5
    assert 0 <= mt["decode_recall_min"] <= mt["decode_recall_mean"] <= 1 + 1e-6
    if method == "quest":
        assert rec.details["decode_path"] == "Quest" and rec.details["decode_fallback"] is None
        assert mt["read_fraction"] < 1 and mt["decode_recall_mean"] < 1  # 16 of ~50 keys read
        assert mt["kv_bytes_held_end"] == dense_held + 2 * 13 * 2 * 16 * 4  # + 13 pages' min and max
    else:
        assert rec.details["decode_fallback"] == (None if method == "dense" else "dense")
        assert mt["decode_rel_err_max"] < 1e-5 and mt["decode_recall_min"] == pytest.approx(1.0, abs=1e-5)
        assert mt["read_fraction"] == 1.0 and mt["kv_bytes_held_end"] == dense_held


def test_decode_runner_fidelity_and_recall_against_a_computation_here(compose_cfg, store):
    """StreamingLLM (2 sinks, 8 recent) on random inputs: each step's error against dense decode
    and its recall (the dense mass on the sinks and the window), recomputed here from the same
    inputs (the fidelity task's random q, k, v at seed + L)."""
    from tasks.fidelity import random_qkv

    cfg = compose_cfg("runner=decode", "method=streaming_llm", *RUN, "runner.inputs=random", "method.num_sink=2",
                      "method.window=8", "method.impl=reference", tiny=False)
    (rec,) = run(cfg)
    assert rec.status == "ok", rec.error
    assert rec.details["peakedness"] is None and rec.details["inputs"] == "random"
    q, k, v = (t.double() for t in random_qkv(1, 4, 2, 52, 16, "cpu", torch.float32, 48))
    for step, i in enumerate(range(48, 52)):
        keep = [j for j in range(i + 1) if j < 2 or i - j < 8]
        recall, err, ref_sq = 0.0, 0.0, 0.0
        for h in range(4):
            p = torch.softmax(k[0, h // 2, :i + 1] @ q[0, h, i] / 4.0, 0)
            recall += float(p[keep].sum()) / 4
            out = torch.softmax(k[0, h // 2, keep] @ q[0, h, i] / 4.0, 0) @ v[0, h // 2, keep]
            ref = p @ v[0, h // 2, :i + 1]
            err, ref_sq = err + float((out - ref).pow(2).sum()), ref_sq + float(ref.pow(2).sum())
        assert rec.details["per_step"]["recall"][step] == pytest.approx(recall, rel=1e-4)
        assert rec.details["per_step"]["rel_err"][step] == pytest.approx(math.sqrt(err / ref_sq), rel=1e-3)
    assert rec.metrics["kv_bytes_held_end"] == 2 * 2 * 10 * 16 * 4  # sinks + window, however long


def test_decode_runner_skips_methods_that_are_not_causal(compose_cfg, store):
    assert run(compose_cfg("runner=decode", "method=linformer", *RUN, tiny=False)) == []
    assert read(store) == []


def test_attnbench_runner_decode_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "runners.cli", "runner=decode", "method=sparq", *RUN,
                        "method.k=8", f"store={tmp_path}/r.jsonl", f"hydra.run.dir={tmp_path}/h"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = read(tmp_path / "r.jsonl")
    assert rec["status"] == "ok" and rec["method"] == "sparq", json.dumps(rec.get("error"))
    assert rec["details"]["peakedness"] == {"num_dominant": 4, "dominance": 8.0}
    assert rec["metrics"]["read_fraction"] < 1


def test_the_prefill_check_takes_the_last_rows_by_chunks():
    """runner=decode checks the prefill's last rows against exact attention in chunks of rows
    (an [L, L] matrix at 128k would need terabytes): equal to a full masked softmax here."""
    from runners.decode import exact_last_rows

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, L, D = 2, 4, 2, 300, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) / D ** 0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    want = (torch.softmax(s, -1) @ vv)[:, :, -70:]
    got = exact_last_rows(q, k, v, 70, chunk=32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
