"""Issue 28: the block-sparse method path takes its tiles from the tile table (keyed on head
dim, length bucket, dtype, causality, case), the tuning script writes that table, and an
efficiency record carries the configuration that ran and the versions it ran with."""
import json
import sys
from pathlib import Path

import pytest
import torch

import methods
from methods.base import masked_attention
from methods.kernels import block_sparse as bsk
from tests.conftest import seeded_qkv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tune_block_sparse import main as tune_main  # noqa: E402


def entry(T, case, bm, bn, causal=True, D=16, dtype="float32"):
    return dict(head_dim=D, seq_len=T, dtype=dtype, causal=causal, case=case, block_m=bm, block_n=bn,
                num_warps=4, num_stages=2, gpu="test")


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"entries": [entry(32, "dense", 32, 16), entry(128, "dense", 16, 32),
                                            entry(32, "window", 16, 16), entry(32, "dense", 64, 64, causal=False)]}))
    monkeypatch.setattr(bsk, "TILES_FILE", path)
    bsk.tile_table.cache_clear()
    yield path
    bsk.tile_table.cache_clear()


def test_tiles_for_picks_the_bucket_at_or_below_the_length(table):
    pick = lambda *a, **kw: (lambda t: (t["block_m"], t["block_n"]))(bsk.tiles_for(*a, **kw))  # noqa: E731
    assert pick(16, 64, torch.float32, True) == (32, 16)  # bucket 32 (128 is above 64)
    assert pick(16, 200, torch.float32, True) == (16, 32)  # bucket 128
    assert pick(16, 8, torch.float32, True) == (32, 16)  # below every bucket: the smallest
    assert pick(16, 64, torch.float32, True, window=8) == (16, 16)  # a window under a quarter: its own case
    assert pick(16, 64, torch.float32, True, window=48) == (32, 16)  # a wide window is the dense case
    assert pick(16, 64, torch.float32, False) == (64, 64)  # causality is part of the key
    default = (bsk.DEFAULT_TILES["block_m"], bsk.DEFAULT_TILES["block_n"])
    assert pick(32, 64, torch.float32, True) == default  # no entry of this head dim
    assert pick(16, 64, torch.float64, True) == default  # nor of this dtype
    assert pick(16, 64, torch.float32, True, grad=True) == default  # the backward keeps its tiles
    assert bsk.tiles_for(16, 64, torch.float32, True)["source"].startswith("tiles.json")


def test_the_committed_table_is_read_where_there_is_no_test_table():
    bsk.tile_table.cache_clear()
    rows = bsk.tile_table()
    assert rows, "methods/kernels/tiles.json has entries"
    for e in rows:
        assert {"head_dim", "seq_len", "dtype", "causal", "case", "block_m", "block_n", "num_warps",
                "num_stages"} <= set(e)


def test_sliding_window_runs_the_table_tiles_and_says_so(table):
    T, w = 72, 24  # window a third of the length: the dense case, bucket 32 -> 32 x 16 tiles
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=T, D=16, dtype=torch.float32)
    m = methods.load("sliding_window", num_heads=2, head_dim=16, window=w, impl="triton")
    with torch.no_grad():
        out = m(q, k, v, causal=True)
    i = torch.arange(T)
    d = i.view(T, 1) - i.view(1, T)
    ref = masked_attention(q, k, v, ((d >= 0) & (d < w)).view(1, 1, T, T))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    cfg = m.last_kernel_config
    assert m.last_path == "triton" and cfg["path"] == "triton"
    assert (cfg["block_m"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"]) == (32, 16, 4, 2)
    assert cfg["source"].startswith("tiles.json")


def test_flex_and_reference_paths_record_their_configuration():
    q, k, v = seeded_qkv(B=1, H=2, Hkv=2, T=40, D=8, dtype=torch.float32)
    m = methods.load("bigbird", num_heads=2, head_dim=8, block_size=8, impl="flex")
    with torch.no_grad():
        m(q, k, v, causal=True)
    assert m.last_kernel_config["path"] == "flex" and m.last_kernel_config["block_mask"] == "from_kv_blocks"
    assert m.last_kernel_config["compiled"] is False  # the CPU runs flex eagerly
    m.impl = "reference"
    with torch.no_grad():
        m(q, k, v, causal=True)
    assert m.last_kernel_config == {"path": "reference"}


def test_tuning_script_builds_the_table_from_measured_rows(tmp_path):
    rows = [dict(T=1024, case="causal", kernel="cuDNN SDPA", ms=1.0),
            dict(T=1024, case="causal", kernel="triton 64x64 w4 s3", ms=3.0),
            dict(T=1024, case="causal", kernel="triton 256x128 w8 s2", ms=2.0),
            dict(T=1024, case="causal", kernel="triton 128x128 w8 s2 lazy", ms=0.5),  # a variant: not a setting
            dict(T=1024, case="window512", kernel="triton 64x64 w4 s3", ms=0.2),
            dict(T=1024, case="window512", kernel="triton 256x128 w8 s2", ms=0.4),
            dict(T=1024, D=64, causal=False, case="full", kernel="triton 128x64 w4 s3", ms=1.5)]
    src, out = tmp_path / "rows.jsonl", tmp_path / "tiles.json"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.write_text(json.dumps({"entries": [entry(99, "dense", 16, 16, D=32)]}))  # another key: kept
    assert tune_main(["--from-jsonl", str(src), "--table", str(out)]) == 0
    got = {(e["head_dim"], e["causal"], e["case"]): (e["block_m"], e["block_n"], e["num_warps"], e["num_stages"])
           for e in json.loads(out.read_text())["entries"]}
    assert got == {(128, True, "dense"): (256, 128, 8, 2), (128, True, "window"): (64, 64, 4, 3),
                   (64, False, "dense"): (128, 64, 4, 3), (32, True, "dense"): (16, 16, 4, 2)}


def test_kernel_record_carries_versions_configuration_and_spread(compose_cfg):
    from runners import records, run

    (rec,) = run(compose_cfg("method=bigbird", "method.block_size=8", "method.impl=flex", "runner.seq_lens=[48]",
                             "runner.causal=true"))
    assert rec.status == "ok", rec.error
    env = rec.env
    for key in ("gpu", "gpu_driver", "gpu_clocks", "cuda", "cudnn", "torch", "triton"):
        assert key in env, key
    assert env["torch"] == torch.__version__ and env["triton"] == records.version("triton")
    assert set(env["peers"]) == set(records.PEERS)
    assert env["peers"]["flash-attn"] == records.version("flash-attn")
    fwd = rec.latency_ms["forward"]
    assert fwd["warmup"] == 1 and fwd["repeats"] == 2  # tests/conftest.py TINY
    assert fwd["min"] <= fwd["median"] <= fwd["max"]
    assert rec.details["kernel_config"]["path"] == "flex"
    assert rec.details["kernel_config"]["block_size"] == [128, 128]
    stored = records.read(rec.config["store"])[-1]
    assert stored["details"]["kernel_config"] == rec.details["kernel_config"] and stored["env"]["peers"] == env["peers"]


def test_gpu_timing_keeps_every_do_bench_time_and_counts_them(monkeypatch):
    import triton.testing

    from runners import bench

    times = [3.0, 1.0, 2.0, 5.0, 4.0]
    calls = []
    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, return_mode: calls.append((warmup, rep, return_mode)) or list(times))
    got = bench.time_ms(lambda: None, "cuda", warmup=2, rep_ms=50)
    assert calls == [(bench.GPU_WARMUP_MS, 50, "all")]
    assert (got["min"], got["median"], got["max"], got["p50"]) == (1.0, 3.0, 5.0, 3.0)
    assert got["p20"] == pytest.approx(1.8) and got["p80"] == pytest.approx(4.2)  # linear between order statistics
    assert got["repeats"] == 5 and got["warmup"] == 2 and got["rep_ms"] == 50 and got["timer"] == "triton.do_bench"


def test_tuning_script_measures_and_writes_the_table_in_one_call(tmp_path):
    """The GPU call's code path at toy sizes on the CPU (the Triton interpreter)."""
    out, table = tmp_path / "rows.jsonl", tmp_path / "tiles.json"
    assert tune_main(["--device", "cpu", "--dtype", "float32", "--heads", "1", "--lens", "48", "--head-dims", "16",
                      "--configs", "16,16,4,2", "32,16,4,2", "--cases", "causal", "full", "window512",
                      "--out", str(out), "--table", str(table)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {(r["case"], r["kernel"]) for r in rows}
    assert timed == {("causal", "cuDNN SDPA"), ("full", "cuDNN SDPA")} | {
        (c, f"triton {t} w4 s2") for c in ("causal", "full", "window512") for t in ("16x16", "32x16")}
    fastest = {}
    for r in rows:
        if r["kernel"].startswith("triton"):
            key = (r["causal"], "window" if r["case"] == "window512" else "dense")
            fastest[key] = min(fastest.get(key, (float("inf"), "")), (r["ms"], r["kernel"].split()[1]))
    got = {(e["causal"], e["case"]): f"{e['block_m']}x{e['block_n']}" for e in json.loads(table.read_text())["entries"]}
    assert got == {key: tile for key, (_, tile) in fastest.items()}
    assert all(e["head_dim"] == 16 and e["seq_len"] == 48 and e["dtype"] == "float32"
               for e in json.loads(table.read_text())["entries"])
    assert tune_main(["--device", "cpu", "--dtype", "float32", "--heads", "1", "--lens", "48", "--head-dims", "16",
                      "--configs", "16,16,4,2", "--budget-s", "0", "--out", str(tmp_path / "none.jsonl")]) == 0
    assert all(r["kernel"] == "cuDNN SDPA" for r in map(json.loads, (tmp_path / "none.jsonl").read_text().splitlines()))
