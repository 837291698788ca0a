"""Star Attention over processes (methods.star_distributed) against an independent masked
softmax of the paper's pattern and against the one-process emulation (methods.star_attention):
2 and 3 gloo processes on the CPU, grouped KV heads, blocks dealt round-robin to the ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import methods
from methods.star_distributed import star_attention_distributed

B, H, HKV, T, D = 1, 4, 2, 40, 8
CASES = {  # name: (world, StarAttention kwargs)
    "two hosts, one block each": (2, dict(num_hosts=2, query_len=8)),
    "three ranks, seven blocks, anchor 4": (3, dict(num_hosts=3, block_size=5, anchor_size=4, query_len=5)),
    "no query": (2, dict(num_hosts=2, query_len=0)),
    # FlexAttention with its log-sum-exp (eager on the CPU) instead of the scores written out
    "flex path, three ranks": (3, dict(num_hosts=3, block_size=5, anchor_size=4, query_len=5, impl="flex")),
    "flex path, a rank without blocks": (4, dict(num_hosts=4, block_size=16, anchor_size=16, query_len=8,
                                                 impl="flex")),
}


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g),
            torch.randn(B, HKV, T, D, generator=g))


def _worker(rank, world, kw, store, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        m = methods.load("star_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, **{"impl": "reference", **kw})
        q, k, v = inputs()
        out = star_attention_distributed(m, q, k, v)
        torch.save(out, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def star_by_hand(q, k, v, C, bs, anchor):
    """Phase 1: a context token at p sees keys of its own block up to p and keys < anchor;
    phase 2 (p >= C): every key up to p. Written from the paper, not from the method."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for p in range(T):
        for j in range(p + 1):
            allowed[p, j] = p >= C or j >= (p // bs) * bs or j < anchor
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_compute_the_star_pattern(case, tmp_path):
    world, kw = CASES[case]
    mp.spawn(_worker, args=(world, kw, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"out.{r}") for r in range(world)]
    m = methods.load("star_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, **{"impl": "reference", **kw})
    q, k, v = inputs()
    want = star_by_hand(q, k, v, *m.split(T))
    for o in outs:  # every rank holds the whole output
        torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], m(q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_refuses_without_a_process_group():
    m = methods.load("star_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, impl="reference")
    with pytest.raises(RuntimeError, match="init_process_group"):
        star_attention_distributed(m, *inputs())


def test_bench_script_runs_on_two_gloo_processes_and_matches_the_emulation(tmp_path):
    """scripts/star_distributed_bench.py as the GPU call runs it (torch.distributed.run), on the
    CPU: one record per length, the distributed output equal to the one-process emulation."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "scripts/star_distributed_bench.py"), "--device", "cpu", "--lens", "96", "160",
           "--reps", "1", "--query-len", "8", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["T"], r["world"], r["backend"]) for r in rows] == [(96, 2, "gloo"), (160, 2, "gloo")]
    for r in rows:
        assert r["rel_err_vs_emulation"] < 1e-5
        assert r["distributed_ms"]["median"] > 0 and r["emulation_ms"] > 0 and r["dense_sdpa_ms"] > 0
    assert "| 96 | 2 |" in (tmp_path / "table.md").read_text()
    alone = subprocess.run([sys.executable, str(root / "scripts/star_distributed_bench.py")], capture_output=True,
                           text=True, timeout=60, cwd=root)
    assert alone.returncode != 0 and "torch.distributed.run" in alone.stderr
