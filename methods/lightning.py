"""Lightning Attention: TransNormer's NormAttention, tiled into intra- and inter-block parts,
with TransNormerLLM's decay as an option.

Qin et al., "The Devil in Linear Transformer" (TransNormer, EMNLP 2022, arXiv 2210.10340),
Sec. 4.2, NormAttention; Qin et al., "TransNormerLLM" (arXiv 2307.14995), Sec. 3.1-3.2 (LRPE-d
decay, SRMSNorm); Qin et al., "Lightning Attention-2" (arXiv 2401.04658), Alg. 1 (tiling):

    Q = phi(q), K = phi(k)                    phi = SiLU (TransNormerLLM; TransNormer: 1 + elu)
    non-causal:  O = Norm(Q (K^T V))
    causal:      O = Norm((Q K^T (.) M) V),   M_ts = lambda^(t-s) for s <= t, else 0
    recurrent:   S_t = lambda S_{t-1} + K_t^T V_t,   o_t = Norm(Q_t S_t)
    Norm(x) = x / sqrt(mean(x^2) + eps)       SRMSNorm (no gain), eps = 1e-6

No softmax, no scaling by 1/sqrt(d) and no denominator: the norm after the product keeps the
scale. lambda = 1 without decay (TransNormer). With ``decay=true`` (TransNormerLLM, causal
only), head h of layer l (of L) decays at lambda_h = exp(-s_h (1 - l / (L - 1) + 1e-5)), s_h
ALiBi's slopes 2^(-8 (h + 1) / H) (the official code's formula; the paper writes
exp(-8h/H (1 - l/L))); ``layer_idx`` and ``num_layers`` place the layer (one layer: the factor
is 1 + 1e-5).

The official code (OpenNLPLab/lightning-attention: ``linear_attn``, the decay mask
exp(-s_h (t - s)), ``_build_slope_tensor``, ``SimpleRMSNormTorch``) is the default: the norm
runs on the concatenation of all heads (the model width H*d), and the layer then multiplies an
output gate computed from its input; the gate is the model's, not the attention's, and is left
out here (as is TNL's SiLU on v, arXiv 2405.17381: a model applies it to v before the call). ``norm=heads`` is the official normalisation over all heads,
``norm=head`` normalises each head alone, ``norm=none`` returns the raw product.

impl=reference  the explicit attention-matrix form, (Q K^T (.) M) V: T x T memory
impl=lightning  Lightning Attention's tiling in PyTorch, blocks of ``block_size`` tokens: inside
                a block the masked product [(Q_i K_i^T) (.) M] V_i, across blocks the running
                state KV = lambda^B KV + (lambda^(B-1-j) K_i)^T V_i read by lambda^(j+1) Q_i KV
                (``tiled_causal``): O(T) memory.
impl=triton     the same tiling in Triton (``methods.kernels.lightning.lightning_causal``) for
                causal self-attention (Tq == Tk, power-of-two head dims >= 16, block_size
                16-128, fp32/fp16/bf16, CUDA or the interpreter), forward and backward: the
                gradients are Lightning Attention-2's Alg. 2 in the same kernel (dQ by the
                running KV state forward, dK and dV by the running dKV state backward, each
                chunk's own masked block product inside), so training runs on the kernels;
                otherwise (Tq < Tk, fp64, other shapes, CPU without the interpreter) the
                PyTorch tiling, as Performer's impl=triton does. ``two_pass=true`` takes the
                kernel's two-pass form (fla's chunked form: the state before every chunk stored
                by one sequential pass, then all chunks at once; more parallel at small B * H,
                T / block_size states of d x d in memory); false walks the chunks in one pass.

Padded keys (key_padding_mask) are zeroed: they add nothing to S, and keep their positions (the
decay counts them). The kernel and the norm are learned with the model: the method is trained
from scratch (``training_free = False``); in place of softmax in a pretrained model its outputs
are not meaningful.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.base import AttentionInputError, AttentionMethod, Cost, dense_flops, repeat_kv
from methods.recurrent_decode import RecurrentDecode, grouped

ACTIVATIONS = ("silu", "1+elu", "relu", "identity")
NORMS = ("heads", "head", "none")
NORM_EPS = 1e-6  # lightning_attn's SimpleRMSNormTorch


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022), as TransNormerLLM's code builds them."""
    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def run_steps(step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A recurrent form unrolled: ``step(state, q_t, k_t, v_t) -> (o_t, state)`` over the
    positions of q, k, v [B, H, T, D] (state None at the start); the outputs [B, H, T, D]."""
    state, outs = None, []
    for t in range(q.shape[2]):
        o, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t])
        outs.append(o)
    return torch.stack(outs, 2)


def tiled_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                 log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j for every i, in blocks (Lightning Attention).

    q, k: [B, H, T, F]; v: [B, H, T, E]; log_decay: [H] (log lambda <= 0) or None (lambda = 1).
    Inside a block: the masked, decayed product; across blocks: a running state [B, H, F, E]
    (one step per block). Every decay factor is a power of lambda <= 1: nothing overflows.
    """
    B, H, T, Fd = q.shape
    E = v.shape[-1]
    n = math.ceil(T / block)
    pad = n * block - T
    chunk = lambda x: F.pad(x, (0, 0, 0, pad)).view(B, H, n, block, x.shape[-1])  # noqa: E731
    qc, kc, vc = chunk(q), chunk(k), chunk(v)
    p = torch.arange(block, device=q.device, dtype=q.dtype)
    ld = torch.zeros(H, device=q.device, dtype=q.dtype) if log_decay is None else log_decay.to(q.dtype)
    ld = ld.view(H, 1, 1)
    diff = p[:, None] - p[None, :]  # i - j inside the block
    intra_mask = torch.where(diff >= 0, torch.exp(ld * diff.clamp_min(0)), torch.zeros((), dtype=q.dtype))
    q_in = torch.exp(ld * (p + 1)[:, None])  # lambda^(i+1): the state as query i sees it  [H, C, 1]
    k_out = torch.exp(ld * (block - 1 - p)[:, None])  # lambda^(C-1-j): key j at the block's end
    block_decay = torch.exp(ld * block).view(1, H, 1, 1)  # lambda^C
    out = torch.empty(B, H, n, block, E, device=q.device, dtype=q.dtype)
    state = torch.zeros(B, H, Fd, E, device=q.device, dtype=q.dtype)
    for c in range(n):
        qi, ki, vi = qc[:, :, c], kc[:, :, c], vc[:, :, c]
        intra = ((qi @ ki.transpose(-1, -2)) * intra_mask) @ vi
        out[:, :, c] = intra + (qi * q_in) @ state
        state = block_decay * state + (ki * k_out).transpose(-1, -2) @ vi
    return out.view(B, H, n * block, E)[:, :, :T]


class Lightning(AttentionMethod):
    name = "lightning"
    # what the README's method table says (python -m analysis.readme)
    paper = "Qin et al. 2022, 2024"
    kind = "linear (NormAttention)"
    official_test = "tests/test_linear_family.py::test_lightning_matches_the_official_code"
    trainable = True  # the model learns keys and queries for the kernel (no weights here)
    training_free = False
    supports_decode = True  # models decode with the method itself (end-aligned causal)
    impls = ("reference", "lightning", "triton")

    def __init__(self, activation: str = "silu", norm: str = "heads", decay: bool = False,
                 layer_idx: int = 0, num_layers: int = 1, block_size: int = 64, two_pass: bool = False,
                 impl: str = "lightning", **structural):
        super().__init__(impl=impl, **structural)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Lightning: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if norm not in NORMS:
            raise ValueError(f"Lightning: norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(decay, bool):
            raise ValueError(f"Lightning: decay must be true or false, got {decay!r}")
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"Lightning: num_layers must be a positive integer, got {num_layers!r}")
        if int(layer_idx) != layer_idx or not 0 <= layer_idx < num_layers:
            raise ValueError(f"Lightning: layer_idx must be in [0, num_layers={num_layers}), got {layer_idx!r}")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"Lightning: block_size must be a positive integer, got {block_size!r}")
        if not isinstance(two_pass, bool):
            raise ValueError(f"Lightning: two_pass must be true or false, got {two_pass!r}")
        self.two_pass = two_pass
        self.activation, self.norm, self.decay = activation, norm, decay
        self.layer_idx, self.num_layers, self.block_size = int(layer_idx), int(num_layers), int(block_size)

    @property
    def real_kernel(self) -> bool:
        return self.impl in ("lightning", "triton")  # the tiled paths never form the T x T matrix

    def log_decay(self) -> torch.Tensor | None:
        """log lambda_h per query head: [H] (fp64), or None without decay."""
        if not self.decay:
            return None
        depth = 1.0 - self.layer_idx / (self.num_layers - 1) if self.num_layers > 1 else 1.0
        return -torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float64) * (depth + 1e-5)

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        if self.decay and not causal:
            raise AttentionInputError("Lightning: decay=true (TransNormerLLM) is causal only; "
                                      "causal=False needs decay=false (TransNormer's NormAttention)")

    # ---- the pieces ----------------------------------------------------------------------
    def phi(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "silu":
            return F.silu(x)
        if self.activation == "1+elu":
            return 1 + F.elu(x)
        if self.activation == "relu":
            return torch.relu(x)
        return x

    def normalise(self, o: torch.Tensor) -> torch.Tensor:
        """SRMSNorm: x / sqrt(mean(x^2) + eps) over all heads (H*d values) or each head (d)."""
        if self.norm == "none":
            return o
        dims = (1, 3) if self.norm == "heads" else (3,)
        return o * torch.rsqrt((o * o).mean(dims, keepdim=True) + NORM_EPS)

    def _prepare(self, q, k, v, key_padding_mask):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        rep = q.shape[1] // k.shape[1]
        fq, fk, vv = self.phi(q.to(dt)), repeat_kv(self.phi(k.to(dt)), rep), repeat_kv(v.to(dt), rep)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(dt)
            fk, vv = fk * keep, vv * keep
        ld = self.log_decay()
        return fq, fk, vv, (None if ld is None else ld.to(device=q.device, dtype=dt))

    # ---- attention -----------------------------------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        fq, fk, vv, ld = self._prepare(q, k, v, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        if not causal:
            o = fq @ (fk.transpose(-1, -2) @ vv)
        elif self.impl == "reference":
            i = torch.arange(tk - tq, tk, device=q.device)[:, None]  # end-aligned query positions
            j = torch.arange(tk, device=q.device)[None, :]
            dist = (i - j).to(fq.dtype)
            lam = torch.zeros(1, dtype=fq.dtype, device=q.device) if ld is None else ld
            m = torch.where(dist >= 0, torch.exp(lam.view(-1, 1, 1) * dist.clamp_min(0)),
                            torch.zeros((), dtype=fq.dtype, device=q.device))  # [H|1, Tq, Tk]
            o = ((fq @ fk.transpose(-1, -2)) * m) @ vv
        elif self.impl == "triton" and self._triton_ok(fq, vv, tq, tk):
            from methods.kernels.lightning import lightning_causal

            o = lightning_causal(fq, fk, vv, ld, chunk=self.block_size, two_pass=self.two_pass)
        else:
            fq = F.pad(fq, (0, 0, tk - tq, 0))  # queries end-aligned: pad the front, drop it
            o = tiled_causal(fq, fk, vv, self.block_size, ld)[:, :, tk - tq:]
        return self.normalise(o).to(q.dtype)

    def _triton_ok(self, fq, vv, tq, tk) -> bool:
        """The kernel serves causal self-attention (forward and backward, Tq == Tk); a cache
        longer than the queries, fp64 or other shapes take the PyTorch tiling."""
        from methods.kernels.lightning import usable

        d, e = fq.shape[-1], vv.shape[-1]
        return (usable(fq) and tq == tk and self.block_size in (16, 32, 64, 128)
                and fq.dtype != torch.float64
                and d >= 16 and not d & (d - 1) and e >= 16 and not e & (e - 1))

    def decode(self, q, k, v) -> torch.Tensor:
        """A decode step over the whole cache (end-aligned, causal); ``step`` is the O(1) form."""
        return self.attend(q, k, v, True, None)

    def step(self, state, q_t, k_t, v_t):
        """One token of the recurrent form: q_t, k_t, v_t [B, H|Hkv, D] -> (o_t [B, H, D], state).
        state: S [B, H, D, D] (None at the start)."""
        rep = q_t.shape[1] // k_t.shape[1]
        dt = torch.float64 if q_t.dtype == torch.float64 else torch.float32
        fq, fk = self.phi(q_t.to(dt)), repeat_kv(self.phi(k_t.to(dt))[:, :, None], rep)[:, :, 0]
        vv = repeat_kv(v_t.to(dt)[:, :, None], rep)[:, :, 0]
        kv = fk[..., :, None] * vv[..., None, :]
        if state is None:
            state = kv
        else:
            ld = self.log_decay()
            lam = 1.0 if ld is None else torch.exp(ld).to(device=q_t.device, dtype=dt).view(1, -1, 1, 1)
            state = lam * state + kv
        o = (fq[..., None, :] @ state)[..., 0, :]  # [B, H, D]
        return self.normalise(o[:, :, None])[:, :, 0].to(q_t.dtype), state

    def recurrent(self, q, k, v) -> torch.Tensor:
        """The causal output token by token through ``step``: [B, H, T, D]."""
        return run_steps(self.step, q, k, v)

    def decode_adapter(self) -> LightningDecode:
        """The decode path over a KV cache (``methods.decode``): the recurrent state."""
        return LightningDecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        h, d = self.num_heads, self.head_dim
        dense = dense_flops(h, d, tq, tk, causal)
        if causal and self.impl == "reference":
            flops = dense + h * 2.0 * tq * tk  # the explicit matrix, and its decay mask
        else:  # K^T V and Q S; causal tiling adds the blocks' own masked products
            flops = h * 4.0 * (tq + tk) * d * d
            if causal:
                flops += h * 4.0 * tq * self.block_size * d
        flops += h * 4.0 * (tq + tk) * d  # the activation and the norm
        heads = self.num_heads if self.decay else self.num_kv_heads  # a state per decay rate
        return Cost(flops=flops, density=flops / dense, kv_bytes=2.0 * heads * d * d)


class LightningDecode(RecurrentDecode):
    """Lightning's decode path: the state S [B, Hs, D, D] of the recurrent form (module
    docstring), one per KV head without decay (shared by its query heads), one per query head
    with decay (each decays at its own rate). n tokens at once (the prefill's, or one step's):
    S <- lambda^n S + sum_j lambda^(n-1-j) phi(k_j)^T v_j; o_t = Norm(phi(q_t) S_t)."""

    def absorb(self, cache, k, v) -> None:
        m, dt = self.method, self.state_dtype(cache)
        rep, n = self.num_heads // self.num_kv_heads, k.shape[2]
        fk, vv = m.phi(k.to(dt)), v.to(dt)
        ld = m.log_decay()
        if ld is not None:  # a state per query head
            fk, vv = repeat_kv(fk, rep), repeat_kv(vv, rep)
            ld = ld.to(device=k.device)
            fk = fk * torch.exp(ld.view(-1, 1) * torch.arange(n - 1, -1, -1, device=k.device,
                                                               dtype=torch.float64)).to(dt)[None, :, :, None]
        add = fk.transpose(-1, -2) @ vv  # [B, Hs, D, D]
        s = cache.aux.get("S")
        if s is None:
            cache.aux["S"] = add
        else:
            lam = 1.0 if ld is None else torch.exp(ld * n).to(dt).view(1, -1, 1, 1)
            cache.aux["S"] = lam * s + add

    def readout(self, q_t, cache):
        m = self.method
        return m.normalise(grouped(m.phi(q_t.to(self.state_dtype(cache))), cache.aux["S"]))
