"""Shared fixtures: compose the real Hydra configs with tiny overrides."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter (before triton.jit runs)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from methods import CONF_DIR, available  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
# Two threads on the 2-core CI machine; one per worker under pytest-xdist (`pytest -n 2`), so
# that the workers do not oversubscribe the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Small settings under which every method and runner finishes in seconds on a CPU.
TINY = [
    "device=cpu",
    "dtype=float32",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "runner.seq_lens=[64,96]",
    "runner.warmup=1",
    "runner.repeats=2",
    "runner.gate_len=32",
]


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "records.jsonl")


@pytest.fixture
def compose_cfg(store):
    """compose_cfg(*overrides) -> the composed config, writing to a temporary store."""

    def _compose(*overrides, tiny=True):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[*(TINY if tiny else []), f"store={store}", *overrides],
            )

    return _compose


@pytest.fixture(params=available())
def method_name(request):
    return request.param


# One method per family for the expensive end-to-end paths (a model trained by a runner: LM and
# LRA smoke runs). What is per method is tested for every method elsewhere: forward in both
# settings and the runner contract (test_contract.py), bad input (test_bad_input.py), training
# as a layer in every setting it supports (test_layers.py), exactness against an independent
# computation (each family's own test module).
FAMILIES = {
    "dense": "dense",
    "block-sparse mask (FlexAttention)": "bigbird",
    "learned sparse with Triton kernels (NSA)": "nsa",
    "top-k gather": "sparsek",
    "linear": "performer",
    "low-rank, not causal": "linformer",
    "routed": "routing_transformer",
    "decode-time KV selection": "quest",
    "sink + window decode": "streaming_llm",
    "press (KV compression)": "snapkv",
}
REPRESENTATIVES = sorted(set(FAMILIES.values()))


@pytest.fixture(params=REPRESENTATIVES)
def representative(request):
    return request.param


def seeded_qkv(B=2, H=4, Hkv=2, T=63, D=16, tk=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tk = T if tk is None else tk
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, tk, D, generator=g, dtype=dtype)
    return q, k, v
