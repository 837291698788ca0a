"""Capture the q/k/v that attention layers of a ``models.hf`` model see, on real text (a
measuring tool of the tasks: it only marks modules, and imports nothing from models/).

    with capture(model, layers=[3, 15]) as qkv:
        model(input_ids=ids)
    q, k, v = qkv[3][0]        # [B, H, T, D], [B, Hkv, T, D], [B, Hkv, T, D]

The tensors are taken inside the attention function the adapter registers, so they are what a
method receives: RoPE applied, grouped-query K/V not repeated. One entry per forward call.
"""
from __future__ import annotations

from contextlib import contextmanager


def attention_layers(model) -> dict[int, object]:
    """The attention modules of a ``transformers`` model, by layer index."""
    found = {int(m.layer_idx): m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")}
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx")
    return dict(sorted(found.items()))


@contextmanager
def capture(model, layers):
    """Within the block, every forward appends (q, k, v) of each chosen layer to ``qkv[layer]``."""
    modules = attention_layers(model)
    missing = [i for i in layers if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} do not exist; the model has layers 0..{max(modules)}")
    qkv = {i: [] for i in layers}
    for i in layers:
        modules[i]._attnbench_capture = qkv[i]
    try:
        yield qkv
    finally:
        for i in layers:
            del modules[i]._attnbench_capture
