"""Attention recall on hand-built cases, and the keys methods report computing."""
import math

import pytest
import torch

import methods
from tasks.recall import attention_recall, method_recall


def test_all_keys_give_recall_one_and_density_one():
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    r = attention_recall(q, k, torch.ones(1, 2, 6, 6, dtype=torch.bool), causal=True)
    assert r["recall"] == pytest.approx(1.0, abs=1e-6) and r["density"] == pytest.approx(1.0)


def test_hand_built_scores_give_the_known_share():
    # one query, three keys with scores 0, log 2, log 5 (after the 1/sqrt(D) scale, D = 1):
    # probabilities 1/8, 2/8, 5/8; computing keys 0 and 2 keeps 6/8 at density 2/3.
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(2), math.log(5)]).view(1, 1, 3, 1)
    computed = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    r = attention_recall(q, k, computed, causal=False)
    assert r["recall"] == pytest.approx(0.75, abs=1e-6) and r["density"] == pytest.approx(2 / 3)


def test_causal_rows_count_only_their_visible_keys():
    # two queries over two keys, causal, equal scores: row 0 sees key 0 only, row 1 both keys.
    q, k = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)
    computed = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    r = attention_recall(q, k, computed, causal=True)
    assert r["recall"] == pytest.approx((1.0 + 0.5) / 2) and r["density"] == pytest.approx((1 + 0.5) / 2)
    assert r["recall_min"] == pytest.approx(0.5)


def test_methods_report_the_keys_they_compute():
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    dense = methods.load("dense", num_heads=4, num_kv_heads=2, head_dim=8)
    assert method_recall(dense, q, k, causal=True)["recall"] == pytest.approx(1.0, abs=1e-5)
    sw = methods.load("sliding_window", num_heads=4, num_kv_heads=2, head_dim=8, window=16, impl="reference")
    keys = sw.computed_keys(q, k, causal=True)
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    assert torch.equal(keys[0, 0], (j <= i) & (i - j < 16))
    perf = methods.load("performer", num_heads=4, num_kv_heads=2, head_dim=8)
    assert method_recall(perf, q, k, causal=True) is None  # low-rank: chooses no keys
