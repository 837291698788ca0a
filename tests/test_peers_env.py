"""scripts/peers.py records the runners' env (runners.records.environment: GPU name, driver,
clocks, CUDA, cuDNN, peer versions) on every row, plus fla's version; no GPU needed: the GPU's
properties and nvidia-smi's answer are stand-ins."""
import importlib.util
import json
import types
from pathlib import Path

import torch

from runners import records


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "peers.py"
    spec = importlib.util.spec_from_file_location("peers_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peer_rows_carry_the_runners_env(monkeypatch, tmp_path):
    peers = _script()
    clocks = {"gpu_driver": "555.42", "gpu_clocks": {"clocks.sm": "1980", "clocks.mem": "3201", "pstate": "P0"}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(name="Stand-in GPU",
                                                                                             uuid="GPU-1234"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(records, "gpu_clocks", lambda index=0: dict(clocks))

    def failing(T):  # a suite whose one kernel failed to build: an error row, nothing timed
        return [("kernel", RuntimeError("not run"), None)], {"heads": 2}

    monkeypatch.setattr(peers, "linear_rows", failing)
    monkeypatch.setattr(peers, "nsa_rows", failing)
    out = tmp_path / "peers.jsonl"
    assert peers.main(["--out", str(out), "--lens", "64", "--linear-lens", "32"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["suite"], r["seq_len"]) for r in rows] == [("linear", 32), ("nsa", 64)]
    want = records.environment("cuda")
    for r in rows:
        env = r["env"]
        assert env["gpu"] == "Stand-in GPU" and env["gpu_uuid"] == "GPU-1234"
        assert env["gpu_driver"] == "555.42" and env["gpu_clocks"] == clocks["gpu_clocks"]
        for key in ("cuda", "cudnn", "torch", "triton", "peers", "python", "host"):
            assert env[key] == want[key], key
        assert set(env["peers"]) == set(records.PEERS)
        assert env["fla"]  # its version, or why it did not import
        assert r["error"] == "RuntimeError: not run"


def test_peer_rows_carry_their_error_against_the_row_they_name(monkeypatch, tmp_path):
    """Each row that names a reference records ||out - ref|| / ||ref|| against that row's output
    (fla's [B, T, H, D] layout and (output, state) tuples read back to [B, H, T, D]); a row
    without one, or whose reference failed, records none."""
    peers = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(peers, "peer_env", lambda device: {})
    monkeypatch.setattr(peers, "_time", lambda fn: ({"p50": 1.0}, 0))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 2, 8, 4, generator=g)
    noise = torch.randn(1, 2, 8, 4, generator=g)

    def rows(T):
        return [("base", lambda: ref, None),
                ("close", lambda: ref + 0.01 * noise, "base"),
                ("fla layout", lambda: ((ref + 0.1 * noise).transpose(1, 2), None), "base"),
                ("broken", RuntimeError("no peer"), None),
                ("against broken", lambda: ref, "broken")], {"heads": 2}

    monkeypatch.setattr(peers, "linear_rows", rows)
    out = tmp_path / "peers.jsonl"
    assert peers.main(["--out", str(out), "--linear-lens", "8", "--suites", "linear"]) == 0
    got = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    for name, scale in (("close", 0.01), ("fla layout", 0.1)):
        want = float((scale * noise).norm() / ref.norm())
        assert abs(got[name]["rel_err"] - want) < 1e-6 and got[name]["rel_err_vs"] == "base"
    assert "rel_err" not in got["base"] and "rel_err" not in got["against broken"]
    assert got["broken"]["error"] == "RuntimeError: no peer"
    assert "| linear | close | 8 | 1.000 | " in peers.row_line(got["close"])
