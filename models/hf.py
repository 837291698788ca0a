"""Hugging Face adapter: any ``transformers`` causal LM with its attention routed through an
attnbench method, via ``transformers.AttentionInterface`` (no monkey-patching of forwards).

    from models import hf
    model = hf.load("path/or/hub-name", "minference", pattern="a_shape")
    model.generate(**inputs)

One method instance per attention layer is built on first use from the layer's shapes. The
mask Hugging Face passes is read as causal attention over the real (non-padded) keys.
``layers`` (``routed_layers``) chooses the layers that run the method: all of them, or only
the full-attention ones of a model that mixes in sliding-window layers (Gemma 3); the other
layers keep the model's own attention (PyTorch SDPA with the model's mask, so their window).
A sliding-window layer routed through a method is refused: methods attend over all earlier
keys. Methods use the scale 1/sqrt(head_dim) and no logit soft-cap; a routed layer whose
model uses another scale (Gemma: query_pre_attn_scalar**-0.5) or a soft-cap is refused.
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
    store = getattr(module, "_attnbench_capture", None)
    if store is not None:  # tasks.capture: q/k/v as the method sees them (after RoPE, GQA layout)
        store.append((query.detach(), key.detach(), value.detach()))
    routed = getattr(module.config, "attnbench_layers", None)
    if routed is not None and module.layer_idx not in routed:  # the model's own attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    where = f"layer {getattr(module, 'layer_idx', '?')}"
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{where} is a sliding-window layer (window {kwargs['sliding_window']}); attnbench "
                         "methods attend over all earlier keys: route only the full-attention layers "
                         "(layers=full_attention)")
    if scaling is not None and not math.isclose(scaling, D ** -0.5, rel_tol=1e-4):
        raise ValueError(f"attnbench methods use the scale 1/sqrt({D}); {where} of this model uses {scaling}")
    softcap = kwargs.get("softcap")
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"attnbench methods have no attention logit soft-cap; {where} of this model caps "
                         f"its logits at {softcap}")
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
    out = m(query, key, value, causal=True, key_padding_mask=_key_padding(attention_mask, B, key.shape[2]))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks: True = attend


def routed_layers(config, layers="all") -> tuple[int, ...]:
    """The indices of the layers that run the method. ``layers``: ``all``; ``full_attention``
    (the layers ``config.layer_types`` marks so; every layer of a model without layer types);
    or a list of indices. A sliding-window layer among them is an error naming it."""
    n = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    if layers == "all":
        chosen = tuple(range(n))
    elif layers == "full_attention":
        chosen = tuple(i for i, t in enumerate(types) if t == "full_attention")
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'all', 'full_attention' or a list of layer indices, got {layers!r}")
    else:
        chosen = tuple(sorted({int(i) for i in layers}))
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ValueError(f"layers {bad} do not exist; the model has layers 0..{n - 1}")
    sliding = [i for i in chosen if types[i] != "full_attention"]
    if sliding:
        window = getattr(config, "sliding_window", None)
        raise ValueError(f"layers {sliding} are {types[sliding[0]]} layers (window {window}): a method attends "
                         "over all earlier keys and cannot replace them; route only the full-attention "
                         f"layers (layers=full_attention: {[i for i, t in enumerate(types) if t == 'full_attention']})")
    if not chosen:
        raise ValueError("no layer is routed through the method")
    return chosen


def load(path_or_name: str, method: str = "dense", dtype=None, method_cfg=None, layers="all", **method_kwargs):
    """``from_pretrained(path_or_name)`` with attention through ``method`` (hyperparameters as
    keyword arguments), or through ``method_cfg``, a composed method config, when given, in the
    ``layers`` that ``routed_layers`` chooses (the others keep the model's own attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    routed = routed_layers(AutoConfig.from_pretrained(path_or_name), layers)  # before any weights load
    register()
    model = AutoModelForCausalLM.from_pretrained(path_or_name, attn_implementation=NAME, dtype=dtype)
    model.config.attnbench_method = method_cfg if method_cfg is not None else {"name": method, **method_kwargs}
    model.config.attnbench_layers = None if layers == "all" else routed
    return model.eval()
