"""Nystromformer: Nystrom approximation of softmax attention with segment-mean landmarks.

Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention"
(AAAI 2021), Eq. 14-16 and Alg. 1.

    Q~, K~ = segment means of Q, K (m landmarks)                      [B, H, m, d]
    F = softmax(Q K~^T / sqrt d)     [T, m]
    A = softmax(Q~ K~^T / sqrt d)    [m, m]
    B = softmax(Q~ K^T / sqrt d)     [m, T]
    out = F A^+ (B V)  (+ depthwise conv of V over the sequence, kernel ``conv_kernel``)

A^+ is the iterative Moore-Penrose pseudo-inverse (Razavi et al. 2014; paper Eq. 16), in fp32:
    Z_0 = A^T / c
    Z_{k+1} = Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k))) / 4
The scale c follows the official code's ``init_option`` (mlpen/Nystromformer,
``iterative_inv``; A is a softmax, so its rows sum to 1 and ||A||_inf = 1):
    pinv_init=original  (official default) c = the largest column sum of A over the whole
                        call: every matrix of the batch and every head shares one scale, so a
                        result depends on what else is in the batch
    pinv_init=exact     c = ||A||_1 = the largest column sum of each matrix (per batch
                        element and head), the paper's Z_0 = A^T / (||A||_1 ||A||_inf)

Deviation: the convolution's weights start at zero (the paper's code uses PyTorch's default
init), so an untrained Nystromformer measures the Nystrom approximation itself rather than
a random convolution of V; training learns the skip from there.

Lengths not divisible by m: segments of s = ceil(T / m) tokens, ceil(T / s) landmarks, the
last segment averaging only its real tokens (padding with a mask, no assert). With m = T
every token is its own landmark and the result is exact softmax attention. Padded keys
(key_padding_mask) are left out of the key landmarks and of B; a batch element whose keys
are all padding gets zeros, as in dense attention (its values reach no other element).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from methods.base import (
    AttentionInputError,
    AttentionMethod,
    Cost,
    check_int,
    dense_flops,
    repeat_kv,
)


def segment_means(x: torch.Tensor, m: int, valid: torch.Tensor | None = None):
    """[B, H, T, d] -> ([B, H, m', d], [B, 1, 1, m'] bool): means of consecutive segments of
    s = ceil(T/m) tokens over the valid tokens (valid: [B, T] bool or None), m' = ceil(T/s)
    <= m, and which segments hold any valid token."""
    B, H, T, d = x.shape
    s = math.ceil(T / m)
    mm = math.ceil(T / s)
    w = torch.ones(B, T, dtype=x.dtype, device=x.device) if valid is None else valid.to(x.dtype)
    pad = mm * s - T
    xs = torch.nn.functional.pad(x * w[:, None, :, None], (0, 0, 0, pad))  # [B, H, m's, d]
    ws = torch.nn.functional.pad(w, (0, pad))  # [B, m's]
    tot = xs.view(B, H, mm, s, d).sum(3)
    cnt = ws.view(B, 1, mm, s).sum(-1, keepdim=True)  # [B, 1, m', 1]
    return tot / cnt.clamp_min(1.0), (cnt > 0).view(B, 1, 1, mm)


PINV_INITS = ("original", "exact")


def iterative_pinv(a: torch.Tensor, iters: int, init: str = "original") -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of [..., m, m] row-stochastic matrices by Razavi et al.'s
    iteration; ``init``: the scale of Z_0 (module docstring), one for all of ``a`` or per matrix."""
    if init not in PINV_INITS:
        raise ValueError(f"iterative_pinv: init must be one of {PINV_INITS}, got {init!r}")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col = a.sum(-2)  # [..., m]: column sums
    norm = col.amax() if init == "original" else col.amax(-1)[..., None, None]
    z = a.transpose(-1, -2) / norm
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class Nystrom(AttentionMethod):
    name = "nystrom"
    # what the README's method table says (python -m analysis.readme)
    paper = "Xiong et al. 2021"
    kind = "low-rank (Nystrom)"
    official_test = "tests/test_faithful.py::test_nystrom_both_inits_equal_the_official_iteration"
    supports_causal = False
    trainable = True  # the convolution skip has weights; without it, training-free
    training_free = False

    def __init__(self, num_landmarks: int = 64, pinv_iters: int = 6, conv_kernel: int = 33,
                 pinv_init: str = "original", **structural):
        super().__init__(**structural)
        check_int("Nystrom", "num_landmarks", num_landmarks, 1)
        check_int("Nystrom", "pinv_iters", pinv_iters, 0)
        check_int("Nystrom", "conv_kernel", conv_kernel, 0)
        if pinv_init not in PINV_INITS:
            raise ValueError(f"Nystrom: pinv_init must be one of {PINV_INITS}, got {pinv_init!r}")
        self.num_landmarks, self.pinv_iters, self.conv_kernel = num_landmarks, pinv_iters, conv_kernel
        self.pinv_init = pinv_init
        if conv_kernel:
            self.conv = nn.Conv2d(self.num_heads, self.num_heads, (conv_kernel, 1),
                                  padding=(conv_kernel // 2, 0), groups=self.num_heads, bias=False)
            nn.init.zeros_(self.conv.weight)  # the skip starts at zero and is learned (see note)
        else:
            self.conv = None
            self.training_free = True

    def hyperparameters(self) -> dict:
        return {"num_landmarks": self.num_landmarks, "pinv_iters": self.pinv_iters,
                "conv_kernel": self.conv_kernel, "pinv_init": self.pinv_init}

    @property
    def real_kernel(self) -> bool:
        return True  # only T x m and m x m scores are computed

    def landmarks(self, t: int) -> int:
        """How many landmarks a sequence of t tokens gets: ceil(t / ceil(t / m))."""
        return math.ceil(t / math.ceil(t / self.num_landmarks)) if t else 0

    def check_inputs(self, q, k, v, causal, key_padding_mask) -> None:
        super().check_inputs(q, k, v, causal, key_padding_mask)
        tq, tk = q.shape[2], k.shape[2]
        if tq and tk and self.landmarks(tq) != self.landmarks(tk):
            raise AttentionInputError(
                f"Nystrom: Tq={tq} and Tk={tk} give {self.landmarks(tq)} and {self.landmarks(tk)} landmarks "
                f"(num_landmarks={self.num_landmarks}); A = softmax(Q~ K~^T) must be square "
                f"(Tq == Tk is)")

    def attend(self, q, k, v, causal, key_padding_mask):
        empty = None
        if key_padding_mask is not None:
            # a batch element of padding only gets zeros (as dense attention), computed over zero
            # keys taken as real: nothing is NaN, and its A is uniform (column sums 1), so the
            # shared pinv scale of pinv_init=original stays what the other elements make it
            empty = ~key_padding_mask.any(-1)
            key_padding_mask = key_padding_mask | empty[:, None]
            k = k.masked_fill(empty[:, None, None, None], 0.0)
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        scale = 1.0 / math.sqrt(q.shape[-1])
        ql, _ = segment_means(qf, self.num_landmarks)  # [B, H, m, d]
        kl, live = segment_means(kf, self.num_landmarks, key_padding_mask)  # [B, H, m, d]
        sf = (qf @ kl.transpose(-1, -2) * scale).masked_fill(~live, float("-inf"))  # [B, H, T, m]
        sa = (ql @ kl.transpose(-1, -2) * scale).masked_fill(~live, float("-inf"))  # [B, H, m, m]
        f, a = torch.softmax(sf, -1), torch.softmax(sa, -1)  # landmarks of padding only: left out
        sb = ql @ kf.transpose(-1, -2) * scale  # [B, H, m, Tk]
        if key_padding_mask is not None:
            sb = sb.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        b = torch.softmax(sb, -1)
        out = f @ (iterative_pinv(a, self.pinv_iters, self.pinv_init) @ (b @ vf))  # [B, H, T, d]
        if self.conv is not None:  # skip connection: depthwise conv of V along the sequence
            vc = vf if key_padding_mask is None else vf * key_padding_mask[:, None, :, None].to(dt)
            skip = torch.nn.functional.conv2d(vc, self.conv.weight.to(dt),
                                              padding=(self.conv_kernel // 2, 0), groups=vc.shape[1])
            out = out + skip[:, :, skip.shape[2] - q.shape[2]:]  # [B, H, T, d]; last Tq rows
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        return out.to(q.dtype)

    def cost(self, tq, tk, causal) -> Cost:
        m = min(self.num_landmarks, tk)
        d, h = self.head_dim, self.num_heads
        flops = h * (2.0 * tq * m * d + 2.0 * m * m * d + 2.0 * m * tk * d  # F, A, B
                     + 2.0 * m * tk * d + 2.0 * m * m * d + 2.0 * tq * m * d  # BV, A+(BV), F(.)
                     + self.pinv_iters * 8.0 * m ** 3  # 4 m x m products per iteration
                     + 2.0 * tk * d * self.conv_kernel)  # depthwise convolution
        return Cost(flops=flops, density=flops / dense_flops(h, d, tq, tk, False),
                    kv_bytes=2.0 * self.num_kv_heads * tk * d * 2)
