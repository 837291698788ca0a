"""RetrievalAttention: approximate nearest-neighbour search over the keys at decode time, with an
index that links the prefill's queries to their keys.

Liu, Chen, Lu, Jiang, Han, Zhang, Chen, Zhang, Ding, Zhang, Chen, Yang, Yang, Qiu,
"RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
(arXiv 2409.10516, 2024), Sec. 3 (the query/key distribution gap) and Sec. 4 (attention-aware
vector index; CPU-GPU co-execution).

The cache is split into a static part, the first ``num_sink`` tokens and the ``window`` most
recent ones (kept on the GPU in the paper, read at every step), and the rest, held in a vector
index and searched by each decode query. Queries and keys are differently distributed (Sec. 3),
so an index built on the keys alone must scan a large share of them; the paper builds its graph
index from the prefill's queries, linking each query to its exact nearest keys (inner product),
so that a search guided by a query finds the keys similar queries attended. This module keeps
that idea with an inverted-file index (IVF), the brief's fallback to a graph library (no
well-kept ANN library on PyPI models the query-to-key links: faiss and hnswlib index keys by
themselves):

  index   k-means (Lloyd, L2) over the indexed keys of each KV head into C = num_clusters
          (None: ceil(sqrt(n))) lists; each key in the list of its nearest centroid; and, for
          every prefill query q_i (each head of the group), its ``query_links`` keys of largest
          q_i . k_j (j <= i, indexed) added to the list of the centroid the query probes first,
          argmax_c q_i . c (the query-to-key links; 0: a plain IVF over keys); each list keeps
          its ``max_links`` most linked keys (a degree bound, as a graph index has; None: the mean
          list size). A key leaving the recent window joins the list of its nearest centroid.
          The lists are stored padded ([B, Hkv, C, longest list + the tokens the cache can still
          take]) with a count per list, so that an append and a search keep fixed shapes: no host
          synchronisation per step (capturable in a CUDA graph).
  search  per query head: the ``nprobe`` centroids of largest q . c; candidates = the keys of
          their lists and links (a key listed twice counted once); only they are gathered and
          scored, so a step reads the C centroids and the probed lists, not every key; the
          ``top_k`` candidates of largest q . k_j (exact) are retrieved.
          Cost note: the search gathers nprobe x (longest list + decode growth + links) key
          slots per query head, padding masked; with an unbalanced k-means (a few long lists)
          the step's time grows past what the bytes count (the distinct real rows scanned).
  attend  exact attention over static + retrieved keys; the paper computes the two parts on GPU
          and CPU and merges them by their log-sum-exp, which is the same softmax:
              o = softmax(q K_R^T / sqrt(D)) V_R,   R = sinks + window + retrieved

A fork of the released code (minsikky/RetrievalAttention, benchmark/config.py) builds the
graph form: each prefill query's q_knn = 32 nearest keys linked, key degree capped at 64; this
module keeps the IVF form above (the closest one tested here without a graph library).
Defaults: top_k 100, 128 sinks and a window of 512 (as we read the paper's setting; the public
repository ships its successor's binaries, not this configuration), nprobe 8 of ceil(sqrt(n))
lists (about 2% of the keys at 128k: the paper's "1-3% of keys scanned"), 16 links per query,
at most the mean list size of linked keys per list.
A top_k of at least the indexed keys retrieves them all (``last_step["clamped"]``). The prefill
is dense. ``step_info`` (outside the timed phases) scores every key exactly for the recall
statistic; the bytes count only what the search touched.

Bytes per step (``last_step``): the centroids and the candidate keys scanned (``index_bytes``,
each (batch, KV head, key) once) and the K/V rows attended. ``last_step["stats"]``:
``topk_recall`` (share of the exact top_k of the indexed keys, by q . k, that the search
retrieved, mean over batch and heads) and ``scanned_fraction`` (candidates / indexed keys).
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection, distinct_rows
from methods.squeezed_attention import _nearest, kmeans


class RetrievalAttention(DensePrefill, DecodePath, AttentionMethod):
    name = "retrieval_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Liu et al. 2024"
    kind = "sparse decode (query-aware vector retrieval), training-free"
    official_test = None  # the test follows the paper's description; the official code is not public
    exact = True  # the prefill is dense; the decode retrieves keys
    impls = ("reference",)

    def __init__(self, top_k: int = 100, num_sink: int = 128, window: int = 512, num_clusters: int | None = None,
                 nprobe: int = 8, query_links: int = 16, max_links: int | None = None, kmeans_iters: int = 10,
                 impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        for n, x in (("top_k", top_k), ("nprobe", nprobe), ("window", window)):
            if x < 1:
                raise ValueError(f"RetrievalAttention: {n} must be >= 1, got {x}")
        for n, x in (("num_sink", num_sink), ("query_links", query_links), ("kmeans_iters", kmeans_iters)):
            if x < 0:
                raise ValueError(f"RetrievalAttention: {n} must be >= 0, got {x}")
        for n, x in (("num_clusters", num_clusters), ("max_links", max_links)):
            if x is not None and x < 1:
                raise ValueError(f"RetrievalAttention: {n} must be >= 1 (or null), got {x}")
        self.max_links = None if max_links is None else int(max_links)
        self.top_k, self.num_sink, self.window = int(top_k), int(num_sink), int(window)
        self.num_clusters_set = None if num_clusters is None else int(num_clusters)
        self.nprobe, self.query_links, self.kmeans_iters = int(nprobe), int(query_links), int(kmeans_iters)

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)

    # ---- the index --------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"num_sink": self.num_sink, "window": self.window, "num_clusters": self.num_clusters_set,
                "query_links": self.query_links, "max_links": self.max_links, "kmeans_iters": self.kmeans_iters}

    def indexed_range(self, length: int) -> tuple[int, int]:
        """Positions [a, b) of a prefill of ``length`` tokens that go into the index."""
        return self.num_sink, max(self.num_sink, length - self.window)

    def build_index(self, cache: KVCache) -> None:
        """k-means over the indexed keys and the inverted lists: ``lists`` [B, Hkv, C, cap] (key
        positions, -1 padding; cap = the longest list plus the tokens the cache can still take, so
        that a decode step appends in place, without a host synchronisation) and ``counts`` [B,
        Hkv, C]. Nothing indexed yet: one list (a zero centroid, always probed) that collects the
        keys leaving the window (a flat scan of them)."""
        B, Hkv, _, D = cache.k.shape
        a, b = self.indexed_range(cache.length)
        n, grow = max(0, b - a), cache.capacity - cache.length
        if n == 0:
            c = torch.zeros(B, Hkv, 1, D, dtype=cache.dtype, device=cache.device)
            labels = torch.zeros(B, Hkv, 0, dtype=torch.long, device=cache.device)
            cache.aux["flat"] = True
        else:
            c, labels = kmeans(cache.k[:, :, a:b], min(n, self.num_clusters_set or math.ceil(math.sqrt(n))),
                               self.kmeans_iters)
        C = c.shape[2]
        counts = torch.zeros(B, Hkv, C, dtype=torch.long, device=cache.device)
        counts.scatter_add_(2, labels, torch.ones_like(labels))
        width = max(1, (int(counts.max()) if n else 0) + grow)
        lists = torch.full((B, Hkv, C * width), -1, dtype=torch.long, device=cache.device)
        if n:  # each key at its rank within its list (a stable sort by label keeps position order)
            lab, order = labels.sort(dim=-1, stable=True)
            first = counts.cumsum(-1) - counts  # where each list starts in the sorted order
            rank = torch.arange(n, device=cache.device) - first.gather(2, lab)
            lists.scatter_(2, lab * width + rank, order + a)
        cache.aux["centroids"] = c.to(cache.dtype)
        cache.aux["lists"] = lists.view(B, Hkv, C, width)
        cache.aux["counts"] = counts

    def prefill(self, q, k, v, cache: KVCache) -> torch.Tensor:
        out = super().prefill(q, k, v, cache)  # checks, stores, clusters (build_index)
        if "flat" not in cache.aux and self.query_links:
            cache.aux["links"] = self._links(q, cache)
        return out

    def _links(self, q, cache: KVCache, chunk: int = 256) -> torch.Tensor:
        """The query-to-key links: for each prefill query (every head of a KV head's group), its
        ``query_links`` indexed keys of largest q . k (causal), put in the list of the centroid it
        probes first; each list keeps its E = ``max_links`` most linked keys (a graph index's degree
        bound; None: the mean list size ceil(n / C)). [B, Hkv, C, E] slots, -1 padding."""
        B, H, L, D = q.shape
        Hkv, G = cache.num_kv_heads, H // cache.num_kv_heads
        a, b = self.indexed_range(L)
        c = cache.aux["centroids"]
        C, dt = c.shape[2], torch.float64 if q.dtype == torch.float64 else torch.float32
        keys = cache.k[:, :, a:b].to(dt)  # [B, Hkv, n, D]
        cap = cache.capacity
        count = torch.zeros(B, Hkv, C * cap, dtype=torch.int32, device=cache.device)  # links per (list, key)
        m = min(self.query_links, b - a)
        for i0 in range(a, L, chunk):  # queries before the first indexed key link to nothing
            qi = q[:, :, i0:min(L, i0 + chunk)].to(dt).reshape(B, Hkv, -1, D)  # [B, Hkv, G T, D]
            T = qi.shape[2] // G
            s = qi @ keys.transpose(-1, -2)  # [B, Hkv, G T, n]
            pos = torch.arange(i0, i0 + T, device=q.device).repeat(G)  # each row's query position
            s = s.masked_fill(torch.arange(a, b, device=q.device) > pos.unsqueeze(-1), float("-inf"))
            val, top = s.topk(m, dim=-1)
            probe = (qi @ c.to(dt).transpose(-1, -2)).argmax(-1, keepdim=True)  # [B, Hkv, G T, 1]
            flat = probe * cap + top + a
            count.scatter_add_(2, flat.flatten(2), (val > float("-inf")).to(torch.int32).flatten(2))
        count = count.view(B, Hkv, C, cap)
        E = min(cap, self.max_links or math.ceil((b - a) / C))  # the most linked keys, lowest slot first on a tie
        out = torch.empty(B, Hkv, C, E, dtype=torch.int32, device=cache.device)
        tie = cap - torch.arange(cap, device=cache.device)
        for h in range(Hkv):  # one KV head at a time: the ranks are int64
            best, slots = (count[:, h].long() * (cap + 1) + tie).topk(E, dim=-1)
            out[:, h] = slots.masked_fill(best <= cap, -1)
        return out

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        """The key that left the window appended to the list of its nearest centroid (on device:
        the list's count says where)."""
        p = cache.seen - 1 - self.window  # the token that left the window
        if p < self.num_sink:
            return
        c, counts, lists = cache.aux["centroids"], cache.aux["counts"], cache.aux["lists"]
        B, Hkv, C, width = lists.shape
        near = _nearest(cache.k[:, :, p:p + 1].to(c.dtype), c)  # [B, Hkv, 1]
        at = near * width + counts.gather(2, near).clamp_max(width - 1)  # width covers every append
        lists.view(B, Hkv, C * width).scatter_(2, at, torch.full_like(at, p))
        counts.scatter_add_(2, near, torch.ones_like(near))

    # ---- the search -------------------------------------------------------------------------------
    def candidates(self, q_t, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys the search scans for each query head: the lists (and links) of its ``nprobe``
        centroids of largest q . c, as positions [B, H, M] sorted, and which are real [B, H, M]
        (not padding, not a repeat of a key already listed)."""
        B, H, _, D = q_t.shape
        Hkv, G = cache.num_kv_heads, H // cache.num_kv_heads
        c, lists = cache.aux["centroids"], cache.aux["lists"]
        z = (q_t.to(c.dtype).view(B, Hkv, G, D) @ c.transpose(-1, -2)).view(B, Hkv, -1)  # [B, Hkv, G C]
        probe = z.view(B, Hkv, G, -1).topk(min(self.nprobe, c.shape[2]), dim=-1).indices  # [B, Hkv, G, P]
        P = probe.shape[-1]
        parts = []
        for table in (lists, cache.aux.get("links")):
            if table is not None:  # [B, Hkv, C, E]: the rows of the probed centroids, per query head
                E = table.shape[-1]
                got = table.gather(2, probe.reshape(B, Hkv, G * P, 1).expand(-1, -1, -1, E))
                parts.append(got.reshape(B, H, P * E).long())
        cand = torch.cat(parts, -1).sort(dim=-1).values
        real = cand >= 0
        real[..., 1:] &= cand[..., 1:] != cand[..., :-1]
        return cand, real

    def select(self, q_t, cache: KVCache) -> Selection:
        """The static keys (sinks, window) and the top_k candidates of largest q . k: slots [B, H,
        static + top_k], a retrieved slot invalid where fewer candidates were found. Only the
        probed lists' keys are gathered and scored. Slots are positions here (nothing is evicted),
        so the static ones are known from the counts alone: no host synchronisation."""
        self._check_q(q_t, cache)
        B, H, _, D = q_t.shape
        Hkv, S, G = cache.num_kv_heads, cache.length, H // cache.num_kv_heads
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        cand, real = self.candidates(q_t, cache)
        M = cand.shape[-1]
        rows = cand.clamp_min(0).view(B, Hkv, G * M, 1).expand(-1, -1, -1, D)
        keys = cache.k.gather(2, rows).view(B, H, M, D)
        s = (keys @ q_t.to(keys.dtype).transpose(-1, -2))[..., 0].to(dt)  # [B, H, M]
        val, j = s.masked_fill(~real, float("-inf")).topk(min(self.top_k, M), dim=-1)
        found = val > float("-inf")
        top = torch.where(found, cand.gather(-1, j), 0)
        cut = min(S, max(self.num_sink, S - self.window))  # static: [0, num_sink) and [cut, S)
        static = torch.cat([torch.arange(min(self.num_sink, S), device=q_t.device),
                            torch.arange(cut, S, device=q_t.device)]).expand(B, H, -1)
        slots = torch.cat([static, top], -1)
        valid = torch.cat([torch.ones_like(static, dtype=torch.bool), found], -1)
        indexed = max(0, S - self.window - self.num_sink)  # the keys between the sinks and the window
        return Selection(slots=slots, valid=valid, clamped=self.top_k >= indexed > 0,
                         extra={"cand": cand, "real": real, "top": top, "found": found, "q": q_t,
                                "indexed": indexed})

    def step_info(self, cache: KVCache, sel: Selection) -> dict:
        """Adds what the search read (centroids, candidate keys: each (batch, KV head, key) once)
        and the statistics (counted here, outside the timed phases): the recall of the exact
        top_k of the indexed keys, the share of them scanned."""
        B, Hkv, S = cache.batch, cache.num_kv_heads, cache.length
        H, G = self.num_heads, self.num_heads // Hkv
        cand, real, n = sel.extra["cand"], sel.extra["real"], sel.extra["indexed"]
        C = cache.aux["centroids"].shape[2]
        sel.index_bytes = (B * Hkv * C + distinct_rows(cand, real, B, Hkv)) * cache.row_bytes()
        info = super().step_info(cache, sel)
        if self.step_record != "full":  # the bytes only (model generation)
            return info
        retrieved = torch.zeros(B, H, S + 1, dtype=torch.bool, device=cand.device)
        retrieved = retrieved.scatter(-1, torch.where(sel.extra["found"], sel.extra["top"], S), True)[..., :S]
        if n == 0:
            info["stats"] = {"topk_recall": 1.0, "scanned_fraction": 1.0}
            return info
        q = sel.extra["q"]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = (q.to(dt).view(B, Hkv, G, -1) @ cache.keys().to(dt).transpose(-1, -2)).view(B, H, S)
        pos = torch.arange(S, device=q.device)
        indexed = (pos >= self.num_sink) & (pos < S - self.window)
        k = min(self.top_k, n)
        true = s.masked_fill(~indexed, float("-inf")).topk(k, dim=-1).indices
        recall = retrieved.gather(-1, true).float().sum(-1) / k
        info["stats"] = {"topk_recall": float(recall.mean()),
                         "scanned_fraction": float(real.float().sum(-1).mean()) / n}
        return info


__all__ = ["RetrievalAttention"]
