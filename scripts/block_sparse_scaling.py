"""Issue 28, target 1's two other parts: does the block-sparse kernel's time scale with its
density, and how fast is its backward against cuDNN's?

    python scripts/block_sparse_scaling.py [--lens 16384 65536] [--head-dims 64 128]
        [--densities 1.0 0.1] [--out results/efficiency/kernels/scaling_<commit>.jsonl]

Causal, B=1, H=32 (``--heads``), bf16, the tiles the method path uses (``block_sparse.tiles_for``:
the tile table for the forward, the default tiles under autograd). Layouts: every key tile at
or before the diagonal (density 1.0: the work of dense causal attention), or the diagonal tile
plus a random subset of the earlier ones (seeded, drawn per head and query tile) so that the
kept share of the causal tiles is the density asked for. Per row: the measured density (kept
pairs / causal pairs), forward p50 and useful TFLOP/s (4 * kept pairs * D per head over the
time), the output's relative error against SDPA at density 1.0 (the same attention; cuDNN's
error against an fp32 reference is printed beside it), ``scaled`` = time / (density x the
full-density time) (target: at most 1.3 at 10%), and with ``--backward`` the backward's time
(forward + backward minus forward, each timed on its own) against cuDNN's backward (target: at
least 0.7x cuDNN's speed at full density). ``--device cpu``: the Triton interpreter at toy
sizes (the test), no timing claims.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import masks  # noqa: E402
from methods.kernels import block_sparse as bsk  # noqa: E402
from runners import bench, records  # noqa: E402
from tasks.fidelity import errors  # noqa: E402


def causal_layout(nq: int, nk: int, block_m: int, block_n: int, density: float, heads: int, seed: int,
                  device) -> torch.Tensor:
    """[heads, nq, nk] bool: the key tiles holding a causal pair; below density 1 each query
    tile keeps its diagonal tiles and each earlier tile with the probability that makes the
    expected kept share of the causal tiles equal ``density``."""
    full = bsk.window_layout(nq * block_m, nk * block_n, block_m, block_n, True, torch.tensor([bsk.BIG]),
                             torch.tensor([bsk.BIG]), torch.tensor([0]), device)[0]  # [nq, nk]
    if density >= 1.0:
        return full.expand(heads, -1, -1).contiguous()
    qs = torch.arange(nq, device=device).view(-1, 1) * block_m
    ks = torch.arange(nk, device=device).view(1, -1) * block_n
    diag = full & (ks + block_n > qs)  # tiles that the diagonal crosses
    rest = full & ~diag
    want = density * float(full.sum()) - float(diag.sum())
    prob = max(0.0, min(1.0, want / max(1.0, float(rest.sum()))))
    g = torch.Generator(device="cpu").manual_seed(seed)
    draw = torch.rand(heads, nq, nk, generator=g).to(device) < prob
    return diag.expand(heads, -1, -1) | (rest & draw)


def kept_pairs(layout: torch.Tensor, T: int, block_m: int, block_n: int) -> float:
    """Causal query-key pairs inside the kept tiles, summed over heads."""
    nq, nk = layout.shape[-2:]
    qs = torch.arange(nq).view(-1, 1) * block_m
    ks = torch.arange(nk).view(1, -1) * block_n
    pairs = torch.zeros(nq, nk, dtype=torch.float64)
    for i in range(block_m):  # pairs of query row qs + i with the keys of tile ks .. ks + block_n - 1
        row = qs + i
        pairs += ((row + 1 - ks).clamp(0, block_n) * (row < T)).double()
    return float((layout.cpu().double() * pairs).sum())


def rel_err(out, ref) -> float:
    return errors(out, ref)["rel_err"]


def kernel(T: int, D: int, H: int, density: float, dtype, device, seed: int, grad: bool):
    """(the kernel call on q, k, v at the method path's tiles, its kept pairs, the tiles)."""
    tiles = bsk.tiles_for(D, T, dtype, causal=True, grad=grad)
    bm, bn = tiles["block_m"], tiles["block_n"]
    layout = causal_layout(-(-T // bm), -(-T // bn), bm, bn, density, H, seed, device)
    idx, cnt = bsk.layout_to_lists(layout.unsqueeze(0))

    def run(q, k, v):
        return bsk.block_sparse_attention(q, k, v, idx, cnt, block_m=bm, block_n=bn, causal=True,
                                          num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return run, kept_pairs(layout, T, bm, bn), tiles


def measure(T: int, D: int, H: int, density: float, dtype, device, backward: bool, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed + T + D)
    q, k, v = (torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    run, pairs, tiles = kernel(T, D, H, density, dtype, device, seed, grad=False)
    sdpa = lambda qq, kk, vv: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)  # noqa: E731
    row = dict(T=T, D=D, H=H, dtype=str(dtype).replace("torch.", ""), density_asked=density,
               density=pairs / (H * masks.causal_pairs(T, T)), tiles=tiles, device=str(device))
    timed = device.type == "cuda"
    with torch.no_grad():
        out = run(q, k, v)
        if density >= 1.0:
            ref = sdpa(q.double(), k.double(), v.double()) if not timed else \
                sdpa(q.float(), k.float(), v.float())
            row["rel_err_vs_exact"] = rel_err(out, ref)
            row["sdpa_rel_err_vs_exact"] = rel_err(sdpa(q, k, v), ref)
        if timed:
            row["fwd_ms"] = bench.time_ms(lambda: run(q, k, v), "cuda", warmup=3, rep_ms=100)["p50"]
            row["sdpa_fwd_ms"] = bench.time_ms(lambda: sdpa(q, k, v), "cuda", warmup=3, rep_ms=100)["p50"]
            row["tflops"] = 4.0 * pairs * D / (row["fwd_ms"] * 1e-3) / 1e12
    if backward:  # under autograd the method path takes the backward's tiles (block_sparse.tiles_for)
        run, _, row["tiles_backward"] = kernel(T, D, H, density, dtype, device, seed, grad=True)
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        go = torch.randn_like(q)
        out = run(*x)
        out.backward(go)
        if density >= 1.0:  # the gradients against SDPA's (the same attention)
            y = [t.clone().requires_grad_() for t in (q, k, v)]
            sdpa(*y).backward(go)
            row["grad_rel_err_vs_sdpa"] = max(rel_err(a.grad, b.grad) for a, b in zip(x, y))
        if timed:
            def step(fn):
                def f():
                    for t in x:
                        t.grad = None
                    fn(*x).backward(go)
                return f
            with torch.no_grad():  # the forward at the backward's tiles, to subtract
                fwd = bench.time_ms(lambda: run(q, k, v), "cuda", warmup=3, rep_ms=100)["p50"]
            row["fwd_bwd_ms"] = bench.time_ms(step(run), "cuda", warmup=3, rep_ms=100)["p50"]
            row["sdpa_fwd_bwd_ms"] = bench.time_ms(step(sdpa), "cuda", warmup=3, rep_ms=100)["p50"]
            row["bwd_ms"] = row["fwd_bwd_ms"] - fwd
            row["sdpa_bwd_ms"] = row["sdpa_fwd_bwd_ms"] - row["sdpa_fwd_ms"]
    return row


def table(rows: list[dict]) -> str:
    """The markdown table: each density's time beside the same shape's full-density time."""
    full = {(r["D"], r["T"]): r for r in rows if r["density_asked"] >= 1.0}
    out = ["| D | T | density | fwd ms | TFLOP/s | x cuDNN fwd | scaled (t / (d t_full)) | rel. err vs exact "
           "(cuDNN's) | bwd ms | x cuDNN bwd |", "|" + "---|" * 10]
    f = lambda x, p=".3f": "-" if x is None else format(x, p)  # noqa: E731
    for r in rows:
        base = full.get((r["D"], r["T"]))
        scaled = (r["fwd_ms"] / (r["density"] * base["fwd_ms"] / base["density"])
                  if base and r.get("fwd_ms") and base is not r else None)
        err = (f"{f(r.get('rel_err_vs_exact'), '.2e')} ({f(r.get('sdpa_rel_err_vs_exact'), '.2e')})"
               if "rel_err_vs_exact" in r else "-")
        x_fwd = r["sdpa_fwd_ms"] / r["fwd_ms"] if r.get("fwd_ms") else None
        x_bwd = r["sdpa_bwd_ms"] / r["bwd_ms"] if r.get("bwd_ms") else None
        out.append(f"| {r['D']} | {r['T']} | {r['density']:.3f} | {f(r.get('fwd_ms'))} | {f(r.get('tflops'), '.0f')} | "
                   f"{f(x_fwd, '.2f')} | {f(scaled, '.2f')} | {err} | {f(r.get('bwd_ms'))} | {f(x_bwd, '.2f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-backward", dest="backward", action="store_false")
    ap.add_argument("--out", default=None, help="append the rows (JSON lines) here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("block_sparse_scaling.py times GPU kernels: no CUDA device here (--device cpu: a check)")
    dtype = getattr(torch, args.dtype)
    env = records.environment(args.device) if device.type == "cuda" else {}
    rows = []
    for D in args.head_dims:
        for T in args.lens:
            for d in sorted(args.densities, reverse=True):  # full density first: the others' base
                r = measure(T, D, args.heads, d, dtype, device, args.backward)
                r["env"], r["git_commit"] = env, records.git_commit()
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "env"}), flush=True)
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
