"""Combiner-Fixed: full attention in every head through a structured factorization.

Ren, Dai, Dai, Yang, Leskovec, Schuurmans and Dai, "Combiner: Full Attention Transformer with
Sparse Computation Cost" (NeurIPS 2021, arXiv 2107.05768), Sec. 3 and Sec. 4.1 (Combiner-Fixed,
the factorization inspired by Sparse Transformer's fixed pattern). Attention is the conditional
expectation A(x_i) = E_{p(j|i)}[v_j]. The keys visible to query i (j <= i when causal) are
partitioned into a direct set Omega_i^0 and regions Omega_i^r (r = 1..n_i), and

    p(j | i) = p(j | i)                              j in Omega_i^0   (direct expectation)
    p(j | i) = p(Omega_i^r | i) q(j | Omega_i^r)     j in Omega_i^r   (local expectation)

so that (Eq. 5-7, one normaliser Z_i for the direct keys and the regions together)

    A(x_i) = sum_{j in Omega_i^0} exp(q_i . k_j) / Z_i * v_j
           + sum_r exp(q_i . k_r) / Z_i * sum_{j in Omega_i^r} q(j | Omega_i^r) v_j
    Z_i    = sum_{j in Omega_i^0} exp(q_i . k_j) + sum_r exp(q_i . k_r)
    q(j | Omega_r) = softmax_{j in Omega_r}(q_r . k_j)
    q_r = max-pool_{j in Omega_r} q_j,   k_r = max-pool_{j in Omega_r} k_j   (the abstractions)

with q already scaled by d^-1/2 (the official code scales q once, before pooling). Every
visible key gets a positive weight: full attention, at O(T (s + T / s)) cost per head.

Combiner-Fixed: the sequence is cut into spans of s = ``span_len`` positions. Causal (the
paper's Fig. 1 (D)): Omega_i^0 = the keys of i's own span up to i; the regions are the earlier
spans, each complete. Non-causal: Omega_i^0 = i's whole span; the regions are the spans'
abstractions. The official code (google-research/combiner, ``tf/approx_attention.py``,
``sqrt_fixed_full``) is the default: there the non-causal case keeps every span as a region,
i's own span included (``noncausal_regions=all``, the own span counted directly and through its
abstraction); ``noncausal_regions=others`` is the paper's partition (regions disjoint from
Omega_i^0). Defaults: s = 128 and max pooling (the official ``SqrtFixedFullLM`` config:
``max_seg_len=128``, ``local_summary=identity-max``); ``pooling=mean`` is the code's other
summary. ``span_len=null`` takes s = ceil(sqrt(T)) (the paper's O(T sqrt(T)) choice).

Harness readings (the official code has self-attention over a length divisible by s): the last
span may be shorter; padded keys are left out of every set, pool and softmax, and padded
positions out of the query pooling; a span with no real key is no region. Combiner pools the
queries of each span, so it needs Tq == Tk (self-attention); a decode step over a cache is
refused, and a decoder's KV cache holds no queries to pool, so there is no decode path (models
decode dense after a Combiner prefill, and say so). The factorization has no weights of its own, but q(j | Omega_r) pools queries and keys:
a model trains with it (``training_free = False``: in place of softmax in a pretrained model it
is an approximation, which the fidelity task measures).
"""
from __future__ import annotations

import math

import torch

from methods.base import (
    AttentionInputError,
    AttentionMethod,
    Cost,
    check_int,
    dense_flops,
    repeat_kv,
)

REGIONS = ("all", "others")
POOLINGS = ("max", "mean")


def side(length: int | None, t: int) -> int:
    """The span (row) length: the configured one, or ceil(sqrt(T)) when None (as the official code)."""
    return length if length is not None else max(1, math.ceil(math.sqrt(t)))


def split_spans(q, k, v, key_padding_mask, s: int):
    """q, k, v [B, H(q), T, D] -> ([B, H, n, s, D] each: keys and values repeated to the query heads,
    in fp32 (fp64 for fp64 inputs), q scaled by 1/sqrt(D), zero-padded to n * s positions), and real
    [B, 1, n, s] (a real key: not padding, not past T)."""
    B, H, T, D = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = repeat_kv(k, H // k.shape[1]).to(dt), repeat_kv(v, H // v.shape[1]).to(dt)
    q = q.to(dt) / math.sqrt(D)
    n = math.ceil(T / s)
    pad = n * s - T
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        real = torch.nn.functional.pad(real, (0, pad), value=False)
    return (*(t.view(B, H, n, s, D) for t in (q, k, v)), real.view(B, 1, n, s))


def seen_regions(n: int, causal: bool, noncausal_regions: str, device) -> torch.Tensor:
    """[n(query span), n(region)] bool: the spans a query's span sees as regions (causal: the earlier
    ones; non-causal: all, or all others with ``noncausal_regions: others``)."""
    a = torch.arange(n, device=device)
    if causal:
        return a[None, :] < a[:, None]
    if noncausal_regions == "others":
        return a[None, :] != a[:, None]
    return torch.ones(n, n, dtype=torch.bool, device=device)


def pair_counts(tk: int, s: int, causal: bool, noncausal_regions: str) -> tuple[int, int, list[int]]:
    """(direct key pairs, query-region pairs, span lengths) of T = tk keys in spans of s."""
    n = math.ceil(tk / s)
    lens = [min(s, tk - r * s) for r in range(n)]
    if causal:
        return sum(m * (m + 1) // 2 for m in lens), sum(r * m for r, m in enumerate(lens)), lens
    return sum(m * m for m in lens), tk * (n if noncausal_regions == "all" else n - 1), lens


class Combiner(AttentionMethod):
    name = "combiner"
    # what the README's method table says (python -m analysis.readme)
    paper = "Ren et al. 2021"
    kind = "full attention, factorized (Combiner-Fixed)"
    official_test = "tests/test_combiner_ponet.py::test_combiner_matches_the_official_code"
    training_free = False

    def __init__(self, span_len: int | None = 128, pooling: str = "max", noncausal_regions: str = "all",
                 **structural):
        super().__init__(**structural)
        if span_len is not None:
            check_int("Combiner", "span_len", span_len)
        if pooling not in POOLINGS:
            raise ValueError(f"Combiner: pooling must be one of {POOLINGS}, got {pooling!r}")
        if noncausal_regions not in REGIONS:
            raise ValueError(f"Combiner: noncausal_regions must be one of {REGIONS}, got {noncausal_regions!r}")
        self.span_len, self.pooling, self.noncausal_regions = span_len, pooling, noncausal_regions

    @property
    def real_kernel(self) -> bool:
        return True  # only the T x (s + T / s) factorized scores are computed

    def span(self, t: int) -> int:
        return side(self.span_len, t)

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        if tq and tk and tq != tk:
            raise AttentionInputError(
                f"Combiner pools the queries of each span: it needs as many queries as keys "
                f"(self-attention, Tq == Tk), got Tq={tq} and Tk={tk}")

    def _pool(self, x, real):
        """x [B, H, n, s, D] pooled over each span's real positions (real [B, 1, n, s])."""
        r = real[..., None]
        if self.pooling == "max":
            return x.masked_fill(~r, float("-inf")).amax(3).nan_to_num(0.0, neginf=0.0)
        return (x * r).sum(3) / r.sum(3).clamp_min(1)

    def attend(self, q, k, v, causal, key_padding_mask):
        B, H, T, D = q.shape
        odt, s = q.dtype, min(self.span(T), T)
        q, k, v, real = split_spans(q, k, v, key_padding_mask, s)
        n = real.shape[2]
        # direct expectation: i's own span (causal: up to i)
        direct = torch.einsum("bhnid,bhnjd->bhnij", q, k)  # [B, H, n, s, s]
        ok_direct = real[:, :, :, None, :]
        if causal:
            ok_direct = ok_direct & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        direct = direct.masked_fill(~ok_direct, float("-inf"))
        # the regions' abstractions k_r, q_r and local expectations sum_j q(j | Omega_r) v_j
        valid = real.any(-1)  # [B, 1, n]: spans holding a real key
        k_r, q_r = self._pool(k, real), self._pool(q, real)  # [B, H, n, D]
        w = torch.einsum("bhnd,bhnjd->bhnj", q_r, k).masked_fill(~real, float("-inf"))
        w = torch.softmax(w, -1).nan_to_num(0.0)
        v_r = torch.einsum("bhnj,bhnjd->bhnd", w, v)  # [B, H, n, D]
        region = torch.einsum("bhnid,bhrd->bhnir", q, k_r)  # [B, H, n(query span), s, n(region)]
        ok_region = seen_regions(n, causal, self.noncausal_regions, q.device)
        ok_region = ok_region[None, None, :, None, :] & valid[:, :, None, None, :]
        region = region.masked_fill(~ok_region, float("-inf"))
        # one softmax over the direct keys and the regions (Z_i)
        p = torch.softmax(torch.cat([direct, region], -1), -1)
        p = p.masked_fill(~torch.cat([ok_direct.expand_as(direct), ok_region.expand_as(region)], -1)
                          .any(-1, keepdim=True), 0.0)  # rows with nothing visible: zeros
        out = torch.einsum("bhnij,bhnjd->bhnid", p[..., :s], v) + torch.einsum("bhnir,bhrd->bhnid", p[..., s:], v_r)
        return out.reshape(B, H, n * s, D)[:, :, :T].to(odt)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        s = min(self.span(tk), max(tk, 1))
        direct, regions, _ = pair_counts(tk, s, causal, self.noncausal_regions)
        # scores and weighted sums of the direct keys and the regions, each span's local
        # expectation (one pooled query over its s keys), the pooling
        flops = h * (4.0 * d * (direct + regions) + 4.0 * d * tk + 2.0 * d * tk)
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
