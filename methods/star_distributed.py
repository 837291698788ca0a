"""Star Attention over processes (torch.distributed): each rank is one of the paper's hosts.

Acharya, Jia and Ginsburg, "Star Attention" (2024, arXiv 2411.17116), Sec. 2 and Fig. 1;
``methods.star_attention`` is the one-process emulation of the same computation (its docstring
has the pattern). Here the context blocks are dealt to the ranks (block i to rank i mod world),
and each rank computes only what its host would:

Phase 1  for each of its blocks c_i (positions s .. e-1): the block's queries attend to the anchor
         keys before the block (positions 0 .. min(anchor, s) - 1) and causally to their own
         block; only rank-local keys are read.
Phase 2  the query (the last ``query_len`` positions, broadcast to every host) attends to each
         host's cached block keys (not the anchor copies); the last rank, the query's host,
         also holds the query's own keys (causal). Each rank returns its partial output o_r and
         log-sum-exp l_r per query row, and the rows are combined as the paper's Eq. (1)-(2):
             l = log sum_r exp(l_r),    o = sum_r exp(l_r - l) o_r
         (an all-gather of the partials), which is exact attention over the whole cache.

Both phases' key lists put the keys every query row sees first, so each is one causal mask
aligned to the last key (row i sees keys 0 .. i + offset): computed by FlexAttention with its
log-sum-exp (compiled on CUDA) unless the method's ``impl`` is ``reference``, where the scores
are written out in fp32. Every rank gets the whole q, k, v (so that one call can be checked
against the emulation) and reads only its blocks' rows of them; the output, all-reduced, is the whole [B, H, T, D] on every
rank. Any backend: gloo on CPUs (tests/test_star_distributed.py runs 2 and 3 processes), NCCL on
GPUs (`scripts/star_distributed_bench.py`, run by `scripts/two_gpu.sh`; not yet run on several GPUs).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from methods.base import repeat_kv


def _partial(q, k, v, offset: int, scale, fast: bool):
    """(softmax(q k^T) v in fp32, logsumexp [B, H, tq, 1]) where query row i sees the keys
    0 .. i + ``offset`` (a causal mask aligned to the last key: both phases' key lists put the
    keys every row sees first). ``fast``: FlexAttention with its log-sum-exp (compiled on CUDA:
    no [tq, tk] scores in memory); else the scores written out in fp32. No keys: output 0,
    lse -inf."""
    B, H, tq, D = q.shape
    tk = k.shape[2]
    if tk == 0:
        return q.new_zeros(B, H, tq, D, dtype=torch.float32), q.new_full((B, H, tq, 1), float("-inf"), dtype=torch.float32)
    if fast:
        from methods.kernels import flex

        bm = flex.block_mask(lambda b, h, i, j: j <= i + offset, None, None, tq, tk, q.device)
        out, lse, _ = flex.attention_lse(q, k, v, bm, scale=scale)
        return out.float(), lse.float().unsqueeze(-1)
    mask = torch.arange(tk, device=q.device).view(1, -1) <= torch.arange(tq, device=q.device).view(-1, 1) + offset
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()), lse


def star_attention_distributed(method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               group=None) -> torch.Tensor:
    """Causal Star Attention of ``method`` (a ``StarAttention``: its block, anchor and query
    split) computed by the ranks of ``group`` as the hosts (module docstring). q [B, H, T, D],
    k and v [B, Hkv, T, D], the same on every rank; returns the output in q's dtype."""
    if not dist.is_initialized():
        raise RuntimeError("star_attention_distributed: torch.distributed is not initialised "
                           "(torch.distributed.init_process_group first; one process per host)")
    if q.shape[2] != k.shape[2] or k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"star_attention_distributed: a prefill (Tq == Tk) with grouped KV heads; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    B, H, T, D = q.shape
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    C, bs, anchor = method.split(T)
    scale = D ** -0.5
    fast = getattr(method, "impl", "reference") != "reference"  # FlexAttention; reference: scores written out
    dev = q.device
    out = torch.zeros(B, H, T, D, device=dev, dtype=torch.float32)
    blocks = [i for i in range(math.ceil(C / bs)) if i % world == rank]
    for i in blocks:  # phase 1: rank-local keys only
        s, e = i * bs, min((i + 1) * bs, C)
        a = min(anchor, s)
        keys = torch.cat([torch.arange(a, device=dev), torch.arange(s, e, device=dev)])
        # anchor keys are all before the block (every row sees them); its own block causally
        o, _ = _partial(q[:, :, s:e], k[:, :, keys], v[:, :, keys], a, scale, fast)
        out[:, :, s:e] = o
    if T > C:  # phase 2: the query against this host's cache, combined over the hosts
        own = [torch.arange(i * bs, min((i + 1) * bs, C), device=dev) for i in blocks]
        if rank == world - 1:
            own.append(torch.arange(C, T, device=dev))  # the query host holds the query's keys
        keys = torch.cat(own) if own else torch.zeros(0, dtype=torch.long, device=dev)
        n_ctx = sum(len(x) for x in own[:len(blocks)])  # the cached context keys: every query row sees them
        o, lse = _partial(q[:, :, C:], k[:, :, keys], v[:, :, keys], n_ctx, scale, fast)
        os_ = [torch.empty_like(o) for _ in range(world)]
        ls = [torch.empty_like(lse) for _ in range(world)]
        dist.all_gather(os_, o.contiguous(), group=group)
        dist.all_gather(ls, lse.contiguous(), group=group)
        lses = torch.stack(ls)  # [world, B, H, tq, 1]
        total = torch.logsumexp(lses, dim=0)
        w = torch.exp(lses - total)
        w = torch.where(torch.isfinite(lses), w, torch.zeros_like(w))
        query_out = (w * torch.stack(os_)).sum(0)
        if rank == 0:  # the all-reduce below sums the ranks: the combined rows counted once
            out[:, :, C:] = query_out
    dist.all_reduce(out, group=group)  # each rank filled its own blocks' rows
    return out.to(q.dtype)


__all__ = ["star_attention_distributed"]
