"""Dense (exact) softmax attention: the baseline every speedup is quoted against.

impl=reference  explicit softmax(QK^T / sqrt(D)) V in fp32 (materialises the score matrix)
impl=sdpa       torch.nn.functional.scaled_dot_product_attention, whichever backend PyTorch
                picks (``backend=auto``, named in the record) or the one forced by ``backend``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods import masks
from methods.base import AttentionMethod, Cost, dense_flops, masked_attention

_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


class Dense(AttentionMethod):
    name = "dense"
    # what the README's method table says (python -m analysis.readme)
    paper = None
    kind = "exact"
    official_test = "tests/test_dense.py::test_reference_and_sdpa_match_naive"
    exact = True
    impls = ("reference", "sdpa")

    def __init__(self, impl: str = "sdpa", backend: str = "auto", **structural):
        super().__init__(impl=impl, **structural)
        if backend not in _BACKENDS:
            raise ValueError(f"Dense: unknown backend {backend!r}; choose one of {list(_BACKENDS)}")
        self.backend = backend

    @property
    def real_kernel(self) -> bool:
        return True  # nothing is skipped, so nothing is pretended

    def _sdpa_args(self, q, k, causal, key_padding_mask):
        """SDPA's is_causal is top-left aligned, so end-aligned causal with Tq != Tk or a
        padding mask goes through an explicit boolean mask."""
        B, H, tq, _ = q.shape
        tk = k.shape[2]
        if key_padding_mask is None and (not causal or tq == tk):
            return None, causal
        return masks.attention_mask(B, H, tq, tk, causal, key_padding_mask, q.device), False

    def attend(self, q, k, v, causal, key_padding_mask):
        if self.impl == "reference":
            mask = masks.attention_mask(
                q.shape[0], q.shape[1], q.shape[2], k.shape[2], causal, key_padding_mask, q.device
            )
            return masked_attention(q, k, v, mask)
        mask, is_causal = self._sdpa_args(q, k, causal, key_padding_mask)
        gqa = k.shape[1] != q.shape[1]
        if self.backend == "auto":
            out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa)
        else:
            with torch.nn.attention.sdpa_kernel(_sdpa_backend(self.backend)):
                out = F.scaled_dot_product_attention(
                    q, k, v, mask, is_causal=is_causal, enable_gqa=gqa
                )
        if mask is not None:  # rows with no allowed key: zeros, as in the reference (only those)
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return out

    def describe(self, q, k, v, causal, key_padding_mask=None) -> dict:
        if self.impl == "reference":
            return {"backend": "explicit-fp32"}
        if self.backend != "auto":
            return {"backend": f"sdpa:{self.backend}"}
        mask, is_causal = self._sdpa_args(q, k, causal, key_padding_mask)
        try:  # the dispatcher's own choice (a private but long-standing torch function)
            from torch.nn.attention import SDPBackend

            choice = torch._fused_sdp_choice(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
            )
            return {"backend": f"sdpa:{SDPBackend(choice).name.lower()}"}
        except Exception:  # noqa: BLE001 - naming the backend must never fail a run
            return {"backend": "sdpa:unknown"}

    def cost(self, tq, tk, causal) -> Cost:
        return Cost(
            flops=dense_flops(self.num_heads, self.head_dim, tq, tk, causal),
            density=1.0,
            kv_bytes=2.0 * self.num_kv_heads * tk * self.head_dim * 2,
        )
