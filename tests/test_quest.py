"""Quest's page choice at decode time (methods/quest.py): the official system's rule, the page
being written always read (quest/utils/controller.py), against a reference written here from
Sec. 3.3; and the case that made Quest miss every needle in SmolLM2 (issue 24): a partial last
page whose exact best score beats every full page's loses the ranking by the bound U to the
loose bounds of full pages."""
import math

import pytest
import torch

from methods.base import AttentionInputError
from tests.decode_helpers import HKV, B, D, G, H, load, qkv, softmax_attend, steps


def _bounds(q, keys, page):
    """U(P) = sum_i max(q_i M_i, q_i m_i) of each page of ``keys`` [S, D] (from slot 0, the last
    partial), one channel at a time."""
    S = keys.shape[0]
    out = []
    for p0 in range(0, S, page):
        kp = keys[p0:min(p0 + page, S)]
        M, m = kp.max(0).values, kp.min(0).values
        out.append(sum(max(float(q[c] * M[c]), float(q[c] * m[c])) for c in range(q.shape[0])))
    return out


def _kernel_pages(q, keys, page, budget):
    """The official system's pages for one query head: n = min(max(3, budget // page), pages)
    pages in all, the last page always, the n - 1 others of largest U among the rest."""
    u = _bounds(q, keys, page)
    P = len(u)
    n = min(max(3, budget // page), P)
    others = sorted(range(P - 1), key=lambda p: -u[p])[:n - 1]
    return sorted(others + [P - 1])


def _slots(pages, page, S):
    return {j for p in pages for j in range(p * page, min((p + 1) * page, S))}


@pytest.mark.parametrize("budget", [12, 20])
def test_quest_decode_against_the_official_kernel_selection(budget):
    page = 4
    m = load("quest", page_size=page, token_budget=budget)  # keep_last_page: the default
    q, k, v = qkv(46)
    taken = 0
    for i, out, _ in steps(m, q, k, v, 37):  # decode crosses page boundaries (40, 44): a last page of 1 key
        for b in range(B):
            for h in range(H):
                keys, values = k[b, h // G, :i + 1], v[b, h // G, :i + 1]
                read = _slots(_kernel_pages(q[b, h, i], keys, page, budget), page, i + 1)
                assert i in read  # the step's own key
                torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, values, read))
                assert {int(p) for p in m.last_step["positions"][b, h] if p >= 0} == read
        taken += 1
    assert taken == 9


def _recent_needle():
    """q all ones; the 32 prompt keys about 3 x random signs (a full page's bound about 16 x 3 x 15/16,
    its exact scores 3 x a sum of 16 signs), the step's key (position 32, alone on its page) 2.5
    in every channel: exact score 40 and bound 40, above every prompt key's score and below most
    prompt pages' bounds."""
    g = torch.Generator().manual_seed(3)
    T = 33
    q = torch.ones(B, H, T, D, dtype=torch.float64)
    size = 3.0 + 0.2 * torch.rand(B, HKV, T, D, generator=g, dtype=torch.float64)  # no ties among the bounds
    k = size * (torch.randint(0, 2, (B, HKV, T, D), generator=g).double() * 2 - 1)
    k[:, :, T - 1] = 2.5
    v = torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("keep", [True, False])
def test_the_page_being_written_is_read_though_its_bound_is_tight(keep):
    page, budget = 4, 12
    q, k, v = _recent_needle()
    i = q.shape[2] - 1
    for b in range(B):
        for h in range(H):
            keys = k[b, h // G, :i + 1]
            p = torch.softmax(keys @ q[b, h, i] / math.sqrt(D), 0)
            assert float(p[i]) > 0.5  # dense attention's mass is on the step's own key
            u = _bounds(q[b, h, i], keys, page)
            assert sum(x > u[-1] for x in u[:-1]) >= 3  # while at least 3 full pages outrank its page by U
    m = load("quest", page_size=page, token_budget=budget, keep_last_page=keep)
    (_, out, _), = steps(m, q, k, v, i)
    for b in range(B):
        for h in range(H):
            keys, values = k[b, h // G], v[b, h // G]
            got = {int(x) for x in m.last_step["positions"][b, h] if x >= 0}
            if keep:  # the system's rule: the last page and the 2 full pages of largest U
                read = _slots(_kernel_pages(q[b, h, i], keys, page, budget), page, i + 1)
                assert i in got
            else:  # the accuracy script's rule (evaluation/quest_attention.py): 3 full pages, the key missed
                u = _bounds(q[b, h, i], keys, page)
                read = _slots(sorted(range(len(u)), key=lambda p: -u[p])[:3], page, i + 1)
                assert i not in got
            assert got == read
            torch.testing.assert_close(out[b, h, 0], softmax_attend(q[b, h, i], keys, values, read))


def test_keep_last_page_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_last_page"):
        load("quest", keep_last_page="yes")


def test_a_single_page_cache_reads_it():
    """One page held: nothing else to rank; read as the budget allows (clamped)."""
    m = load("quest", page_size=8, token_budget=64)
    q, k, v = qkv(6)
    for i, out, _ in steps(m, q, k, v, 4):
        assert m.last_step["clamped"]
        for b in range(B):
            for h in range(H):
                ref = softmax_attend(q[b, h, i], k[b, h // G, :i + 1], v[b, h // G, :i + 1])
                torch.testing.assert_close(out[b, h, 0], ref)


def test_decode_before_prefill_is_refused():
    m = load("quest", page_size=4, token_budget=8)
    q, k, v = qkv(4)
    cache = m.new_cache(B, 4, q.dtype)
    with pytest.raises(AttentionInputError, match="before prefill"):
        m.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], cache)
