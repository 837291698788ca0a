"""Lightning Attention's causal tiled product in Triton (Lightning Attention-2, Qin et al.,
arXiv 2401.04658, Alg. 1; the decay of TransNormerLLM, arXiv 2307.14995, Sec. 3.1):

    o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j           (lambda = exp(log_decay_h) <= 1)

one program per (batch x head, block of BV value columns) walks the chunks of C tokens in order,
as the official kernel does: inside a chunk the masked, decayed product
[(Q_c K_c^T) (.) M] V_c with M_ij = lambda^(i-j) (i >= j); across chunks the state
S [d, BV] (fp32, on chip) read as lambda^(i+1) Q_c S and updated as
S = lambda^C S + (lambda^(C-1-j) K_c)^T V_c. O(T) memory, nothing of size T x T.
The backward (Lightning Attention-2, Alg. 2 "backward pass"; ``_LightningCausal``) is three
walks of the same kernel with the operands exchanged, REV walking the positions from the end:

    dQ = walk(dO, V, K)           dq_i = sum_{j <= i} lambda^(i-j) (do_i . v_j) k_j
    dK = walk_rev(V, dO, Q)       dk_j = sum_{i >= j} lambda^(i-j) (v_j . do_i) q_i
    dV = walk_rev(K, Q, dO)       dv_j = sum_{i >= j} lambda^(i-j) (k_j . q_i) do_i

so that inside a chunk each is the paper's intra-block product ([(dO V^T) (.) M] K for dQ,
[(dO V^T) (.) M]^T Q for dK, [(Q K^T) (.) M]^T dO for dV) and across chunks its inter-block
state: KV carried forward for dQ, dKV = lambda^C dKV + (lambda^(a+1) Q_c)^T dO_c carried
backward for dK and dV. The official kernels (OpenNLPLab/lightning-attention,
lightning_attn/ops/triton/lightning_attn2.py) split each gradient into an intra-block kernel
(parallel over chunks) and an inter-block one (sequential); here the two parts share one walk,
and the three walks run in one launch (``_lightning_bwd``, grid axis 2 picks dQ, dK or dV),
parallel over (batch x head, output-column block, gradient): three times the forward's programs.
lambda is a fixed rate per head (TransNormerLLM's), so it has no gradient.
The reference is ``methods.lightning.tiled_causal`` (the same tiling in PyTorch); the tests
compare against the explicit matrix and its autograd gradients. ``methods.lightning.Lightning``
takes it with impl=triton (scripts/lightning_fla_bench.py times it against fla). Runs on CUDA,
or on CPU tensors under ``TRITON_INTERPRET=1``. Parallelism is B * H * d_v / BV programs per
walk: at B = 1 that is few programs for a GPU (the limit of the one-pass design). ``two_pass``
(``_LightningCausal2``) splits the chunks over programs as fla's chunk_simple_gla does: a
sequential pass (``_states``, B * H * (d / 64) * (e / BV) programs) stores the state before
every chunk, [B H, T / C, d, e] in the inputs' dtype, and a second (``_outputs``) computes every
chunk at once; its backward computes the forward states S and the reversed states R (dKV) in
one launch and then the chunks of dQ (reading S^T), dK (R^T) and dV (R) in one.
"""
from __future__ import annotations

import math

import torch

from methods.kernels._common import triton, usable  # noqa: F401 - usable re-exported

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _walk(Q, K, V, O, ld, T, bh, vb, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
              BV: tl.constexpr, REV: tl.constexpr):
        """o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j for value columns [vb BV, (vb+1) BV)
        of row bh (q, k [T, D], v, o [T, E]); REV: the same over j >= i (walked from the end)."""
        bh = bh.to(tl.int64)  # offsets past 2^31 elements at long T and many heads
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        pos = offs_c.to(tl.float32)
        diff = pos[:, None] - pos[None, :]
        intra = tl.where(diff >= 0, tl.exp(ld * tl.maximum(diff, 0.0)), 0.0)  # [C, C]
        q_in = tl.exp(ld * (pos + 1.0))  # lambda^(i+1)
        k_out = tl.exp(ld * (C - 1.0 - pos))  # lambda^(C-1-j)
        block_decay = tl.exp(ld * C)
        state = tl.zeros([D, BV], dtype=tl.float32)
        q_base, v_base = Q + bh * T * D, V + bh * T * E
        k_base, o_base = K + bh * T * D, O + bh * T * E
        for c0 in range(0, T, C):
            rows = c0 + offs_c  # the step along the walk; REV walks the positions from the end
            rm = rows < T
            if REV:
                rows = T - 1 - rows
            q = tl.load(q_base + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
            k = tl.load(k_base + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
            vm = rm[:, None] & (offs_v < E)[None, :]
            v = tl.load(v_base + rows[:, None] * E + offs_v[None, :], mask=vm, other=0.0)
            s = tl.dot(q, tl.trans(k)) * intra
            o = tl.dot(s.to(v.dtype), v)
            o += tl.dot((q * q_in[:, None]).to(q.dtype), state.to(q.dtype))
            tl.store(o_base + rows[:, None] * E + offs_v[None, :], o.to(O.dtype.element_ty), mask=vm)
            state = state * block_decay + tl.dot(tl.trans((k * k_out[:, None]).to(k.dtype)), v)

    @triton.jit
    def _lightning_fwd(Q, K, V, O, LD, T, H, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                       BV: tl.constexpr):
        bh = tl.program_id(0)
        ld = tl.load(LD + bh % H)  # log lambda (fp32, <= 0)
        _walk(Q, K, V, O, ld, T, bh, tl.program_id(1), D, E, C, BV, False)

    @triton.jit
    def _lightning_bwd(Q, K, V, DO, DQ, DK, DV, LD, T, H, D: tl.constexpr, E: tl.constexpr,
                       C: tl.constexpr, BV: tl.constexpr):
        """The three gradient walks in one launch (axis 2 picks one): dQ = walk(dO, V, K),
        dK = walk_rev(V, dO, Q), dV = walk_rev(K, Q, dO)."""
        bh = tl.program_id(0)
        vb = tl.program_id(1)
        which = tl.program_id(2)
        ld = tl.load(LD + bh % H)
        if which == 0:
            if vb * BV < D:
                _walk(DO, V, K, DQ, ld, T, bh, vb, E, D, C, BV, False)
        elif which == 1:
            if vb * BV < D:
                _walk(V, DO, Q, DK, ld, T, bh, vb, E, D, C, BV, True)
        else:
            if vb * BV < E:
                _walk(K, Q, DO, DV, ld, T, bh, vb, D, E, C, BV, True)


    # ---- two passes (the chunked form of fla): the states before each chunk, then every chunk at once
    @triton.jit
    def _states(K, V, S, ld, T, NC, bh, kb, vb, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr):
        """S[bh, c] [D, E] = the state before walk chunk c, sum_j lambda^(cC - 1 - j) k_j v_j^T
        over the walk's earlier positions j (REV: walked from the end); rows kb BK.., cols vb BV.."""
        bh = bh.to(tl.int64)
        offs_c = tl.arange(0, C)
        offs_k = kb * BK + tl.arange(0, BK)
        offs_v = vb * BV + tl.arange(0, BV)
        k_out = tl.exp(ld * (C - 1.0 - offs_c.to(tl.float32)))
        block_decay = tl.exp(ld * C)
        state = tl.zeros([BK, BV], dtype=tl.float32)
        s_base = S + bh * NC * D * E + offs_k[:, None] * E + offs_v[None, :]
        k_base, v_base = K + bh * T * D + offs_k[None, :], V + bh * T * E + offs_v[None, :]
        for c in range(0, NC):
            tl.store(s_base + c * D * E, state.to(S.dtype.element_ty))
            rows = c * C + offs_c
            rm = rows < T
            if REV:
                rows = T - 1 - rows
            k = tl.load(k_base + rows[:, None] * D, mask=rm[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * E, mask=rm[:, None], other=0.0)
            state = state * block_decay + tl.dot(tl.trans((k * k_out[:, None]).to(k.dtype)), v)

    @triton.jit
    def _outputs(Q, K, V, S, O, ld, T, NC, bh, c, vb, s_r, s_c, SZ: tl.constexpr, D: tl.constexpr,
                 E: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr):
        """Walk chunk c alone: its masked, decayed block product plus lambda^(i+1) q_i S_c, the
        state [D, BV] read at S + (bh NC + c) SZ + row s_r + col s_c (a transposed state by
        its strides)."""
        bh = bh.to(tl.int64)
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        pos = offs_c.to(tl.float32)
        diff = pos[:, None] - pos[None, :]
        intra = tl.where(diff >= 0, tl.exp(ld * tl.maximum(diff, 0.0)), 0.0)
        q_in = tl.exp(ld * (pos + 1.0))
        rows = c * C + offs_c
        rm = rows < T
        if REV:
            rows = T - 1 - rows
        q = tl.load(Q + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
        k = tl.load(K + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=rm[:, None], other=0.0)
        v = tl.load(V + bh * T * E + rows[:, None] * E + offs_v[None, :], mask=rm[:, None], other=0.0)
        st = tl.load(S + (bh * NC + c) * SZ + offs_d[:, None] * s_r + offs_v[None, :] * s_c)
        o = tl.dot((tl.dot(q, tl.trans(k)) * intra).to(v.dtype), v)
        o += tl.dot((q * q_in[:, None]).to(q.dtype), st.to(q.dtype))
        tl.store(O + bh * T * E + rows[:, None] * E + offs_v[None, :], o.to(O.dtype.element_ty), mask=rm[:, None])

    @triton.jit
    def _fwd_states(K, V, S, LD, T, H, NC, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
        bh = tl.program_id(0)
        _states(K, V, S, tl.load(LD + bh % H), T, NC, bh, tl.program_id(1), tl.program_id(2), D, E, C, BK, BV,
                False)

    @triton.jit
    def _fwd_outputs(Q, K, V, S, O, LD, T, H, NC, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                     BV: tl.constexpr):
        bh = tl.program_id(0)
        _outputs(Q, K, V, S, O, tl.load(LD + bh % H), T, NC, bh, tl.program_id(1), tl.program_id(2), E, 1,
                 D * E, D, E, C, BV, False)

    @triton.jit
    def _bwd_states(Q, K, V, DO, S, R, LD, T, H, NC, NVB, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
        """S: the forward's states (sum k v^T, walked forward); R: sum q dO^T walked from the
        end (the paper's dKV); axis 2 = which * NVB + value block."""
        bh = tl.program_id(0)
        ld = tl.load(LD + bh % H)
        which = tl.program_id(2) // NVB
        vb = tl.program_id(2) % NVB
        if which == 0:
            _states(K, V, S, ld, T, NC, bh, tl.program_id(1), vb, D, E, C, BK, BV, False)
        else:
            _states(Q, DO, R, ld, T, NC, bh, tl.program_id(1), vb, D, E, C, BK, BV, True)

    @triton.jit
    def _bwd_outputs(Q, K, V, DO, S, R, DQ, DK, DV, LD, T, H, NC, NVB, D: tl.constexpr, E: tl.constexpr,
                     C: tl.constexpr, BV: tl.constexpr):
        """dQ = walk(dO, V, K) with S^T; dK = walk_rev(V, dO, Q) with R^T; dV = walk_rev(K, Q, dO)
        with R: every chunk at once; axis 2 = which * NVB + output-column block."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        ld = tl.load(LD + bh % H)
        which = tl.program_id(2) // NVB
        vb = tl.program_id(2) % NVB
        if which == 0:
            if vb * BV < D:
                _outputs(DO, V, K, S, DQ, ld, T, NC, bh, c, vb, 1, E, D * E, E, D, C, BV, False)
        elif which == 1:
            if vb * BV < D:
                _outputs(V, DO, Q, R, DK, ld, T, NC, bh, c, vb, 1, E, D * E, E, D, C, BV, True)
        else:
            if vb * BV < E:
                _outputs(K, Q, DO, R, DV, ld, T, NC, bh, c, vb, E, 1, D * E, D, E, C, BV, True)


def _launch(q, k, v, ld, chunk: int, block_v: int) -> torch.Tensor:
    """``_lightning_fwd`` over contiguous q, k [B, H, T, d], v [B, H, T, e] of one dtype, ld [H]
    fp32: o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j."""
    B, H, T, D = q.shape
    E = v.shape[-1]
    bv = min(block_v, E)
    out = torch.empty(B, H, T, E, device=v.device, dtype=v.dtype)
    if T:
        _lightning_fwd[(B * H, math.ceil(E / bv))](q, k, v, out, ld, T, H, D=D, E=E, C=chunk, BV=bv,
                                                   num_warps=_warps(D, bv))
    return out


def _warps(d: int, bv: int) -> int:
    return 4 if d * bv <= 64 * 64 else 8


class _LightningCausal(torch.autograd.Function):
    """The causal product with its backward (Lightning Attention-2, Alg. 2), each gradient one
    walk of the forward's ``_walk`` with the operands exchanged (one launch for the three):

        dq_i = sum_{j <= i} lambda^(i-j) (do_i . v_j) k_j    forward walk, state sum lambda^. k v^T
        dk_j = sum_{i >= j} lambda^(i-j) (v_j . do_i) q_i    backward walk, state sum lambda^. q do^T
        dv_j = sum_{i >= j} lambda^(i-j) (k_j . q_i) do_i    backward walk, the same state transposed

    Inside a chunk each is the paper's masked block product ([(dO V^T) (.) M] K,
    [(dO V^T) (.) M]^T Q, [(Q K^T) (.) M]^T dO), across chunks its running state: KV forward
    for dQ, dKV backward for dK and dV. lambda is a fixed rate per head: no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, ld, chunk, block_v):
        ctx.save_for_backward(q, k, v, ld)
        ctx.chunk, ctx.block_v = chunk, block_v
        return _launch(q, k, v, ld, chunk, block_v)

    @staticmethod
    def backward(ctx, do):
        q, k, v, ld = ctx.saved_tensors
        B, H, T, D = q.shape
        E = v.shape[-1]
        do = do.to(v.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bv = min(ctx.block_v, D, E)
        if T:
            _lightning_bwd[(B * H, math.ceil(max(D, E) / bv), 3)](
                q, k, v, do, dq, dk, dv, ld, T, H, D=D, E=E, C=ctx.chunk, BV=bv, num_warps=_warps(max(D, E), bv))
        return dq, dk, dv, None, None, None


class _LightningCausal2(torch.autograd.Function):
    """The same product and gradients in two passes each (the chunked form of fla's
    chunk_simple_gla): a sequential pass stores the state before every chunk ([B H, T / C, d, e]
    in the inputs' dtype, parallel over (batch x head, d block, e block)); a second computes every
    chunk at once from its state. Backward: the forward's states S (recomputed) and the reversed
    ones R = sum lambda^. q dO^T in one launch, then dQ (from S^T), dK (R^T), dV (R) in one."""

    @staticmethod
    def forward(ctx, q, k, v, ld, chunk, block_v):
        ctx.save_for_backward(q, k, v, ld)
        ctx.chunk, ctx.block_v = chunk, block_v
        B, H, T, D = q.shape
        E = v.shape[-1]
        out = torch.empty(B, H, T, E, device=v.device, dtype=v.dtype)
        if T:
            nc, bk, bv = math.ceil(T / chunk), min(64, D), min(block_v, E)
            st = torch.empty(B * H, nc, D, E, device=v.device, dtype=v.dtype)
            _fwd_states[(B * H, D // bk, E // bv)](k, v, st, ld, T, H, nc, D=D, E=E, C=chunk, BK=bk, BV=bv,
                                                   num_warps=4)
            _fwd_outputs[(B * H, nc, E // bv)](q, k, v, st, out, ld, T, H, nc, D=D, E=E, C=chunk, BV=bv,
                                               num_warps=_warps(D, bv))
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, ld = ctx.saved_tensors
        B, H, T, D = q.shape
        E = v.shape[-1]
        do = do.to(v.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if T:
            c = ctx.chunk
            nc, bk, bv = math.ceil(T / c), min(64, D), min(ctx.block_v, E)
            st, r = (torch.empty(B * H, nc, D, E, device=v.device, dtype=v.dtype) for _ in range(2))
            _bwd_states[(B * H, D // bk, 2 * (E // bv))](q, k, v, do, st, r, ld, T, H, nc, E // bv, D=D, E=E, C=c,
                                                         BK=bk, BV=bv, num_warps=4)
            bo = min(ctx.block_v, D, E)
            nvb = max(D, E) // bo
            _bwd_outputs[(B * H, nc, 3 * nvb)](q, k, v, do, st, r, dq, dk, dv, ld, T, H, nc, nvb, D=D, E=E, C=c,
                                               BV=bo, num_warps=_warps(max(D, E), bo))
        return dq, dk, dv, None, None, None


def lightning_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                     chunk: int = 64, block_v: int = 32, two_pass: bool = False) -> torch.Tensor:
    """sum_{j <= i} lambda_h^(i-j) (q_i . k_j) v_j: q, k [B, H, T, d], v [B, H, T, e] (one head
    of keys per query head), log_decay [H] (log lambda <= 0; None: lambda = 1); out in v's dtype.
    Differentiable in q, k and v through the backward kernels (``_LightningCausal``; with
    ``two_pass``, ``_LightningCausal2``: states stored per chunk, then every chunk in parallel).
    ``block_v``: value columns per program (d / block_v programs per head). 32 by measurement: on one
    H200 at B=1, H=16, d=128, bf16, 16k-64k, the forward took 0.72-0.83x fla's chunked kernels' time
    with 32 and 1.04-1.25x with 64 (results/efficiency/lightning_fla.md, scripts/lightning_fla_bench.py)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning kernel: q, k [B, H, T, d] of one shape and v [B, H, T, e]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    E = v.shape[-1]
    if D & (D - 1) or D < 16 or E & (E - 1) or E < 16 or chunk not in (16, 32, 64, 128):
        raise ValueError(f"lightning kernel: power-of-two head dims >= 16 and a chunk of 16-128 tokens; "
                         f"got d={D}, e={E}, chunk={chunk}")
    if block_v & (block_v - 1) or block_v < 16:
        raise ValueError(f"lightning kernel: block_v must be a power of two >= 16, got {block_v}")
    if log_decay is not None and (log_decay.shape != (H,) or bool((log_decay > 0).any())):
        raise ValueError(f"lightning kernel: log_decay must be [H={H}] and <= 0, got {tuple(log_decay.shape)}")
    ld = torch.zeros(H, device=q.device, dtype=torch.float32) if log_decay is None else \
        log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
    dt = v.dtype
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    return (_LightningCausal2 if two_pass else _LightningCausal).apply(q, k, v, ld, chunk, block_v)
