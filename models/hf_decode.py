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
papers make (Quest: its first two layers). Only full-attention layers run the method: a
sliding-window layer (Gemma 3's "sliding_attention", ``sliding_window``) keeps its window, as
the sliding-window method (windowed prefill, a rolling cache of its ``sliding_window`` last
keys at decode), and is left out of calibration. Methods that need offline statistics (Loki, Double
Sparsity: ``needs_calibration``) are calibrated first with ``calibrate(model, batches)`` (below):
the model runs each batch of calibration tokens with dense attention, and each layer's method
calibrates on its (q, k) pairs. Limits, each an error: one prompt length for the batch (no padding),
one token per step after the prefill, and no more tokens than the cache was built for.

Per layer (KV-cache presses, ``methods.press``): before its prefill each layer's path gets its
layer index and the model's layer count (``set_layer``: PyramidKV's budget by depth, a
random press's seed) and, where a ``Session`` is given the tokenizer's classes
(``token_classes``), the prompt's token ids (``set_tokens``: FastGen's special and
punctuation tokens). ``calibrate(model, ids, period)`` runs the model densely on calibration
text and hands each layer's q/k/v to its method's ``calibrate_layer`` (RazorAttention's
retrieval heads, Eigen Attention's basis), once per model.

    s = Session(model, tokens=L + n, classes=token_classes(tokenizer))
    logits = s.prefill(prompt_ids)          # compressed here, once (a press)
    logits = s.feed(question_ids)           # one decode step per token, on the compressed cache
    s.memory()                              # bytes held (measured from the tensors), CUDA allocator
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
        self.token_info = None  # (input ids [B, L], special ids, punctuation ids) for the prefill's press

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
        self.seen, self.path, self.kv, self.bytes_read, self.token_info = 0, None, None, [], None


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


def sliding_window(module, kwargs=None) -> int | None:
    """The window of a sliding-window layer (what the model hands its attention function, else
    ``config.layer_types``: Gemma 3's "sliding_attention" layers); None for a full-attention layer."""
    w = (kwargs or {}).get("sliding_window")
    if w is None:
        types = getattr(module.config, "layer_types", None)
        if types and types[module.layer_idx] == "sliding_attention":
            w = getattr(module.config, "sliding_window", None)
    return None if w is None else int(w)


def _dense_causal(query, key, value, window: int | None):
    """Dense causal attention (calibration's forward), within ``window`` keys on a sliding layer."""
    gqa = key.shape[1] != query.shape[1]
    if window is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=gqa)
    i = torch.arange(query.shape[2], device=query.device).view(-1, 1)
    j = torch.arange(key.shape[2], device=query.device).view(1, -1)
    mask = (j <= i) & (i - j < window)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=gqa)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D]; key, value [B, Hkv, T, D] (the new tokens) -> ([B, T, H, D], None)."""
    B, H, T, D = query.shape
    if scaling is not None and abs(scaling * D ** 0.5 - 1) > 1e-4:
        raise ValueError(f"attnbench methods use the scale 1/sqrt({D}); this model uses {scaling}")
    rope = getattr(module, "_attnbench_rope", None)  # this call's rotary cos, sin (``_keep_rope``)
    store = getattr(module, "_attnbench_calibration", None)
    if store is not None:  # calibrate(): dense causal attention, q/k/v kept for the layer's method
        store.append((query.detach(), key.detach(), value.detach()))
        module._attnbench_calibration_rope.append(rope)
        out = _dense_causal(query, key, value, sliding_window(module, kwargs))
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
        window = sliding_window(module, kwargs)
        if window is not None:  # a sliding-window layer (Gemma 3) keeps its window, whatever the method
            cfg = copy.deepcopy(_composed("sliding_window"))
            cfg["window"] = window
            m = methods.build(cfg, num_heads=H, head_dim=D, num_kv_heads=key.shape[1])
        elif module.layer_idx < getattr(module.config, "attnbench_dense_layers", 0):  # Quest's first layers
            m = methods.build(copy.deepcopy(_composed("dense")), num_heads=H, head_dim=D, num_kv_heads=key.shape[1])
        else:
            m = _method(module, H, D, key.shape[1])
        layer.path = decode_path(m.to(query.device))
        layer.path.step_record = "bytes"  # only the bytes, on device: no host synchronisation per step
        if hasattr(layer.path, "set_layer"):  # a press: its layer of the model's (PyramidKV's budget)
            layer.path.set_layer(module.layer_idx, module.config.num_hidden_layers)
        if hasattr(layer.path, "set_tokens") and layer.token_info is not None:  # FastGen's token classes
            layer.path.set_tokens(*layer.token_info)
        layer.kv = layer.path.new_cache(B, layer.tokens, key.dtype, key.device)
        layer.kv.layer_idx, layer.kv.shared = module.layer_idx, layer.shared
        if rope is not None and hasattr(layer.path, "set_rope"):  # Eigen Attention: its keys before the rotation
            layer.path.set_rope(*rope)
        out = layer.path.prefill(query, key, value, layer.kv)
    else:
        if T != 1:
            raise AttentionInputError(f"{NAME}: after the prefill a step takes one token, got {T}")
        if rope is not None and hasattr(layer.path, "set_rope"):
            layer.path.set_rope(*rope)
        out = layer.path.decode(query, key, value, layer.kv)
        layer.bytes_read.append(layer.path.last_step["bytes_read"])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _keep_rope(module, args, kwargs) -> None:
    """Forward pre-hook of an attention module: the rotary cos, sin it is given for this call's
    tokens (``position_embeddings``, applied before the attention function sees q and k), kept
    for a press that works on the keys before their rotation (Eigen Attention: ``set_rope``)."""
    module._attnbench_rope = kwargs.get("position_embeddings")


def load(path_or_name: str, method: str = "dense", dtype=None, dense_layers: int = 0, method_cfg=None,
         **method_kwargs):
    """``from_pretrained`` with attention through ``method``'s decode path (or ``method_cfg``'s,
    a composed method config); the first ``dense_layers`` layers prefill and decode densely
    (Quest keeps its first two dense)."""
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(path_or_name, attn_implementation=NAME, dtype=dtype)
    model.config.attnbench_method = method_cfg if method_cfg is not None else {"name": method, **method_kwargs}
    model.config.attnbench_dense_layers = int(dense_layers)
    for m in _attention_modules(model):
        m.register_forward_pre_hook(_keep_rope, with_kwargs=True)
    return model.eval()


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes its cache (``cache`` in transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "head_dim")]


def token_classes(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(special token ids, punctuation token ids) of ``tokenizer``'s vocabulary: its special
    tokens, and the tokens whose text (spaces stripped) is punctuation only (Unicode
    category P*), for FastGen's C_special and C_punct."""
    import unicodedata

    special = sorted({int(i) for i in tokenizer.all_special_ids})
    punct = []
    for i in range(len(tokenizer)):
        t = tokenizer.decode([i]).strip()
        if t and all(unicodedata.category(c).startswith("P") for c in t):
            punct.append(i)
    return torch.tensor(special, dtype=torch.long), torch.tensor(punct, dtype=torch.long)


@torch.no_grad()
def calibrate(model, input_ids, period: int | None = None) -> dict:
    """Run the calibration tokens through the model with dense attention and calibrate each
    layer's method on its own q [B, H, T, D], k, v [B, Hkv, T, D]: a press's
    ``calibrate_layer(q, k, v, period)`` (``period``: the repeat length of text made of P tokens
    repeated twice, RazorAttention's) on the first batch, a decode path that
    ``needs_calibration`` (Loki, Double Sparsity) ``calibrate([(q, k), ...])`` on every batch;
    then the presses' ``calibrate_model({layer: press})`` once, for a choice across layers.
    ``input_ids``: token ids [B, T] (unpadded), or a list of them. Layers kept dense
    (``dense_layers``) are left out. Returns what each calibrated layer's method reports (True
    for a decode path), by layer index."""
    batches = [input_ids] if torch.is_tensor(input_ids) else list(input_ids)
    mods = _attention_modules(model)
    if not mods:
        raise ValueError("calibrate: found no attention modules (with layer_idx) in the model")
    stores, ropes = {}, {}
    for m in mods:
        stores[m.layer_idx] = m._attnbench_calibration = []
        ropes[m.layer_idx] = m._attnbench_calibration_rope = []
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for m in mods:
            del m._attnbench_calibration, m._attnbench_calibration_rope
    out = {}
    for m in mods:
        if (m.layer_idx < getattr(m.config, "attnbench_dense_layers", 0) or not stores[m.layer_idx]
                or sliding_window(m) is not None):  # layers that do not run the method
            continue
        q, k, v = stores[m.layer_idx][0]
        meth = _method(m, q.shape[1], q.shape[3], k.shape[1]).to(q.device)
        if hasattr(meth, "set_layer"):
            meth.set_layer(m.layer_idx, m.config.num_hidden_layers)
        if hasattr(meth, "set_rope") and ropes[m.layer_idx][0] is not None:  # the rotation of these keys
            meth.set_rope(*ropes[m.layer_idx][0])
        if hasattr(meth, "calibrate_layer"):
            out[m.layer_idx] = meth.calibrate_layer(q, k, v, period)
        elif getattr(meth, "needs_calibration", False):
            meth.calibrate([(q, k) for q, k, _ in stores[m.layer_idx]])
            out[m.layer_idx] = True
    # then, once, a choice across the layers (RazorAttention's retrieval heads among all KV heads)
    layers = {m.layer_idx: m._attnbench_method for m in mods if isinstance(out.get(m.layer_idx), dict)
              and hasattr(getattr(m, "_attnbench_method", None), "calibrate_model")}
    if layers:
        out.update(next(iter(layers.values())).calibrate_model(layers))
    return out


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def check_method_layers(model) -> None:
    """Refuses, before any generation, a model in which no layer would run its method: every
    attention layer sliding-window (they keep their window whatever the method) or among the
    first ``dense_layers``; a dense method is let through (the model as it is)."""
    cfg = getattr(model.config, "attnbench_method", None)
    if cfg is None:
        return  # not loaded through hf_decode.load: attention() refuses it at the first call
    name = str(cfg.get("name") or cfg.get("_target_", "")) if isinstance(cfg, dict) else str(cfg)
    if name in ("dense", "methods.dense.Dense"):
        return
    attn = _attention_modules(model)
    dense = getattr(model.config, "attnbench_dense_layers", 0)
    sliding = [m.layer_idx for m in attn if sliding_window(m) is not None]
    if attn and all(m.layer_idx in sliding or m.layer_idx < dense for m in attn):
        raise AttentionInputError(
            f"{NAME}: no layer of this model would run the method {name!r}: of its {len(attn)} attention "
            f"layers {len(sliding)} are sliding-window (they keep their window) and the first {dense} "
            f"are dense; use a model with full-attention layers (or method=dense)")


class Session:
    """One generation over a ``ContractCache`` of ``tokens`` slots per layer: ``prefill`` the
    prompt (each layer's path stores it; a press compresses it there, once), then ``step`` /
    ``feed`` tokens one decode step each, reading each layer's (compressed) cache. Logits are
    those of the last position, [B, vocab]. ``classes`` (``token_classes``) hands the prompt's
    ids to presses that read token classes (FastGen). ``memory()``: bytes held by the caches'
    tensors, after the prefill and now; on CUDA the allocator's count beside them."""

    def __init__(self, model, tokens: int, classes: tuple | None = None):
        check_method_layers(model)
        self.model, self.tokens = model, int(tokens)
        self.cache = ContractCache(model, self.tokens)
        self.kw = cache_kwarg(model)
        self.classes = classes
        self.device = next(model.parameters()).device
        self.after_prefill: dict = {}
        if _cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.mem0 = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache.layers[0].kv is not None:
            raise AttentionInputError("Session: the prompt is prefilled once (feed later tokens)")
        if self.classes is not None:
            special, punct = (c.to(input_ids.device) for c in self.classes)
            for la in self.cache.layers:
                la.token_info = (input_ids, special, punct)
        logits = self._forward(input_ids)
        self.after_prefill = {"bytes_held": self.bytes_held()}
        if _cuda(self.device):
            torch.cuda.synchronize(self.device)
            self.after_prefill["allocated"] = torch.cuda.memory_allocated(self.device) - self.mem0
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One token [B, 1] (or [B]) through a decode step."""
        return self._forward(token.view(-1, 1))

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Tokens [B, n] one decode step each; the logits after each."""
        return [self.step(ids[:, j]) for j in range(ids.shape[1])]

    @torch.no_grad()
    def greedy(self, logits: torch.Tensor, max_new_tokens: int, stop=()) -> list[int]:
        """Greedy tokens (batch of one) from ``logits`` on, up to ``max_new_tokens`` or a token
        in ``stop`` (kept); each chosen token but the last is fed."""
        out = []
        for j in range(int(max_new_tokens)):
            t = int(logits[0].argmax())
            out.append(t)
            if t in stop or j == max_new_tokens - 1:
                break
            logits = self.step(torch.tensor([[t]], device=self.device))
        return out

    def bytes_held(self) -> int:
        """Bytes of the tensors every layer's cache owns (``KVCache.bytes_held``), summed."""
        return sum(la.kv.bytes_held() for la in self.cache.layers if la.kv is not None)

    def dense_bytes(self) -> int:
        """Bytes a dense cache of this session's size holds: K and V of every token, every layer."""
        cfg, la = self.model.config, self.cache.layers[0]
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(2 * la.kv.batch * cfg.num_key_value_heads * self.tokens * D * la.kv.k.element_size()
                   * len(self.cache.layers))

    def memory(self) -> dict:
        """Measured bytes: held after the prefill (compressed) and now; dense's for the same tokens;
        on CUDA the allocator's bytes after the prefill and its peak, both over the session's start."""
        out = {"kv_bytes_held_prefill": self.after_prefill.get("bytes_held"), "kv_bytes_held_end": self.bytes_held(),
               "kv_bytes_dense": self.dense_bytes()}
        if _cuda(self.device):
            out["kv_bytes_allocated_prefill"] = self.after_prefill.get("allocated")
            out["peak_bytes_allocated"] = torch.cuda.max_memory_allocated(self.device) - self.mem0
        return out

    def stats(self) -> list[dict]:
        return [{"path": type(la.path).__name__, "decode_fallback": la.path.decode_fallback,
                 "bytes_held": la.kv.bytes_held(),
                 "bytes_read_per_step": float(sum(la.bytes_read)) / max(1, len(la.bytes_read)),  # one sync
                 **(la.path.press_details() if hasattr(la.path, "press_details") else {})}
                for la in self.cache.layers]


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, new]
    logits: list  # [B, vocab] per generated token (the logits it was chosen from)
    stats: list  # per layer: path, fallback, bytes held, mean bytes read per step


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, forced: torch.Tensor | None = None,
             classes: tuple | None = None) -> Generated:
    """Greedy generation: the prompt through each layer's prefill, then one decode step per token.
    With ``forced`` [B, max_new_tokens] the model is fed those tokens instead of its own choices
    (teacher forcing: every method's logits on the same continuation); ``tokens`` are still its
    greedy choices. ``classes``: ``token_classes`` of the tokenizer, for FastGen."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if forced is not None and tuple(forced.shape) != (input_ids.shape[0], max_new_tokens):
        raise ValueError(f"generate: forced must be [B, max_new_tokens] = [{input_ids.shape[0]}, {max_new_tokens}], "
                         f"got {tuple(forced.shape)}")
    s = Session(model, input_ids.shape[1] + max_new_tokens, classes)
    last, toks, logits = s.prefill(input_ids), [], []
    for step in range(max_new_tokens):
        toks.append(last.argmax(-1, keepdim=True))
        logits.append(last)
        if step < max_new_tokens - 1:
            last = s.step(toks[-1] if forced is None else forced[:, step:step + 1])
    return Generated(torch.cat(toks, 1), logits, s.stats())


__all__ = ["ContractCache", "ContractLayer", "attention", "sliding_window", "check_method_layers", "register", "load", "generate", "cache_kwarg", "Generated",
           "Session", "calibrate", "token_classes", "NAME"]
