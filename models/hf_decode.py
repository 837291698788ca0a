"""Generation with a ``transformers`` causal LM whose attention decodes through a method's decode
path (``methods.decode``): the contract's ``KVCache`` is the model's KV cache.

    from models import hf_decode
    model = hf_decode.load("path", "quest", token_budget=256)
    out = hf_decode.generate(model, input_ids, max_new_tokens=32)   # greedy
    out.stats   # per layer: decode path, fallback, bytes held, mean bytes read per step

``ContractCache`` is a ``transformers.Cache`` whose layers store nothing themselves: their
``update`` hands the new keys and values on, and the attention function (registered as
``attnbench_decode``) prefills the layer's decode path with the prompt (``path.prefill``) and
then takes one ``path.decode`` per generated token, over the ``KVCache`` it owns (built for
``tokens``: prompt plus new tokens). Methods without a decode path decode densely over it
(``decode_fallback``); ``dense_layers`` keeps the first layers dense, a model-level choice some
papers make (Quest: its first two layers). Methods that need offline statistics (Loki, Double
Sparsity: ``needs_calibration``) are calibrated first with ``calibrate(model, batches)``: the
model runs each batch of calibration tokens with dense attention, and each layer's method
calibrates on its (q, k) pairs. Limits, each an error: one prompt length for the batch (no padding),
one token per step after the prefill, and no more tokens than the cache was built for.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch

import methods
from methods.base import AttentionInputError
from methods.decode import decode_path

NAME = "attnbench_decode"


def _cache_layer_base():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class ContractLayer(_cache_layer_base()):
    """One attention layer's slot in ``ContractCache``: the decode path and its ``KVCache``."""

    is_sliding = False
    is_croppable = False

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = int(tokens)
        self.seen = 0  # tokens handed on so far
        self.path = None
        self.kv = None  # the contract's KVCache, built at the prefill
        self.bytes_read: list[float] = []
        self.shared: dict = {}  # common to the layers of one ContractCache (KVCache.shared)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states  # the new tokens only: the attention function stores them

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.tokens

    def reset(self) -> None:
        self.seen, self.path, self.kv, self.bytes_read = 0, None, None, []


def ContractCache(model, tokens: int):  # noqa: N802 - a factory that reads as the class it builds
    """A ``transformers.Cache`` of ``ContractLayer``s for ``model``'s attention layers, each
    serving ``tokens`` tokens (prompt plus generated). The layers are attached to the model's
    attention modules (``_attnbench_decode_layer``) for the attention function to find."""
    from transformers.cache_utils import Cache

    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")
            and hasattr(m, "head_dim")]
    if not attn:
        raise ValueError("ContractCache: found no attention modules (with layer_idx) in the model")
    layers = [ContractLayer(tokens) for _ in range(max(m.layer_idx for m in attn) + 1)]
    shared: dict = {}  # what a layer's decode path leaves for the later layers (TidalDecode's selection)
    for la in layers:
        la.shared = shared
    for m in attn:
        m._attnbench_decode_layer = layers[m.layer_idx]
    return Cache(layers=layers)


@functools.lru_cache(maxsize=None)
def _composed(name: str):
    """A method's composed config, once per process (Hydra's compose costs about a second; a
    model asks for it once per layer). Callers change a copy."""
    return methods.compose_method(name)


def _method(module, H, D, Hkv):
    m = getattr(module, "_attnbench_method", None)
    if m is None:
        cfg = module.config.attnbench_method
        if isinstance(cfg, dict) and "name" in cfg:  # a method name and hyperparameters (else a composed config)
            spec = dict(cfg)
            cfg = copy.deepcopy(_composed(spec.pop("name")))
            for k, v in spec.items():
                cfg[k] = v
        m = methods.build(cfg, num_heads=H, head_dim=D, num_kv_heads=Hkv,
                          max_seq_len=getattr(module.config, "max_position_embeddings", None))
        module._attnbench_method = m
    return m


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D]; key, value [B, Hkv, T, D] (the new tokens) -> ([B, T, H, D], None)."""
    B, H, T, D = query.shape
    if scaling is not None and abs(scaling * D ** 0.5 - 1) > 1e-4:
        raise ValueError(f"attnbench methods use the scale 1/sqrt({D}); this model uses {scaling}")
    pairs = getattr(module, "_attnbench_calibration", None)
    if pairs is not None:  # hf_decode.calibrate: keep this layer's (q, k), attend densely
        pairs.append((query.detach(), key.detach()))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                               enable_gqa=key.shape[1] != H)
        return out.transpose(1, 2).contiguous(), None
    layer = getattr(module, "_attnbench_decode_layer", None)
    held = 0 if layer is None or layer.kv is None else layer.kv.seen
    if layer is None or layer.seen != held + T or key.shape[2] != T:  # its update handed on these tokens
        raise AttentionInputError(f"{NAME}: run the model with its ContractCache (hf_decode.generate does)")
    if layer.kv is None:  # the prefill
        if attention_mask is not None:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            if not bool(allowed[:, 0].any(dim=1).all()):
                raise AttentionInputError(f"{NAME}: padded prompts are not supported (one length per batch)")
        if module.layer_idx < getattr(module.config, "attnbench_dense_layers", 0):  # Quest's first layers
            m = methods.build(copy.deepcopy(_composed("dense")), num_heads=H, head_dim=D, num_kv_heads=key.shape[1])
        else:
            m = _method(module, H, D, key.shape[1])
        layer.path = decode_path(m.to(query.device))
        layer.kv = layer.path.new_cache(B, layer.tokens, key.dtype, key.device)
        layer.kv.layer_idx, layer.kv.shared = module.layer_idx, layer.shared
        out = layer.path.prefill(query, key, value, layer.kv)
    else:
        if T != 1:
            raise AttentionInputError(f"{NAME}: after the prefill a step takes one token, got {T}")
        out = layer.path.decode(query, key, value, layer.kv)
        layer.bytes_read.append(layer.path.last_step["bytes_read"])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def load(path_or_name: str, method: str = "dense", dtype=None, dense_layers: int = 0, **method_kwargs):
    """``from_pretrained`` with attention through ``method``'s decode path; the first
    ``dense_layers`` layers prefill and decode densely (Quest keeps its first two dense)."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(path_or_name, attn_implementation=NAME, dtype=dtype)
    model.config.attnbench_method = {"name": method, **method_kwargs}
    model.config.attnbench_dense_layers = int(dense_layers)
    return model.eval()


@torch.no_grad()
def calibrate(model, batches) -> int:
    """Calibrate each attention layer's method that needs it (``needs_calibration``) on the
    model's own (q, k) of ``batches`` (token ids [B, T] each, unpadded), computed with dense
    causal attention; the layers kept dense (``dense_layers``) are not calibrated. Returns the
    number of layers calibrated."""
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "head_dim")]
    for m in attn:
        m._attnbench_calibration = []
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        pairs = {id(m): m.__dict__.pop("_attnbench_calibration") for m in attn}
    done = 0
    for m in attn:
        if m.layer_idx < getattr(m.config, "attnbench_dense_layers", 0) or not pairs[id(m)]:
            continue
        q, k = pairs[id(m)][0]
        method = _method(m, q.shape[1], q.shape[3], k.shape[1]).to(q.device)
        if getattr(method, "needs_calibration", False):
            method.calibrate(pairs[id(m)])
            done += 1
    return done


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes its cache (``cache`` in transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, new]
    logits: list  # [B, vocab] per generated token (the logits it was chosen from)
    stats: list  # per layer: path, fallback, bytes held, mean bytes read per step


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, forced: torch.Tensor | None = None) -> Generated:
    """Greedy generation: the prompt through each layer's prefill, then one decode step per token.
    With ``forced`` [B, max_new_tokens] the model is fed those tokens instead of its own choices
    (teacher forcing: every method's logits on the same continuation); ``tokens`` are still its
    greedy choices."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if forced is not None and tuple(forced.shape) != (input_ids.shape[0], max_new_tokens):
        raise ValueError(f"generate: forced must be [B, max_new_tokens] = [{input_ids.shape[0]}, {max_new_tokens}], "
                         f"got {tuple(forced.shape)}")
    cache = ContractCache(model, input_ids.shape[1] + max_new_tokens)
    ids, toks, logits = input_ids, [], []
    for step in range(max_new_tokens):
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        last = out.logits[:, -1]
        toks.append(last.argmax(-1, keepdim=True))
        ids = toks[-1] if forced is None else forced[:, step:step + 1]
        logits.append(last)
    stats = [{"path": type(la.path).__name__, "decode_fallback": la.path.decode_fallback,
              "bytes_held": la.kv.bytes_held(),
              "bytes_read_per_step": sum(la.bytes_read) / max(1, len(la.bytes_read))}
             for la in cache.layers]
    return Generated(torch.cat(toks, 1), logits, stats)


__all__ = ["ContractCache", "ContractLayer", "attention", "register", "load", "generate", "calibrate", "cache_kwarg",
           "Generated", "NAME"]
