"""Fidelity: a method's output error against exact softmax attention.

Two kinds of input (seeded):
  random      q, k, v ~ N(0, 1)
  structured  each query gets ``num_dominant`` keys (from those it may see) whose scores
              stand about ``dominance`` above the rest, so a few keys hold most of the
              attention mass: sparse methods that find them keep it, low-rank ones blur it.
Metrics: relative Frobenius error ||o - o*|| / ||o*|| and the mean cosine similarity of
output rows.
"""
from __future__ import annotations

import torch

from methods.base import repeat_kv
from tasks.base import Task


def random_qkv(B, H, Hkv, T, D, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, device=device)
    k = torch.randn(B, Hkv, T, D, generator=g, device=device)
    v = torch.randn(B, Hkv, T, D, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def structured_qkv(B, H, Hkv, T, D, device, dtype, seed: int, causal: bool,
                   num_dominant: int = 4, dominance: float = 8.0):
    g = torch.Generator(device=device).manual_seed(seed + 1)
    q = torch.randn(B, H, T, D, generator=g, device=device)
    k = torch.randn(B, Hkv, T, D, generator=g, device=device)
    v = torch.randn(B, Hkv, T, D, generator=g, device=device)
    u = torch.rand(B, H, T, num_dominant, generator=g, device=device)
    upto = torch.arange(1, T + 1, device=device).view(1, 1, T, 1) if causal else T
    idx = (u * upto).long()  # [B, H, T, s]: keys each query may see
    kh = repeat_kv(k, H // Hkv)  # [B, H, T, D]
    unit = kh / kh.norm(dim=-1, keepdim=True)
    picked = torch.gather(  # [B, H, T, s, D]: the unit keys each query is drawn to
        unit, 2, idx.reshape(B, H, T * num_dominant, 1).expand(-1, -1, -1, D)
    ).view(B, H, T, num_dominant, D)
    # score of a picked key: dominance * (unit . k) / sqrt(D) = dominance * |k| / sqrt(D) ~= dominance
    q = q + dominance * picked.sum(-2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def exact(q, k, v, causal: bool):
    """Exact attention in fp32 through SDPA (memory-light at long lengths)."""
    from methods.dense import Dense

    ref = Dense(impl="sdpa", num_heads=q.shape[1], head_dim=q.shape[-1], num_kv_heads=k.shape[1])
    return ref(q.float(), k.float(), v.float(), causal=causal)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double(), ref.double()
    rel = (out - ref).norm() / ref.norm().clamp_min(1e-30)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()
    return {"rel_err": float(rel), "cos": float(cos)}


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the correctness gate's measure)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@torch.no_grad()
def evaluate(method, task_cfg, B, H, Hkv, T, D, device, dtype, seed, causal) -> dict:
    """Fidelity metrics of ``method`` at min(T, task.max_len) tokens."""
    n = min(T, int(task_cfg.get("max_len", T)))
    metrics = {"fidelity_len": n}
    for kind in ("random", "structured"):
        if kind == "random":
            q, k, v = random_qkv(B, H, Hkv, n, D, device, dtype, seed)
        else:
            q, k, v = structured_qkv(B, H, Hkv, n, D, device, dtype, seed, causal,
                                     int(task_cfg.num_dominant), float(task_cfg.dominance))
        e = errors(method(q, k, v, causal=causal), exact(q, k, v, causal))
        metrics[f"rel_err_{kind}"] = e["rel_err"]
        metrics[f"cos_{kind}"] = e["cos"]
    return metrics


class Fidelity(Task):
    """The fidelity task (conf/task/fidelity.yaml) for the kernel runner: the inputs it times
    and checks the method on, and the error metrics."""

    def inputs(self, shape, T: int, device, dtype, seed: int):
        """q, k, v ~ N(0, 1) of ``shape`` (B, H, Hkv, D) and length T: the input source."""
        B, H, Hkv, D = shape
        return random_qkv(B, H, Hkv, T, D, device, dtype, seed)

    def evaluate(self, method, shape, T: int, device, dtype, seed: int, causal: bool) -> dict:
        """Error metrics of ``method`` on random and structured inputs (``evaluate``)."""
        B, H, Hkv, D = shape
        return evaluate(method, self.cfg, B, H, Hkv, T, D, device, dtype, seed, causal)


    def evaluate_pretrained(self, model, method, seed: int) -> dict:
        """Fidelity on real attention (runner=pretrained): q/k/v captured from ``layers`` of the
        model (run with dense attention) on ``prose`` at ``seq_len`` tokens; the method's error
        against exact attention and its attention recall. Causal, except for methods that
        cannot attend causally (Linformer, Nystromformer: non-causal, said in the record)."""
        from tasks import real_text

        t = self.cfg
        captured = real_text.capture_prose(model, t.prose, int(t.seq_len), [int(i) for i in t.layers])
        return real_text.attention_fidelity(method, captured, causal=method.supports_causal)


__all__ = ["random_qkv", "structured_qkv", "exact", "errors", "max_rel_err", "evaluate", "Fidelity"]
