"""Which methods' forward pass is dense attention: the KV-cache presses (which act on a cache)
and the decode-time selectors (``methods.decode.DensePrefill``: their prefill is exact
attention). A one-pass task (training, MQAR, LRA) measures dense attention through them.

A module of its own, imported by no method: the run_id of a record covers the source of its
method's module and of what that imports from methods/ (``runners.records.code_hash``)."""
from __future__ import annotations

import importlib


def dense_forward(target: str) -> str:
    """Why the forward pass of the method class ``target`` (a config's ``_target_``, e.g.
    "methods.h2o.H2O") is dense attention, or "" where it is not."""
    from methods.decode import DensePrefill
    from methods.press import Press

    mod, _, name = str(target).rpartition(".")
    cls = getattr(importlib.import_module(mod), name, None)
    if not isinstance(cls, type):
        return ""
    if issubclass(cls, Press) and cls.attend is Press.attend:  # (Eigen Attention's own forward is not dense)
        return "dense: a KV-cache press (acts on a cache this pass does not keep)"
    if issubclass(cls, DensePrefill):
        return "dense: a decode-time selector (its prefill is exact attention)"
    return ""
