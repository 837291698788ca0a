"""Every method in conf/method/ through methods.load and through run(cfg)."""
import pytest
import torch

import methods
from methods.base import AttentionInputError, AttentionMethod
from runners import run
from runners.records import read
from tests.conftest import seeded_qkv


def _forward(m, causal, T=63):
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16, dtype=torch.float32)
    return m(q, k, v, causal=causal), q


def test_method_loads_and_follows_contract(method_name):
    m = methods.load(method_name, num_heads=4, head_dim=16, num_kv_heads=2, max_seq_len=256)
    assert isinstance(m, AttentionMethod)
    assert m.impls[0] == "reference" and m.impl in m.impls
    assert type(m).__module__ == f"methods.{method_name}", "method file must be named as its config"
    for causal in (False, True):
        supported = m.supports_causal if causal else m.supports_noncausal
        if not supported:
            with pytest.raises(AttentionInputError, match="causal"):
                _forward(m, causal)
            continue
        out, q = _forward(m, causal)
        assert out.shape == q.shape and torch.isfinite(out).all()
        c = m.cost(63, 63, causal)
        assert c.flops > 0 and c.density > 0 and c.kv_bytes > 0


def test_method_runs_through_runner(method_name, compose_cfg, store):
    """One length per method (a sweep over lengths is the runner's, tested with dense below)."""
    cfg = compose_cfg(f"method={method_name}", "runner.seq_lens=[96]", "runner.causal=" + (
        "true" if not methods.load(method_name).supports_noncausal else "false"))
    recs = run(cfg)
    assert [r.seq_len for r in recs] == [96]
    assert all(r.status == "ok" for r in recs), [r.error for r in recs]
    stored = read(store)
    assert len(stored) == 1
    r = stored[-1]
    assert r["method"] == method_name
    assert r["latency_ms"]["forward"]["p50"] > 0
    assert {"p20", "p50", "p80", "min", "median", "max"} <= set(r["latency_ms"]["forward"])
    assert 0 <= r["metrics"]["rel_err_random"] and -1 <= r["metrics"]["cos_random"] <= 1
    assert r["cost"]["flops"] > 0 and r["correctness"]["passed"]
    assert r["env"]["torch"] == torch.__version__


def test_unsupported_setting_writes_nothing(compose_cfg, store):
    assert run(compose_cfg("method=linformer", "runner.causal=true")) == []
    assert read(store) == []


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'.*dense"):
        methods.load("nope")


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ValueError, match="no hyperparameter 'windw'"):
        methods.load("dense", windw=3)


def test_bad_impl_is_named():
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        methods.load("dense", impl="cuda")


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((1, 4, 8, 16), (1, 4, 8, 32), (1, 4, 8, 32)), "head dim"),
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "must divide"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "differ in shape"),
        (((4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), r"\[B, H, T, D\]"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "num_heads=4"),
    ],
)
def test_bad_shapes_are_named(shapes, match):
    m = methods.load("dense", num_heads=4, head_dim=16)
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(AttentionInputError, match=match):
        m(q, k, v)


def test_bad_padding_mask_is_named():
    m = methods.load("dense", num_heads=2, head_dim=8)
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(AttentionInputError, match="key_padding_mask"):
        m(q, q, q, key_padding_mask=torch.ones(1, 8))


def test_nan_inputs_are_flagged_in_the_record_and_the_sweep_goes_on(compose_cfg, store, monkeypatch):
    from tasks import fidelity

    real = fidelity.random_qkv

    def poisoned(B, H, Hkv, T, D, device, dtype, seed):
        q, k, v = real(B, H, Hkv, T, D, device, dtype, seed)
        if T == 64:
            q[0, 0, 3, 1] = float("nan")
            v[0, 0, 5, 0] = float("inf")
        return q, k, v

    monkeypatch.setattr(fidelity, "random_qkv", poisoned)
    recs = run(compose_cfg())
    assert [r.status for r in recs] == ["error", "ok"]
    assert "q has 1 NaN/Inf" in recs[0].error and "v has 1 NaN/Inf" in recs[0].error
    assert [r["status"] for r in read(store)] == ["error", "ok"]


def test_bad_method_config_becomes_an_error_record(compose_cfg, store):
    recs = run(compose_cfg("method.backend=tpu", "runner.seq_lens=[64,128]"))
    assert [r.status for r in recs] == ["error", "error"] and "unknown backend 'tpu'" in recs[0].error
    assert [(r["seq_len"], r["status"]) for r in read(store)] == [(64, "error"), (128, "error")]
    assert recs[0].causal is not None, "the setting it failed in, so that its table shows it"


def test_failed_correctness_gate_skips_timing(compose_cfg, store, monkeypatch):
    from methods.dense import Dense

    real = Dense.attend

    def wrong(self, q, k, v, causal, kpm):
        out = real(self, q, k, v, causal, kpm)
        return out if self.impl == "reference" else out + 0.1

    monkeypatch.setattr(Dense, "attend", wrong)
    recs = run(compose_cfg())
    assert all(r.status == "failed_correctness" for r in recs)
    assert all(r.latency_ms == {} for r in recs)
    assert recs[0].correctness["max_rel_err"] > 0.01


def test_impl_shorthand_and_skip_done(compose_cfg, store):
    recs = run(compose_cfg("impl=reference"))
    assert [r.seq_len for r in recs] == [64, 96] and len(read(store)) == 2  # a sweep over lengths
    assert recs[0].impl == "reference" and recs[0].correctness["checked"] is False
    assert run(compose_cfg("impl=reference")) == []  # ok records exist: skipped
    assert len(run(compose_cfg("impl=reference", "runner.force=true"))) == 2


@pytest.mark.parametrize("group", ["model", "task", "runner"])
def test_every_config_names_its_class_in_a_module_named_as_the_config(group):
    """conf/<group>/<name>.yaml builds <package>.<name with / as .>.<Class>: what records call
    the run outside the attnbench app (runners.records.names), as methods' configs do."""
    import importlib

    from omegaconf import OmegaConf

    from methods import CONF_DIR

    files = sorted((CONF_DIR / group).rglob("*.yaml"))
    assert files
    for f in files:
        name = f.relative_to(CONF_DIR / group).with_suffix("").as_posix()
        target = OmegaConf.load(f)._target_
        module, cls = target.rsplit(".", 1)
        assert module.split(".", 1)[1] == name.replace("/", "."), (f, target)
        assert isinstance(getattr(importlib.import_module(module), cls), type), target
        assert "name" not in OmegaConf.load(f), f"{f}: the config group names it"


def test_records_name_the_configs_that_ran(compose_cfg):
    from runners.records import names

    cfg = compose_cfg("experiment=lra/listops-smoke", "method=performer", tiny=False)
    assert names(cfg) == {"method": "performer", "model": "lra_encoder", "task": "lra/listops",
                          "runner": "train"}
