"""Adding a method is one module plus one YAML: a toy method written to a temporary directory
(its module on sys.path, its conf/method/<name>.yaml on Hydra's search path) runs through
``runners.run(cfg)`` and through the attnbench command, with no file of the project touched."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from methods import CONF_DIR
from runners import run
from runners.records import read
from tests.conftest import TINY

TOY = '''
"""Softmax attention at a temperature: softmax(temperature * q k^T / sqrt(D)) v."""
import torch

from methods.base import AttentionMethod, Cost, dense_flops, masked_attention


class ToyTemperature(AttentionMethod):
    def __init__(self, temperature: float = 1.0, **structural):
        super().__init__(**structural)
        self.temperature = temperature

    def attend(self, q, k, v, causal, key_padding_mask):
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if causal else None
        return masked_attention(q, k, v, mask, scale=self.temperature / q.shape[-1] ** 0.5)

    def cost(self, tq, tk, causal):
        flops = dense_flops(self.num_heads, self.head_dim, tq, tk, causal)
        return Cost(flops=flops, density=1.0, kv_bytes=4.0 * self.num_kv_heads * tk * self.head_dim)
'''

YAML = '''
# A toy: softmax attention at a temperature (1: exact attention).
_target_: toy_temperature.ToyTemperature
_partial_: true
impl: reference
temperature: 2.0
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The two files of a new method, outside the project; the module importable."""
    (tmp_path / "toy_temperature.py").write_text(textwrap.dedent(TOY))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy_temperature.yaml").write_text(textwrap.dedent(YAML))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _expected_rel_err(temperature, n=64, H=2, D=16):
    """The fidelity task's error of the toy, computed here: its inputs (random_qkv, seed 0) at
    this temperature against exact attention."""
    from tasks.fidelity import random_qkv

    q, k, v = (t.double() for t in random_qkv(1, H, H, n, D, "cpu", torch.float32, 0))
    def attn(scale):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    out, ref = attn(temperature / D ** 0.5), attn(1 / D ** 0.5)
    return float((out - ref).norm() / ref.norm())


def test_a_method_from_a_temporary_directory_runs_through_run_cfg(plugin, store):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *TINY, f"store={store}", f"hydra.searchpath=[file://{plugin}/conf]",
            "method=toy_temperature", "runner.seq_lens=[64]"])
    rec = run(cfg)[0]
    assert rec.status == "ok", rec.error
    assert rec.method == "toy_temperature" and rec.method_params["temperature"] == 2.0
    assert rec.metrics["rel_err_random"] == pytest.approx(_expected_rel_err(2.0), rel=1e-4)
    assert read(store)[0]["run_id"] == rec.run_id


def test_a_method_from_a_temporary_directory_runs_through_the_command(plugin, tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "runners.cli", *TINY, f"store={tmp_path}/r.jsonl",
                        f"hydra.run.dir={tmp_path}/h", f"hydra.searchpath=[file://{plugin}/conf]",
                        "method=toy_temperature", "method.temperature=1.0", "runner.seq_lens=[64]"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = read(tmp_path / "r.jsonl")
    assert rec["status"] == "ok" and rec["method"] == "toy_temperature"
    assert rec["metrics"]["rel_err_random"] < 1e-6, json.dumps(rec["metrics"])  # temperature 1: exact
