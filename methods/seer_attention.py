"""SeerAttention: a learned block gate (AttnGate) chooses the key blocks each query block attends.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024, arXiv
2410.13276), Sec. 3 (Fig. 2-3): the AttnGate and its self-distillation.

AttnGate. Queries and keys are grouped in blocks of ``block_size`` tokens (positions p // bs;
with Tq < Tk the queries are the last Tq positions). Each query block is pooled by average,
each key block by max, min and average, concatenated (official gate type ``Qavg_Kmaxminavg``;
pooling over the block's tokens only, a last partial block included), then projected per head
by small linear layers without bias (the official ``MultiHeadLinear``, weights [heads, in,
hidden]):

    Qg = pool_q(Q) W_q   [B, H, nq, hidden]      Kg = pool_k(K) W_k   [B, Hkv, nk, hidden]
    G  = softmax_j(Qg Kg^T / sqrt(hidden))       over the key blocks j each block may see
                                                 (j <= i when causal)

(the official gate uses a single linear layer on K when hidden == D and Q has one pooling; with
the default hidden 128 both exist). Selection: ``threshold`` (official default method) keeps
block j where G_ij >= threshold; ``topk`` (the official code's other method, ``nz_ratio``)
keeps the ceil(nz_ratio * visible) best blocks: both selectable (``selection``), the records
name the operating point (``describe``), and top-k is the budget knob of equal-budget runs
(``methods.budget``: nz_ratio). The
diagonal block is always kept (a reading: so that no causal query is left with no key) and,
with ``last_block_dense`` (official default True), the last query block keeps every block.
The attention is then exact softmax attention over the kept blocks (and causality):
``impl=flex`` through a FlexAttention block mask, ``impl=triton`` through the block-sparse
kernel (``methods.kernels.block_sparse``, tiles of block_size).

Self-distillation (Sec. 3.2). The gate learns, with the model frozen, the block-pooled dense
attention map: P = softmax(Q K^T / sqrt(D)) (causal), max-pooled over each (query block, key
block) tile and normalised per query block to sum to one (official ``attn_with_pooling``):

    GT_ij = max_{q in block i, k in block j} P_qk / sum_j' max_{q in i, k in j'} P_qk

and the loss is KL(GT || G) averaged over query blocks, heads and batch (``distill_loss``);
only W_q and W_k train. ``distill_target`` computes GT, ``gate_scores`` G.

Defaults follow the official code: block 64, hidden 128, Qavg_Kmaxminavg, threshold 5e-4 (the
README's example; "typical range 5e-4 ~ 5e-3"), last block dense. Readings of this module: the
gate pools q/k as the method receives them (after RoPE; the official gate pools before RoPE and
applies RoPE at block positions), blocks of padded keys only are never chosen, the loss is
KL(GT || G) with F.kl_div.

The gate must be trained (``scripts/train_seer_gate.py``: SmolLM2 on captured prose q/k, saved
as a state_dict into the asset cache, loaded with ``torch.load(weights_only=True)``):
``gate_path`` names that file (one state_dict per layer: ``bind_layer(i)`` picks layer i; a
method not bound to a layer uses ``layer``). ``gate=untrained`` runs the freshly initialised
(Xavier) gate, stated as such in the records' method parameters; ``gate=trained`` without a
file is an error. The gate is the index step (``last_index_ms`` under ``index_timing``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods import masks
from methods.base import Cost, SparseMethod, check_int, repeat_kv, timed_index

POOLS = ("avg", "max", "min")
GATES = ("trained", "untrained")
SELECTIONS = ("threshold", "topk")


def block_ids(t: int, tk: int, bs: int, device=None) -> tuple[torch.Tensor, int]:
    """The block of each of the last ``t`` of ``tk`` positions (relative to the first such
    block), and that first block's index."""
    pos = torch.arange(tk - t, tk, device=device)
    first = (tk - t) // bs
    return pos // bs - first, first


def pool_blocks(x: torch.Tensor, ids: torch.Tensor, n: int, kinds) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, n, D * len(kinds)]: each block's tokens pooled by avg / max / min
    (``ids`` [T] the block of each token), concatenated in the order of ``kinds``."""
    B, H, T, D = x.shape
    idx = ids.view(1, 1, T, 1).expand(B, H, T, D)
    out = []
    for kind in kinds:
        if kind == "avg":
            s = x.new_zeros(B, H, n, D).scatter_add_(2, idx, x)
            cnt = torch.bincount(ids, minlength=n).clamp_min(1).to(x.dtype).view(1, 1, n, 1)
            out.append(s / cnt)
        else:
            red = "amax" if kind == "max" else "amin"
            init = x.new_full((B, H, n, D), float("-inf") if kind == "max" else float("inf"))
            out.append(init.scatter_reduce(2, idx, x, red, include_self=False))
    return torch.cat(out, -1)


class MultiHeadLinear(nn.Module):
    """x [B, heads, n, in] @ W [heads, in, out] (the official gate's per-head projection)."""

    def __init__(self, heads: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, d_in, d_out))
        nn.init.xavier_uniform_(self.weight)  # the official distillation re-initialises so

    def forward(self, x):
        return torch.matmul(x, self.weight)


class SeerAttention(SparseMethod):
    name = "seer_attention"
    # what the README's method table says (python -m analysis.readme)
    paper = "Gao et al. 2024"
    kind = "sparse (learned block gate)"
    official_test = None
    training_free = False  # the gate is trained (self-distillation, the model frozen)
    has_index = True  # the gate, under index_timing
    impls = ("reference", "flex", "triton")
    fixed_head_dim = True  # the gate's weights are sized by head_dim
    # the gate trains on its own objective (distill_loss), never through the task's loss: its
    # scores see detached q, k and the block choice is discrete
    trained_apart = True

    def __init__(self, block_size: int = 64, hidden_size: int = 128, q_pooling: str = "avg",
                 k_pooling: str = "maxminavg", selection: str = "threshold", threshold: float = 5e-4,
                 nz_ratio: float = 0.1, last_block_dense: bool = True, gate: str = "trained",
                 gate_path: str | None = None, layer: int = 0, impl: str = "flex", **structural):
        super().__init__(impl=impl, **structural)
        check_int("SeerAttention", "block_size", block_size)
        check_int("SeerAttention", "hidden_size", hidden_size)
        check_int("SeerAttention", "layer", layer, lo=0)
        if selection not in SELECTIONS:
            raise ValueError(f"SeerAttention: selection must be one of {SELECTIONS}, got {selection!r}")
        if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
            raise ValueError(f"SeerAttention: threshold must be in [0, 1], got {threshold!r}")
        if not (isinstance(nz_ratio, (int, float)) and 0 < nz_ratio <= 1):
            raise ValueError(f"SeerAttention: nz_ratio must be in (0, 1], got {nz_ratio!r}")
        if gate not in GATES:
            raise ValueError(f"SeerAttention: gate must be one of {GATES}, got {gate!r}")
        self.q_kinds, self.k_kinds = _pools("q_pooling", q_pooling), _pools("k_pooling", k_pooling)
        if gate == "trained" and not gate_path:
            raise ValueError("SeerAttention: gate=trained needs gate_path, a gate trained by "
                             "scripts/train_seer_gate.py (or gate=untrained: a random gate, stated in the records)")
        if gate_path and not Path(gate_path).expanduser().exists():
            raise ValueError(f"SeerAttention: gate_path {gate_path} does not exist: train one with "
                             f"scripts/train_seer_gate.py")
        self.block_size, self.hidden_size = block_size, hidden_size
        self.selection, self.threshold, self.nz_ratio = selection, float(threshold), float(nz_ratio)
        self.last_block_dense, self.gate, self.gate_path, self.layer = bool(last_block_dense), gate, gate_path, layer
        D, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        self.linear_q = MultiHeadLinear(H, D * len(self.q_kinds), hidden_size)
        self.linear_k = MultiHeadLinear(Hkv, D * len(self.k_kinds), hidden_size)
        self._kpm = None
        if gate_path:
            self.bind_layer(layer)

    def bind_layer(self, layer: int) -> None:
        """Load layer ``layer``'s trained gate from ``gate_path`` (models.hf calls it with the
        attention module's layer index); nothing for an untrained gate."""
        if not self.gate_path:
            return
        saved = torch.load(Path(self.gate_path).expanduser(), map_location="cpu", weights_only=True)
        gates = saved["layers"]
        if layer not in gates:
            raise ValueError(f"SeerAttention: {self.gate_path} has no gate for layer {layer} "
                             f"(it has layers {sorted(gates)})")
        meta = saved.get("meta", {})
        for key in ("block_size", "hidden_size", "head_dim", "num_heads", "num_kv_heads"):
            if key in meta and meta[key] != getattr(self, key):
                raise ValueError(f"SeerAttention: the gate in {self.gate_path} was trained with {key}="
                                 f"{meta[key]}, this method has {getattr(self, key)}")
        self.load_state_dict(gates[layer])
        self.layer = layer

    def hyperparameters(self) -> dict:
        return {"block_size": self.block_size, "hidden_size": self.hidden_size, "selection": self.selection,
                "threshold": self.threshold, "nz_ratio": self.nz_ratio, "gate": self.gate,
                "gate_path": self.gate_path, "layer": self.layer}

    def describe(self, q, k, v, causal, key_padding_mask=None) -> dict:
        point = (f"threshold {self.threshold:g}" if self.selection == "threshold"
                 else f"topk nz_ratio {self.nz_ratio:g}")
        return {"gate": self.gate if not self.gate_path else f"trained ({Path(self.gate_path).name}, layer {self.layer})",
                "operating_point": point}

    # ---- the gate -------------------------------------------------------------------------
    def _visible(self, tq, tk, causal, device, key_padding_mask=None):
        """[B|1, 1, nq, nk] bool: key blocks each query block may see."""
        bs = self.block_size
        qid, first = block_ids(tq, tk, bs, device)
        nq, nk = int(qid[-1]) + 1 if tq else 0, math.ceil(tk / bs)
        vis = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
        if causal:
            vis = (torch.arange(nk, device=device).view(1, nk) <= (torch.arange(nq, device=device) + first).view(nq, 1))
            vis = vis.view(1, 1, nq, nk)
        if key_padding_mask is not None:  # blocks with a real key
            real = F.pad(key_padding_mask, (0, nk * bs - tk)).view(-1, nk, bs).any(-1)
            vis = vis & real.view(-1, 1, 1, nk)
        return vis

    def gate_scores(self, q, k, causal: bool, key_padding_mask=None) -> torch.Tensor:
        """G [B, H, nq, nk]: the gate's softmax over the key blocks each query block may see
        (zeros where it sees none)."""
        B, H, tq, D = q.shape
        tk, bs = k.shape[2], self.block_size
        dt = self.linear_q.weight.dtype
        qid, _ = block_ids(tq, tk, bs, q.device)
        nq, nk = int(qid[-1]) + 1, math.ceil(tk / bs)
        kid = torch.arange(tk, device=q.device) // bs
        qg = self.linear_q(pool_blocks(q.to(dt), qid, nq, self.q_kinds))  # [B, H, nq, hidden]
        kg = self.linear_k(pool_blocks(k.to(dt), kid, nk, self.k_kinds))  # [B, Hkv, nk, hidden]
        s = qg @ repeat_kv(kg, H // k.shape[1]).transpose(-1, -2) / math.sqrt(self.hidden_size)
        vis = self._visible(tq, tk, causal, q.device, key_padding_mask)
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        return p.masked_fill(~vis.any(-1, keepdim=True), 0.0)

    @torch.no_grad()
    def _block_layout(self, q, k, causal, key_padding_mask=None) -> torch.Tensor:
        """[B, H, nq, nk] bool: the blocks the gate keeps (module docstring)."""
        g = self.gate_scores(q, k, causal, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        vis = self._visible(tq, tk, causal, q.device, key_padding_mask).expand_as(g)
        if self.selection == "threshold":
            keep = g >= self.threshold
        else:
            n = torch.ceil(self.nz_ratio * vis.sum(-1, keepdim=True)).clamp_min(1)
            rank = g.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            keep = rank < n
        nq, nk = g.shape[-2:]
        _, first = block_ids(tq, tk, self.block_size, q.device)
        diag = torch.arange(nk, device=q.device).view(1, nk) == (torch.arange(nq, device=q.device) + first).view(nq, 1)
        keep = keep | diag
        if self.last_block_dense:
            keep[..., -1, :] = True
        return keep & vis

    def block_layout(self, q, k, causal, key_padding_mask=None):
        """The gate's block layout: the index step, timed into ``last_index_ms`` under
        ``methods.base.index_timing(True)``."""
        with timed_index(self, q):
            return self._block_layout(q, k, causal, key_padding_mask)

    # ---- self-distillation ---------------------------------------------------------------------
    def distill_loss(self, q, k, causal: bool = True, target=None) -> torch.Tensor:
        """KL(GT || G), averaged over the query blocks that see a block, heads and batch
        (gradients reach the gate's weights only)."""
        if target is None:
            target = distill_target(q, k, self.block_size, causal)
        g = self.gate_scores(q.detach(), k.detach(), causal)
        rows = target.sum(-1) > 0
        kl = F.kl_div(torch.log(g.clamp_min(1e-12)), target, reduction="none").sum(-1)
        return kl[rows].mean()

    # ---- the attention -------------------------------------------------------------------------
    def mask_mod(self, q, k, causal):
        lay = self.block_layout(q, k, causal, self._kpm)
        self._lay = lay  # reused by flex_layout (called after mask_mod for the same inputs)
        bs = self.block_size
        off = k.shape[2] - q.shape[2]
        first = off // bs

        def seer_mask(b, h, q_idx, kv_idx):
            return lay[b, h, (q_idx + off) // bs - first, kv_idx // bs]

        return seer_mask

    def flex_layout(self, q, k, causal, block):
        """The gate's block layout (``mask_mod``'s index; Tq == Tk here) at FlexAttention's
        ``block`` (``flex.coarsen``); None where block_size does not divide it."""
        from methods.kernels import flex

        bs = self.block_size
        return flex.coarsen(self._lay, bs, bs, block, q.shape[2], k.shape[2])

    def attend(self, q, k, v, causal, key_padding_mask):
        self._kpm = key_padding_mask
        try:
            return super().attend(q, k, v, causal, key_padding_mask)
        finally:
            self._kpm = self._lay = None  # the index flex_layout reused: not held between calls

    def _wants_grad(self, *tensors) -> bool:
        """Gradients of the inputs only: the gate's weights get none through the attention (the
        block choice is discrete; they learn by ``distill_loss``)."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def triton_attend(self, q, k, v, causal, key_padding_mask):
        from methods.kernels import block_sparse as bsk

        bs = self.block_size
        if bs not in (16, 32, 64, 128):
            return None  # the kernel's tiles: the flex path
        idx, cnt = bsk.layout_to_lists(self.block_layout(q, k, causal, key_padding_mask))
        out = bsk.block_sparse_attention(q, k, v, idx, cnt, block_m=bs, block_n=bs, causal=causal,
                                         key_padding_mask=key_padding_mask)
        return out, bsk.tile_work(cnt, bs, bs, q.shape[0], q.shape[1])

    def cost(self, tq, tk, causal) -> Cost:
        """Data-dependent: the last call's density (dense before any call); plus the gate's
        block scores."""
        dense_pairs = masks.causal_pairs(tq, tk) if causal else tq * tk
        density = 1.0 if self.last_density is None else float(self.last_density)
        nq, nk = math.ceil(tq / self.block_size), math.ceil(tk / self.block_size)
        gate = 2.0 * nq * nk * self.hidden_size + 2.0 * (nq + nk) * self.head_dim * 3 * self.hidden_size
        return Cost(flops=self.num_heads * (4.0 * density * dense_pairs * self.head_dim + gate), density=density,
                    kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2)


def _pools(name: str, spec: str) -> tuple[str, ...]:
    """"maxminavg" -> ("max", "min", "avg")."""
    out, rest = [], str(spec)
    while rest:
        for p in POOLS:
            if rest.startswith(p):
                out.append(p)
                rest = rest[len(p):]
                break
        else:
            raise ValueError(f"SeerAttention: {name} must be a concatenation of {POOLS} (e.g. 'maxminavg'), "
                             f"got {spec!r}")
    if not out or len(set(out)) != len(out):
        raise ValueError(f"SeerAttention: {name} must name each pooling at most once, got {spec!r}")
    return tuple(out)


@torch.no_grad()
def distill_target(q, k, block_size: int, causal: bool = True) -> torch.Tensor:
    """GT [B, H, nq, nk]: the dense attention map max-pooled over (query block, key block)
    tiles, each query block's row normalised to sum to one (module docstring), in fp32, by
    query chunks (memory of one chunk's [rows, Tk] map)."""
    B, H, tq, D = q.shape
    tk = k.shape[2]
    qid, first = block_ids(tq, tk, block_size, q.device)
    nq, nk = int(qid[-1]) + 1, math.ceil(tk / block_size)
    kk = repeat_kv(k, H // k.shape[1]).float()
    out = torch.full((B, H, nq, nk), 0.0, device=q.device)
    kid = torch.arange(tk, device=q.device) // block_size
    for a in range(0, tq, 1024):
        b = min(a + 1024, tq)
        s = q[:, :, a:b].float() @ kk.transpose(-1, -2) / math.sqrt(D)
        if causal:
            pos = torch.arange(a, b, device=q.device).view(-1, 1) + (tk - tq)
            s = s.masked_fill(torch.arange(tk, device=q.device).view(1, -1) > pos, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # [B, H, c, Tk]
        colmax = p.new_full((B, H, b - a, nk), 0.0).scatter_reduce(
            3, kid.view(1, 1, 1, tk).expand(B, H, b - a, tk), p, "amax", include_self=True)
        rows = qid[a:b].view(1, 1, -1, 1).expand(B, H, b - a, nk)
        out.scatter_reduce_(2, rows, colmax, "amax", include_self=True)
    return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
