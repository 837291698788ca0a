"""Performer: FAVOR+ attention with positive orthogonal random features.

Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021), Alg. 1 and Sec. 2.3-2.4.

    x = q / d^(1/4), y = k / d^(1/4)           so that exp(x . y) = exp(q . k / sqrt(d))
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)    W: [m, d], rows orthogonal in blocks of d,
                                               norms drawn as those of N(0, I_d) vectors
    E_W[phi(x) . phi(y)] = exp(x . y)          (positive random features: unbiased)
    out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)       non-causal
    out_i = phi(q_i) S_i / (phi(q_i) z_i),  S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum phi(k_j)

Numerical stability: each query's features are divided by their own maximum and each
(batch, head)'s key features by the maximum over its keys; both factors cancel between the
numerator and the denominator, and no maximum crosses a batch or head boundary. Features and
sums are computed in fp32 (fp64 when the inputs are fp64).

kernel=relu is the paper's generalized attention: phi(x) = ReLU(W x) / sqrt(m) + 1e-3.
The projection W is a buffer, drawn from ``feature_seed``: fixed at evaluation; in training
it is redrawn every ``redraw_interval`` forward calls (0 = never).

impl=reference  non-causal as above; causal through explicit prefix sums [B, H, T, m, D]
impl=chunked    causal in chunks of ``chunk_size``: exact masked products inside a chunk,
                a running state across chunks (the same function in O(T) memory)
impl=triton     the same chunked recurrence in two Triton passes with the feature map fused
                (``methods.kernels.linear_attn.performer_causal``: nothing of size T x m is
                written; padded batches take precomputed features; forward, Tq == Tk, else
                the chunked path)
"""
from __future__ import annotations

import math

import torch

from methods.base import AttentionMethod, Cost, check_int, dense_flops, repeat_kv
from methods.recurrent_decode import RecurrentDecode, grouped

RELU_EPS = 1e-3


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """[m, d] random features: blocks of d orthogonal rows (QR of a Gaussian), each row
    rescaled to the norm of an independent N(0, I_d) vector (Sec. 2.4, "ORFs")."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        qm = qm * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed rows
        blocks.append(qm.T)
    w = torch.cat(blocks)[:m]  # [m, d], unit rows
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


def iid_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(m, d, generator=generator, dtype=torch.float64)


def positive_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x) = exp(W x - |x|^2/2) / sqrt(m), unstabilised (for the kernel's mathematics)."""
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])


class Performer(AttentionMethod):
    name = "performer"
    # what the README's method table says (python -m analysis.readme)
    paper = "Choromanski et al. 2021"
    kind = "low-rank (FAVOR+)"
    official_test = None
    trainable = True  # trained models adapt to the feature map (it has no weights of its own)
    training_free = False
    impls = ("reference", "chunked", "triton")
    fixed_head_dim = True  # the projection is [num_features, head_dim]

    def __init__(self, num_features: int = 256, kernel: str = "softmax", orthogonal: bool = True,
                 redraw_interval: int = 0, feature_seed: int = 0, chunk_size: int = 64,
                 impl: str = "chunked", **structural):
        super().__init__(impl=impl, **structural)
        if kernel not in ("softmax", "relu"):
            raise ValueError(f"Performer: kernel must be 'softmax' or 'relu', got {kernel!r}")
        check_int("Performer", "num_features", num_features)
        check_int("Performer", "chunk_size", chunk_size)
        check_int("Performer", "redraw_interval", redraw_interval, 0)
        self.num_features, self.kernel, self.orthogonal = num_features, kernel, orthogonal
        self.redraw_interval, self.feature_seed, self.chunk_size = redraw_interval, feature_seed, chunk_size
        self.draws = 0
        self.calls = 0
        self.register_buffer("projection", self._draw(), persistent=True)

    @property
    def real_kernel(self) -> bool:
        return True  # both paths do linear-attention work; neither computes the T x T scores

    def _draw(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.feature_seed * 1_000_003 + self.draws)
        sample = orthogonal_gaussian if self.orthogonal else iid_gaussian
        return sample(self.num_features, self.head_dim, g).float()

    def redraw(self) -> None:
        self.draws += 1
        self.projection.copy_(self._draw().to(self.projection.device))

    # ---- feature maps ----------------------------------------------------------------
    def feature_logits(self, x: torch.Tensor) -> torch.Tensor:
        """W x - |x|^2 / 2 with x scaled by d^(-1/4) (softmax kernel), or W x (relu kernel):
        [B, H, T, d] -> [B, H, T, m], in fp32 (fp64 for fp64 inputs)."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dt) * self.head_dim ** -0.25
        proj = x @ self.projection.to(dt).T  # [B, H, T, m]
        return proj if self.kernel == "relu" else proj - 0.5 * (x * x).sum(-1, keepdim=True)

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """[B, H, T, d] -> [B, H, T, m], stabilised, in fp32 (fp64 for fp64 inputs)."""
        logits = self.feature_logits(x)
        if self.kernel == "relu":
            return torch.relu(logits) / math.sqrt(self.num_features) + RELU_EPS
        if is_query:  # one maximum per query row: cancels in that row's ratio
            stab = logits.amax(dim=-1, keepdim=True)
        else:  # one maximum per (batch, head) over all its keys: cancels in every ratio
            stab = logits.amax(dim=(-1, -2), keepdim=True)
        return torch.exp(logits - stab.detach()) / math.sqrt(self.num_features)

    # ---- attention ---------------------------------------------------------------------
    def attend(self, q, k, v, causal, key_padding_mask):
        if self.training and self.redraw_interval > 0:
            if self.calls and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        if causal and key_padding_mask is None and self.impl == "triton" and self._triton_ok(q, k):
            from methods.kernels.linear_attn import performer_causal  # the feature map fused

            return performer_causal(q, k, v, self.projection, chunk=self.chunk_size,
                                    relu=self.kernel == "relu", eps=RELU_EPS).to(q.dtype)
        rep = q.shape[1] // k.shape[1]
        fq = self.features(q, True)  # [B, H, Tq, m]
        fk = repeat_kv(self.features(k, False), rep)  # [B, H, Tk, m]
        vv = repeat_kv(v, rep).to(fq.dtype)  # [B, H, Tk, D]
        if key_padding_mask is not None:  # padded keys contribute nothing
            fk = fk * key_padding_mask[:, None, :, None].to(fk.dtype)
        if not causal:
            kv = fk.transpose(-1, -2) @ vv  # [B, H, m, D]
            num = fq @ kv  # [B, H, Tq, D]
            den = fq @ fk.sum(-2).unsqueeze(-1)  # [B, H, Tq, 1]
        elif self.impl == "reference":
            num, den = self._causal_prefix(fq, fk, vv)
        elif self.impl == "triton" and self._triton_ok(q, k):
            from methods.kernels.linear_attn import causal_linear_attention

            half = q.dtype in (torch.float16, torch.bfloat16)  # features in the inputs' dtype there
            cast = (lambda x: x.to(q.dtype)) if half else (lambda x: x)  # noqa: E731
            return causal_linear_attention(cast(fq), cast(fk), cast(vv), chunk=self.chunk_size).to(q.dtype)
        else:
            num, den = self._causal_chunked(fq, fk, vv)
        return (num / den.clamp_min(1e-30)).to(q.dtype)

    def _triton_ok(self, q, k) -> bool:
        """The kernel serves prefill (Tq == Tk) forward passes; training takes the chunked path."""
        from methods.kernels.linear_attn import usable

        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        return usable(q) and q.shape[2] == k.shape[2] and not grad and self.chunk_size in (16, 32, 64, 128)

    def _causal_prefix(self, fq, fk, vv):
        """Prefix sums S_i = sum_{j<=i} phi(k_j) v_j^T (end-aligned when Tq < Tk)."""
        tq, tk = fq.shape[2], fk.shape[2]
        s = torch.cumsum(fk.unsqueeze(-1) * vv.unsqueeze(-2), dim=2)  # [B, H, Tk, m, D]
        z = torch.cumsum(fk, dim=2)  # [B, H, Tk, m]
        s, z = s[:, :, tk - tq:], z[:, :, tk - tq:]
        num = (fq.unsqueeze(-2) @ s).squeeze(-2)  # [B, H, Tq, D]
        den = (fq * z).sum(-1, keepdim=True)  # [B, H, Tq, 1]
        return num, den

    def _causal_chunked(self, fq, fk, vv):
        """Chunks of C tokens, all at once: exact masked products inside each chunk, and the
        exclusive prefix sum of the chunks' states (S, z) across them. Memory is linear in T."""
        tq, tk, C = fq.shape[2], fk.shape[2], self.chunk_size
        off = tk - tq
        s0 = fk[:, :, :off].transpose(-1, -2) @ vv[:, :, :off]  # [B, H, m, D] keys before the queries
        z0 = fk[:, :, :off].sum(-2)  # [B, H, m]
        n = math.ceil(tq / C)
        pad = n * C - tq

        def chunks(x):  # [B, H, tq, f] -> [B, H, n, C, f] (zero padded: adds nothing)
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            return x.view(*x.shape[:2], n, C, x.shape[-1])

        qc, kc, vc = chunks(fq), chunks(fk[:, :, off:]), chunks(vv[:, :, off:])
        s = kc.transpose(-1, -2) @ vc  # [B, H, n, m, D] state of each chunk
        z = kc.sum(-2)  # [B, H, n, m]
        s = torch.cumsum(s, 2) - s + s0.unsqueeze(2)  # states of everything before each chunk
        z = torch.cumsum(z, 2) - z + z0.unsqueeze(2)
        att = torch.tril(qc @ kc.transpose(-1, -2))  # [B, H, n, C, C], causal inside
        num = qc @ s + att @ vc  # [B, H, n, C, D]
        den = (qc * z.unsqueeze(-2)).sum(-1, keepdim=True) + att.sum(-1, keepdim=True)
        flat = lambda x: x.reshape(*x.shape[:2], n * C, x.shape[-1])[:, :, :tq]  # noqa: E731
        return flat(num), flat(den)

    def decode_adapter(self) -> PerformerDecode:
        """The decode path over a KV cache (``methods.decode``): the recurrent state."""
        return PerformerDecode(self)

    def cost(self, tq, tk, causal) -> Cost:
        m, d, h = self.num_features, self.head_dim, self.num_heads
        flops = h * (2.0 * (tq + tk) * d * m  # feature maps
                     + 2.0 * tk * m * d + 2.0 * tq * m * d  # phi(K)^T V, phi(Q) S
                     + 4.0 * (tq + tk) * m)  # normaliser
        if causal and self.impl == "chunked":
            flops += h * 2.0 * tq * self.chunk_size * (m + d)  # intra-chunk products (half used)
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, causal),
                    kv_bytes=2.0 * self.num_kv_heads * (m * d + m))


class PerformerDecode(RecurrentDecode):
    """Performer's decode path: the causal form's state (module docstring), S = sum_j phi(k_j)
    v_j^T [B, Hkv, m, D] and z = sum_j phi(k_j) [B, Hkv, m], one per KV head (the key features
    do not depend on the query head). Softmax kernel: the key features are stabilised by the
    running maximum ``mx`` [B, Hkv, 1, 1] of the key logits (the prefill divides by the maximum
    over all keys; either cancels between numerator and denominator): when a new key raises it,
    S and z are rescaled by exp(old - new)."""

    def absorb(self, cache, k, v) -> None:
        m, dt = self.method, self.state_dtype(cache)
        logits = m.feature_logits(k)  # [B, Hkv, n, m]
        if m.kernel == "relu":
            fk = torch.relu(logits) / math.sqrt(m.num_features) + RELU_EPS
        else:
            top = logits.amax(dim=(-1, -2), keepdim=True)
            if "mx" in cache.aux:
                new = torch.maximum(cache.aux["mx"], top)
                shrink = torch.exp(cache.aux["mx"] - new)
                cache.aux["S"], cache.aux["z"] = cache.aux["S"] * shrink, cache.aux["z"] * shrink[..., 0]
                top = new
            cache.aux["mx"] = top
            fk = torch.exp(logits - top) / math.sqrt(m.num_features)
        add_s, add_z = fk.transpose(-1, -2) @ v.to(dt), fk.sum(2)
        if "S" not in cache.aux:
            cache.aux["S"], cache.aux["z"] = add_s, add_z
        else:
            cache.aux["S"], cache.aux["z"] = cache.aux["S"] + add_s, cache.aux["z"] + add_z

    def readout(self, q_t, cache):
        fq = self.method.features(q_t, True)  # [B, H, 1, m]
        num = grouped(fq, cache.aux["S"])
        den = grouped(fq, cache.aux["z"][..., None])
        return num / den.clamp_min(1e-30)
