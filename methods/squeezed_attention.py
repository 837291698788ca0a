"""Squeezed Attention: offline clustering of a fixed context's keys, centroid lookup at decode.

Hooper, Kim, Mohammadzadeh, Maheswaran, Paik, Mahoney, Keutzer, Gholami, "Squeezed Attention:
Accelerating Long Context Length LLM Inference" (arXiv 2411.09688, 2024), Sec. 3 (Eq. 1-3) and
Sec. 4; official code SqueezeAILab/SqueezedAttention (``offline_clustering.py``:
``--percent_clusters``, ``--observation_window 100``, ``run_global_threshold``).

The prefill is the fixed context (a document asked many questions). Offline, its keys (all but
the last ``observation_window`` tokens) are clustered per KV head with k-means (Lloyd), into
C = max(1, floor(percent_clusters / 100 * n)) centroids c_i with N_i keys each. At decode the
query q of a head compares itself with the centroids only; the estimated attention of a key in
cluster i is the centroid's score, normalised as if each centroid stood for its N_i keys
(Sec. 3.2):

    S_i = exp(q . c_i / sqrt(D)) / sum_l N_l exp(q . c_l / sqrt(D))

and the keys of the clusters with S_i >= T are read (``selection="threshold"``); T is calibrated
once per layer on the prefill: the ``sparsity`` quantile of S_{label(j)} over the clustered keys
j and the queries of the observation window, every head (the official ``run_global_threshold``:
a global threshold for a target sparsity). ``selection="fraction"`` keeps, per step and head,
the clusters of largest S_i until they hold (1 - sparsity) of the clustered keys (a fixed
budget instead of a threshold). Attention is exact over the kept keys and over every key not
clustered (the observation window and each generated token: the paper attends them densely):

    o = softmax(q K_R^T / sqrt(D)) V_R,   R = {j : S_label(j) >= T} + unclustered keys

Defaults as the official scripts: 5% of the keys as centroids, an observation window of 100,
sparsity 0.7 (their 70% setting; the paper also reports 90%).

``hierarchical=True``: the two-level lookup (Sec. 4.2; ``offline_clustering.py
--hierarchical_lookup``). The fine (L2) level clusters the keys into C2 = floor(percent_clusters /
100 * n) centroids as above; the coarse (L1) level clusters the L2 centroids into C1 =
max(1, floor(percent_clusters_l1 / 100 * n)) (at most C2) centroids (k-means of the L2
centroids, as the official ``run_clustering(centroids_l2, ...)``); an L1 cluster's size N_i is
the number of keys under it. Two global thresholds are calibrated as above: T1 at the
``sparsity_l1`` quantile of the L1 scores (the official ``--percentile_lower``, 0.5), T2 at
``sparsity`` of the L2 scores. At decode a query scores the L1 centroids, keeps those with S1_i >=
T1, then scores the L2 centroids under the kept L1 clusters, with the L2 denominator summed over
those only (the official online code zeroes N_j of an L2 cluster whose parent was pruned), and
reads the keys of the L2 clusters with S2_j >= T2. Defaults as the paper's hierarchical setting:
L1 1%, L2 5% (``percent_clusters``), L1 threshold at 0.5. Threshold selection only. The
reference computes every L2 score (masked); ``index_bytes`` counts what the lookup needs: the
L1 centroids and sizes, the L2 centroids and sizes under the kept L1 clusters (each (batch, KV
head) once) and the labels.

k-means (``kmeans``) starts from n / C evenly spaced keys
(deterministic) and runs ``kmeans_iters`` Lloyd iterations on the L2 distance.

Bytes per step (``last_step``): the centroids, their sizes N_i and each clustered key's label
(``index_bytes``),
and the K/V rows read (each (batch, KV head, row) once). ``last_step["stats"]["kept_fraction"]``:
the share of clustered keys read.
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection

SELECTIONS = ("threshold", "fraction")


def kmeans(x: torch.Tensor, num_clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the L2 distance of each row set x [..., n, D] (batched over the leading
    dimensions): centroids [..., C, D] and labels [..., n] (long). Starts from the keys at the C
    evenly spaced indices round(i (n - 1) / (C - 1)); an empty cluster keeps its centroid."""
    n = x.shape[-2]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"kmeans: num_clusters must be in [1, {n}], got {num_clusters}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    start = torch.linspace(0, n - 1, num_clusters, device=x.device).round().long()
    c = x[..., start, :].clone()
    labels = _nearest(x, c)
    for _ in range(int(iters)):
        count = cluster_sizes(labels, num_clusters).to(dt).unsqueeze(-1)  # [..., C, 1]
        total = torch.zeros_like(c).scatter_add_(-2, labels.unsqueeze(-1).expand_as(x), x)
        c = torch.where(count > 0, total / count.clamp_min(1), c)
        labels = _nearest(x, c)
    return c, labels


def cluster_sizes(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """N_i: the members of each cluster, labels [..., n] -> [..., C] (int32)."""
    out = torch.zeros(*labels.shape[:-1], num_clusters, dtype=torch.int32, device=labels.device)
    return out.scatter_add_(-1, labels, torch.ones_like(labels, dtype=torch.int32))


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest centroid (L2) of every row of x [..., n, D] among c [..., C, D] (rows in
    chunks: the distances of a chunk at a time)."""
    cc = (c * c).sum(-1).unsqueeze(-2)  # ||x||^2 is the same for all centroids
    return torch.cat([(cc - 2 * x[..., i:i + chunk, :] @ c.transpose(-1, -2)).argmin(-1)
                      for i in range(0, x.shape[-2], chunk)], dim=-1)


class SqueezedAttention(DensePrefill, DecodePath, AttentionMethod):
    name = "squeezed_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Hooper et al. 2024"
    kind = "sparse decode (key clusters of a fixed context), training-free"
    official_test = None  # the test follows the paper's equations; no test against the official code yet
    exact = True  # the prefill is dense; the decode selects clusters
    impls = ("reference",)

    def __init__(self, percent_clusters: float = 5.0, sparsity: float = 0.7, observation_window: int = 100,
                 selection: str = "threshold", kmeans_iters: int = 10, hierarchical: bool = False,
                 percent_clusters_l1: float = 1.0, sparsity_l1: float = 0.5, impl: str = "reference",
                 **structural):
        super().__init__(impl=impl, **structural)
        if not 0 < percent_clusters <= 100:
            raise ValueError(f"SqueezedAttention: percent_clusters must be in (0, 100], got {percent_clusters}")
        if not 0 <= sparsity < 1:
            raise ValueError(f"SqueezedAttention: sparsity must be in [0, 1), got {sparsity}")
        if observation_window < 0 or kmeans_iters < 0:
            raise ValueError(f"SqueezedAttention: observation_window and kmeans_iters must be >= 0, got "
                             f"{observation_window}, {kmeans_iters}")
        if selection not in SELECTIONS:
            raise ValueError(f"SqueezedAttention: selection must be one of {list(SELECTIONS)}, got {selection!r}")
        if not 0 < percent_clusters_l1 <= 100:
            raise ValueError(f"SqueezedAttention: percent_clusters_l1 must be in (0, 100], got {percent_clusters_l1}")
        if not 0 <= sparsity_l1 < 1:
            raise ValueError(f"SqueezedAttention: sparsity_l1 must be in [0, 1), got {sparsity_l1}")
        if hierarchical and selection != "threshold":
            raise ValueError(f"SqueezedAttention: the hierarchical lookup needs selection='threshold', got {selection!r}")
        self.hierarchical, self.percent_clusters_l1 = bool(hierarchical), float(percent_clusters_l1)
        self.sparsity_l1 = float(sparsity_l1)
        self.percent_clusters, self.sparsity = float(percent_clusters), float(sparsity)
        self.observation_window, self.selection = int(observation_window), selection
        self.kmeans_iters = int(kmeans_iters)

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"percent_clusters": self.percent_clusters, "observation_window": self.observation_window,
                "kmeans_iters": self.kmeans_iters, "sparsity": self.sparsity, "hierarchical": self.hierarchical,
                **({"percent_clusters_l1": self.percent_clusters_l1, "sparsity_l1": self.sparsity_l1}
                   if self.hierarchical else {})}

    def num_clusters(self, n: int) -> int:
        return max(1, math.floor(self.percent_clusters / 100 * n))

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        out = super().prefill(q, k, v, cache)  # checks, stores, clusters (build_index)
        if "centroids" in cache.aux:
            cache.aux["threshold"] = self._calibrate(q, cache, cache.aux["centroids"], cache.aux["counts"],
                                                     self.sparsity)
            if self.hierarchical:
                cache.aux["threshold_l1"] = self._calibrate(q, cache, cache.aux["centroids_l1"],
                                                            cache.aux["counts_l1"], self.sparsity_l1)
        return out

    def build_index(self, cache: KVCache) -> None:
        n = cache.length - self.observation_window
        if n < 1:
            return  # nothing to cluster: every key is read
        c, labels = kmeans(cache.k[:, :, :n], self.num_clusters(n), self.kmeans_iters)
        cache.aux["centroids"] = c.to(cache.dtype)
        cache.aux["labels"] = labels.to(torch.int32)
        cache.aux["counts"] = cluster_sizes(labels, c.shape[2])  # N_i
        if self.hierarchical:  # L1: k-means of the L2 centroids; N_i: the keys under each
            C1 = min(c.shape[2], max(1, math.floor(self.percent_clusters_l1 / 100 * n)))
            c1, parent = kmeans(c, C1, self.kmeans_iters)
            cache.aux["centroids_l1"] = c1.to(cache.dtype)
            cache.aux["parent"] = parent  # [B, Hkv, C2]: each L2 centroid's L1 cluster
            cache.aux["counts_l1"] = torch.zeros_like(cache.aux["counts"][..., :C1]).scatter_add_(
                -1, parent, cache.aux["counts"])

    def log_scores(self, q, cache: KVCache, centroids=None, counts=None) -> torch.Tensor:
        """log S_i of every centroid (default: the L2 level's) for queries q [B, H, T, D]: [B, H, T, C]
        (fp32, fp64 inputs fp64). ``counts`` [B, Hkv, C] or, per query head, [B, H, C]."""
        B, H, T, D = q.shape
        Hkv = cache.num_kv_heads
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        c = (cache.aux["centroids"] if centroids is None else centroids).to(dt)  # [B, Hkv, C, D]
        C = c.shape[2]
        count = (cache.aux["counts"] if counts is None else counts).to(dt)
        z = (q.to(dt).reshape(B, Hkv, H // Hkv, T, D) @ c.unsqueeze(2).transpose(-1, -2)) / math.sqrt(D)
        logn = count.log().view(B, Hkv, -1, 1, C)  # [B, Hkv, 1 or G, 1, C]
        log_den = torch.logsumexp(z + logn, dim=-1, keepdim=True)
        return (z - log_den).view(B, H, T, C)

    def _calibrate(self, q, cache: KVCache, centroids, counts, sparsity: float) -> torch.Tensor:
        """T: the ``sparsity`` quantile of S_label(j) over clustered keys j and the observation
        window's queries (a weighted quantile over clusters, each weighing its N_i keys)."""
        if sparsity == 0:
            return torch.zeros((), dtype=torch.float64)  # every cluster passes
        L, w = q.shape[2], self.observation_window
        obs = q[:, :, max(0, L - w):]
        s = self.log_scores(obs, cache, centroids, counts).exp()  # [B, H, Tw, C]
        B, H, Tw, C = s.shape
        Hkv = cache.num_kv_heads
        weight = counts.to(s.dtype).repeat_interleave(H // Hkv, 1).unsqueeze(2).expand(B, H, Tw, C)
        vals, order = s.flatten().sort()
        cum = weight.flatten()[order].cumsum(0)
        i = int(torch.searchsorted(cum, sparsity * float(cum[-1])))
        return vals[min(i, vals.numel() - 1)].double().cpu()

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        if "centroids" not in cache.aux:
            return Selection()
        B, H = q_t.shape[:2]
        Hkv, S = cache.num_kv_heads, cache.length
        labels = cache.aux["labels"].long()  # [B, Hkv, n]
        n, C = labels.shape[2], cache.aux["centroids"].shape[2]
        G = H // Hkv
        extra = {}
        # T (and T1) are 0-dim tensors held on the host (``_calibrate``): compared as scalars,
        # with no read-back, so the step replays from a CUDA graph
        if self.hierarchical:  # L1 first; the L2 denominator over the kept L1 clusters' children only
            logs1 = self.log_scores(q_t, cache, cache.aux["centroids_l1"], cache.aux["counts_l1"])[:, :, 0]
            keep1 = logs1.exp() >= cache.aux["threshold_l1"]  # [B, H, C1]
            parent = cache.aux["parent"].unsqueeze(2).expand(-1, -1, G, -1)  # [B, Hkv, G, C2]
            under = keep1.view(B, Hkv, G, -1).gather(-1, parent).view(B, H, C)  # [B, H, C2]
            counts = cache.aux["counts"].repeat_interleave(G, 1) * under
            logs = self.log_scores(q_t, cache, counts=counts)[:, :, 0]
            keep = (logs.exp() >= cache.aux["threshold"]) & under
            extra["under"] = under
        elif self.selection == "threshold":
            logs = self.log_scores(q_t, cache)[:, :, 0]  # [B, H, C]
            keep = logs.exp() >= cache.aux["threshold"]
        else:  # the largest S_i until (1 - sparsity) of the clustered keys
            logs = self.log_scores(q_t, cache)[:, :, 0]
            count = cache.aux["counts"].to(logs.dtype).repeat_interleave(H // Hkv, 1)
            order = logs.argsort(-1, descending=True)
            before = count.gather(-1, order).cumsum(-1) - count.gather(-1, order)  # keys of the clusters ahead
            keep = torch.zeros_like(logs, dtype=torch.bool).scatter(-1, order, before < (1 - self.sparsity) * n)
        kept = keep.view(B, Hkv, G, C).gather(-1, labels.unsqueeze(2).expand(-1, -1, G, -1)).view(B, H, n)
        valid = torch.ones(B, H, S, dtype=torch.bool, device=q_t.device)  # the observation window: always read
        valid[:, :, :n] = kept
        # every slot, those of pruned clusters invalid: a selection of fixed size (no host
        # synchronisation to count the kept keys, no sort); the gather kernel skips invalid rows
        slots = torch.arange(S, device=q_t.device).expand(B, H, S)
        index_bytes = float(B * Hkv * (C * (cache.row_bytes() + 4) + n * 4))  # centroids, N_i, labels (int32)
        if self.hierarchical:  # the L1 centroids and sizes; the L2 ones are counted in step_info
            index_bytes = float(B * Hkv * (cache.aux["centroids_l1"].shape[2] * (cache.row_bytes() + 4) + n * 4))
        extra["base_bytes"] = index_bytes
        return Selection(slots=slots, valid=valid, index_bytes=index_bytes, extra={"kept": kept, **extra})

    def step_info(self, cache: KVCache, sel: Selection) -> dict:
        under = sel.extra.get("under")
        if under is not None:  # the L2 centroids and sizes under a kept L1 cluster, each (batch, KV head) once
            B, Hkv = cache.batch, cache.num_kv_heads
            rows = under.view(B, Hkv, self.num_heads // Hkv, -1).any(2).sum()  # on device
            sel.index_bytes = sel.extra["base_bytes"] + rows * (cache.row_bytes() + 4)
        info = super().step_info(cache, sel)
        if self.step_record != "full":  # the bytes only (model generation)
            return info
        kept = sel.extra.get("kept")
        info["stats"] = {"kept_fraction": 1.0 if kept is None else float(kept.float().mean())}
        return info


__all__ = ["SqueezedAttention", "kmeans"]
