"""Hugging Face adapter: any ``transformers`` causal LM with its attention routed through an
attnbench method, via ``transformers.AttentionInterface`` (no monkey-patching of forwards).

    from models import hf
    model = hf.load("path/or/hub-name", "minference", pattern="a_shape")
    model.generate(**inputs)

One method instance per attention layer is built on first use from the layer's shapes. The
mask Hugging Face passes is read as causal attention over the real (non-padded) keys; a
model whose masks say more than that (sliding-window layers, prefix-LM) is not supported.
Methods use the scale 1/sqrt(head_dim); a model with another attention scale is refused.
"""
from __future__ import annotations

import math

import torch

import methods

NAME = "attnbench"


def _key_padding(mask, B, S):
    """The real keys, from HF's 4-D mask (bool: True = attend; float: 0 = attend)."""
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed = allowed[..., -S:]  # [B, 1, T, S]
    kpm = allowed[:, 0].any(dim=1)  # a key any query may see is a real key
    return None if bool(kpm.all()) else kpm.expand(B, S)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D]; key, value [B, Hkv, S, D] -> ([B, T, H, D], None)."""
    B, H, T, D = query.shape
    if scaling is not None and not math.isclose(scaling, D ** -0.5, rel_tol=1e-4):
        raise ValueError(f"attnbench methods use the scale 1/sqrt({D}); this model uses {scaling}")
    m = getattr(module, "_attnbench_method", None)
    if m is None:
        cfg = module.config.attnbench_method
        if isinstance(cfg, dict) and "name" in cfg:  # a method name and hyperparameters
            spec = dict(cfg)
            cfg = methods.compose_method(spec.pop("name"))
            for k, v in spec.items():
                cfg[k] = v
        m = methods.build(cfg, num_heads=H, head_dim=D, num_kv_heads=key.shape[1],
                          max_seq_len=getattr(module.config, "max_position_embeddings", None))
        if hasattr(m, "bind_layer"):  # per-layer weights trained for this model (SeerAttention's gate)
            m.bind_layer(int(module.layer_idx))
        module._attnbench_method = m.to(query.device)
    store = getattr(module, "_attnbench_capture", None)
    if store is not None:  # tasks.capture: q/k/v as the method sees them (after RoPE, GQA layout)
        store.append((query.detach(), key.detach(), value.detach()))
    out = m(query, key, value, causal=True, key_padding_mask=_key_padding(attention_mask, B, key.shape[2]))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks: True = attend


def load(path_or_name: str, method: str = "dense", dtype=None, method_cfg=None, **method_kwargs):
    """``from_pretrained(path_or_name)`` with attention through ``method`` (hyperparameters as
    keyword arguments), or through ``method_cfg``, a composed method config, when given."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(path_or_name, attn_implementation=NAME, dtype=dtype)
    model.config.attnbench_method = method_cfg if method_cfg is not None else {"name": method, **method_kwargs}
    return model.eval()
