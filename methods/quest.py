"""Quest: query-aware page selection at decode time.

Tang, Zhao, Zhu, Xiao, Kasikci, Han, "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference" (ICML 2024), Sec. 3 and Alg. 1; official code mit-han-lab/Quest
(``evaluation/quest_attention.py``).

The cache is cut into pages of ``page_size`` consecutive slots (from slot 0; the last page may
be partial). For each page P and channel i the cache keeps the element-wise minimum and maximum
of its keys, m_i = min_{j in P} k_ji and M_i = max_{j in P} k_ji (updated as keys arrive). A
decode query q bounds each page's best score from above (Sec. 3.3):

    U(P) = sum_i max(q_i * M_i, q_i * m_i)  >=  max_{j in P} q . k_j

and reads the keys of ``n = min(max(3, token_budget // page_size), pages)`` pages (the official
code's count: at least 3 pages), each query head on its own (the official evaluation repeats the
K/V heads to the query heads, ``repeat_kv``, and selects per query head; the heads of a group
share the summaries); attention over those keys is exact (``methods.decode.select_then_attend``:
the Triton gather kernel on CUDA). Which n pages (``keep_last_page``):

  True (default), the official system (``quest/utils/controller.py``,
      ``InferenceController.begin_forward``: "page_budget: Real page budget including the last
      page"; top-k over ``kv_indices_without_last``, ``inference_page_budget - 1`` pages; then
      ``decode_sparse_attn`` with the last page): the page being written (the last, partial
      one, holding the step's own key) is always read, and the n - 1 other pages of largest U;
  False, the official accuracy script (``evaluation/quest_attention.py``,
      ``local_heavy_hitter_mask``): the n pages of largest U among all.

Why it matters: U is tight for a page of few keys (one key: U is its exact score) and loose for
a full page, so the last page, partial right after a page boundary, loses the ranking to full
pages of lower true scores while it holds the most recent tokens (the answer's previous digits,
the question). In SmolLM2-135M (9 query heads over 3 KV heads, head dim 64) decoding a 1024-token
needle prompt at a 256-token budget (CPU, fp32), the last page carried 6-37% of dense attention's
mass per answer step and the script's rule read it for under 20% of the heads: attention recall
0.57-0.82 per step and 0 of 6 needles (``scripts/decode_real.py --needle-lengths 1024 --budget
256``); keeping it: recall 0.88-0.90 and 4 of 6 (``tests/test_quest.py`` builds the case).

Defaults as the official code: page (chunk) size 16; token budget 1024 (the paper evaluates
256-4096); the last page kept (the system's rule). ``page_size`` is a knob: a step reads the summaries of every page, 2 S / page_size
rows per KV head, so at long contexts they bound the speed-up (with pages of 16 at S = 128k the
summaries alone are 1/8 of K); larger pages cut them, at a coarser selection.
``scripts/decode_table.sh`` adds such a row (``QUEST_PAGE``, 64 by default) beside the default. The prefill is dense (the official code runs flash attention for every prompt).
A budget of at least the pages held reads every page: it is clamped to the cache, and
``last_step["clamped"]`` says so.
Model-level choices of the paper that are not part of one attention layer: its first two layers
decode densely (``layers`` of a model, not of this method).

Bytes per step (``last_step``): the page summaries of every page (2 x pages x D per KV head) and
the selected K/V rows (each row counted once per KV head group).
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionMethod, Cost, dense_flops
from methods.decode import DecodePath, DensePrefill, KVCache, Selection, top_k_selection

MIN_PAGES = 3  # the official code reads at least 3 pages: max(3, token_budget // chunk_size)


class Quest(DensePrefill, DecodePath, AttentionMethod):
    name = "quest"
    # what the README's method table says (python -m analysis.readme)
    paper = "Tang et al. 2024"
    kind = "sparse decode (query-aware pages), training-free"
    # the test's reference follows quest/utils/controller.py: the bound, max(3, budget // page) pages, the last kept
    official_test = "tests/test_quest.py::test_quest_decode_against_the_official_kernel_selection"
    exact = True  # the prefill is dense; the decode selects pages
    impls = ("reference",)

    def __init__(self, page_size: int = 16, token_budget: int = 1024, keep_last_page: bool = True,
                 impl: str = "reference", **structural):
        super().__init__(impl=impl, **structural)
        if page_size < 1 or token_budget < 1:
            raise ValueError(f"Quest: page_size and token_budget must be >= 1, got {page_size}, {token_budget}")
        if not isinstance(keep_last_page, bool):
            raise ValueError(f"Quest: keep_last_page must be True or False, got {keep_last_page!r}")
        self.page_size, self.token_budget = int(page_size), int(token_budget)
        self.keep_last_page = keep_last_page

    def cost(self, tq, tk, causal) -> Cost:
        pages = math.ceil(tk / self.page_size)
        return Cost(flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal), density=1.0,
                    kv_bytes=2.0 * self.num_kv_heads * (tk + pages) * self.head_dim * 2)

    # ---- decode ---------------------------------------------------------------------------------
    def decode_params(self) -> dict:
        return {"page_size": self.page_size}  # the budget is read per step; the index is per page

    def build_index(self, cache: KVCache) -> None:
        B, Hkv, C, D = cache.k.shape
        ps, S = self.page_size, cache.length
        pages = math.ceil(C / ps)
        cache.aux["page_min"] = torch.zeros(B, Hkv, pages, D, dtype=cache.dtype, device=cache.device)
        cache.aux["page_max"] = torch.zeros_like(cache.aux["page_min"])
        full = S // ps
        kp = cache.k[:, :, :full * ps].reshape(B, Hkv, full, ps, D)
        cache.aux["page_min"][:, :, :full] = kp.amin(3)
        cache.aux["page_max"][:, :, :full] = kp.amax(3)
        if S > full * ps:
            self._summarise(cache, full)

    def update_index(self, cache: KVCache, k_t, v_t) -> None:
        self._summarise(cache, (cache.length - 1) // self.page_size)

    def _summarise(self, cache: KVCache, p: int) -> None:
        """Min and max of the held keys of page p (the one a decode step wrote to)."""
        kp = cache.k[:, :, p * self.page_size:min((p + 1) * self.page_size, cache.length)]
        cache.aux["page_min"][:, :, p] = kp.amin(2)
        cache.aux["page_max"][:, :, p] = kp.amax(2)

    def page_scores(self, q_t, cache: KVCache) -> torch.Tensor:
        """U(P) of every held page for each query head: [B, H, pages]. As max(q_i M_i, q_i m_i) is
        q_i M_i where q_i >= 0 and q_i m_i where q_i < 0, U = max(q, 0) . M + min(q, 0) . m: two
        products over the summaries, no [pages, D] temporary. In the query's dtype (fp16 and
        bf16 as the official code, which scores in the model's dtype); fp32 out."""
        B, H, _, D = q_t.shape
        Hkv, P = cache.num_kv_heads, math.ceil(cache.length / self.page_size)
        dt = q_t.dtype if q_t.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        q = q_t.to(dt).view(B, Hkv, H // Hkv, D)
        mn = cache.aux["page_min"][:, :, :P].to(dt).transpose(-1, -2)  # [B, Hkv, D, P]
        mx = cache.aux["page_max"][:, :, :P].to(dt).transpose(-1, -2)
        u = q.clamp_min(0) @ mx + q.clamp_max(0) @ mn  # [B, Hkv, G, P]
        return u.view(B, H, P).to(torch.float64 if dt == torch.float64 else torch.float32)

    def select(self, q_t, cache: KVCache) -> Selection:
        self._check_q(q_t, cache)
        scores = self.page_scores(q_t, cache)
        P = scores.shape[-1]
        want = max(MIN_PAGES, self.token_budget // self.page_size)
        if self.keep_last_page and P > 1:  # the page being written: always read, one of the budget's pages
            scores = scores.clone()
            scores[..., P - 1] = float("inf")
        index_bytes = 2.0 * cache.batch * cache.num_kv_heads * P * cache.row_bytes()
        return top_k_selection(scores, want, page_size=self.page_size, length=cache.length,
                               index_bytes=index_bytes, clamped=want >= P)


__all__ = ["Quest"]
