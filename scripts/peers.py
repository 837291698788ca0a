"""Side-by-side timings against peer kernels (flash-linear-attention 0.6.0), on the GPU.

    python scripts/peers.py --out results/efficiency/peers.jsonl [--lens 16384 65536]

Two comparisons the GPU-performance issue asks for, forward, bf16, each row timed in this
run with runners.bench (triton.testing.do_bench, p20/p50/p80) after a warm-up:

linear   H=32, D=128, causal: fla ``chunk_linear_attn`` (q, k of width D), attnbench's
         Performer (impl=chunked and impl=triton, feature maps included) with m=128 features
         (the same state size D x D as fla) and its default m=256, the Triton kernels alone
         (features given; the fused kernel at three value-block sizes), fla's kernel on the
         Performer's features (PyTorch feature map + ``chunk_linear_attn``: the Performer run
         through fla, against which the fused Performer kernel compares), and SDPA (cuDNN).
nsa      the NSA paper's shape: 64 query heads, 4 KV heads, D=128, blocks of 64, 16 selected,
         window 512: attnbench NSA impl=triton (all three branches, index building included),
         fla ``parallel_nsa`` (compression + selection; its window branch needs flash_attn,
         which the image lacks) plus a 512-token window through attnbench's block-sparse
         kernel, and SDPA causal (cuDNN) with grouped-query attention.

Each row is one JSON line (name, shape, length, latency, peak memory, error); a markdown
table is printed at the end. fla missing or failing is recorded as an error row. Every row
carries the runners' ``env`` (``peer_env``: clocks, driver, CUDA, cuDNN, peer versions).
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from runners import bench  # noqa: E402

SDPA = "SDPA causal (cuDNN)"  # the linear suite's baseline: most rows' error is taken against its output


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| over the whole output (``tasks.fidelity.errors``): out in
    attnbench's layout [B, H, T, D] or fla's [B, T, H, D] (transposed back), or fla's (output,
    final state)."""
    from tasks.fidelity import errors

    out = out[0] if isinstance(out, tuple) else out
    return errors(out if out.shape == ref.shape else out.transpose(1, 2), ref)["rel_err"]


def _time(fn):
    with torch.no_grad():
        lat = bench.time_ms(fn, "cuda", warmup=3, rep_ms=100)
        mem, _ = bench.peak_memory_bytes(fn, "cuda")
    lat.pop("timer")
    return lat, mem


def linear_rows(T, H=32, D=128):
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    rows.append((SDPA, sdpa, None))
    for m, impl in itertools.product((128, 256), ("chunked", "triton")):
        perf = methods.load("performer", num_heads=H, head_dim=D, num_features=m, impl=impl, max_seq_len=T).cuda()
        rows.append((f"attnbench Performer m={m} ({impl})", lambda p=perf: p(q, k, v, causal=True), SDPA))
    # the kernel alone on given non-negative features (no feature map), and the fused kernel
    # with value blocks of 64 and 128 (the default)
    from methods.kernels.linear_attn import causal_linear_attention, performer_causal

    fq, fk = (x.abs() for x in (q, k))  # 128 "features" per token, as fla's D
    given = "attnbench causal_linear_attention (features given), M=128"
    rows.append((given, lambda: causal_linear_attention(fq, fk, v), None))
    for m, bv in itertools.product((128, 256), (32, 64, 128)):
        w = torch.randn(m, D, device="cuda", generator=g)
        rows.append((f"attnbench performer_causal (fused), M={m}, block_v={bv}",
                     lambda w=w, b=bv: performer_causal(q, k, v, w, block_v=b), SDPA))
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # fla: [B, T, H, D]
        kw = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}
        rows.append(("fla chunk_linear_attn", lambda: chunk_linear_attn(qt, kt, vt, normalize=True, **kw), SDPA))
        # the same product as our kernel on given features: fla on |q|, |k| (scale 1, normalised)
        fqt, fkt = (x.transpose(1, 2).contiguous() for x in (fq, fk))
        rows.append(("fla chunk_linear_attn (features given), M=128",
                     lambda: chunk_linear_attn(fqt, fkt, vt, scale=1.0, normalize=True, **kw), given))
        # the Performer on fla: the same feature map (attnbench's PyTorch phi, m=128), laid out
        # as fla takes it, then fla's chunked kernel with its normaliser (scale 1: phi carries it)
        perf = methods.load("performer", num_heads=H, head_dim=D, num_features=128, max_seq_len=T).cuda()

        def fla_performer(p=perf):
            fq, fk = (p.features(x, is_q).to(x.dtype).transpose(1, 2).contiguous()
                      for x, is_q in ((q, True), (k, False)))
            return chunk_linear_attn(fq, fk, vt, scale=1.0, normalize=True, **kw)

        rows.append(("fla chunk_linear_attn on Performer features (m=128, PyTorch feature map)", fla_performer,
                     "attnbench Performer m=128 (triton)"))
    except Exception as exc:  # noqa: BLE001 - a missing peer is a row saying so
        rows.append(("fla chunk_linear_attn", exc, None))
    return rows, dict(H=H, Hkv=H, D=D)


def nsa_rows(T, H=64, Hkv=4, D=128):
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    base = "SDPA causal (cuDNN), GQA"
    rows = [(base, lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), None)]
    nsa = methods.load("nsa", num_heads=H, num_kv_heads=Hkv, head_dim=D, impl="triton", max_seq_len=T).cuda().to(torch.bfloat16)
    rows.append(("attnbench NSA (triton, 3 branches)", lambda: nsa(q, k, v, causal=True), base))
    from methods.kernels import block_sparse as bsk

    w = torch.tensor([512])
    idx, cnt, nin = bsk.window_lists(T, 64, 64, True, (512,), (bsk.BIG,), (0,), "cuda")
    window = lambda: bsk.block_sparse_attention(q, k, v, idx, cnt, nin=nin, block_m=64, block_n=64,  # noqa: E731
                                                causal=True, win_l=w)
    rows.append(("attnbench window 512 (triton)", window, base))
    try:
        from fla.ops.nsa import parallel_nsa

        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, T, H, D]
        gates = [torch.rand(1, T, H, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        params = inspect.signature(parallel_nsa).parameters
        kw = dict(g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2], block_size=64, window_size=0)
        kw["block_counts" if "block_counts" in params else "S"] = 16
        if "head_first" in params:
            kw["head_first"] = False

        def fla_nsa():
            return parallel_nsa(qt, kt, vt, **kw)

        rows.append(("fla parallel_nsa (cmp + slc)", fla_nsa, base))
        rows.append(("fla parallel_nsa + attnbench window", lambda: (fla_nsa(), window()), None))  # two outputs
    except Exception as exc:  # noqa: BLE001
        rows.append(("fla parallel_nsa (cmp + slc)", exc, None))
    return rows, dict(H=H, Hkv=Hkv, D=D)


HEADER = "| suite | kernel | T | p50 ms | rel. error | against |\n|---|---|---|---|---|---|\n"


def row_line(rec: dict) -> str:
    """A record's table row: time, and the output's relative error against the row it names
    (SDPA for the approximations; the same product through another kernel for the rest)."""
    p50 = (rec.get("latency_ms") or {}).get("p50")
    err = rec.get("rel_err")
    return (f"| {rec['suite']} | {rec['name']} | {rec['seq_len']} | "
            + (f"{p50:.3f}" if p50 is not None else str(rec.get("error"))[:80])
            + f" | {f'{err:.2e}' if err is not None else '-'} | {rec.get('rel_err_vs') or '-'} |")


def peer_env(device) -> dict:
    """The runners' ``env`` (runners.records.environment: versions, CUDA, cuDNN, peers, GPU name,
    driver and clocks at the start) plus ``fla``: the imported flash-linear-attention's version,
    or why it did not import."""
    from runners.records import environment

    env = environment(device)
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except ImportError as exc:
        env["fla"] = f"missing: {exc}"
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/efficiency/peers.jsonl")
    ap.add_argument("--lens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--linear-lens", type=int, nargs="+", default=[16384, 65536, 131072])
    ap.add_argument("--suites", nargs="+", default=["linear", "nsa"], choices=["linear", "nsa"])
    ap.add_argument("--table", metavar="JSONL", help="only print the markdown table of these records "
                    "(the newest per kernel and length; no GPU needed)")
    args = ap.parse_args(argv)
    if args.table:
        from analysis.records import newest_peers

        newest = newest_peers(args.table)
        print(HEADER + "\n".join(row_line(r) for _, r in sorted(newest.items(), key=lambda kv: (kv[0][0], kv[0][2]))))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("scripts/peers.py times GPU kernels: no CUDA device here")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = peer_env("cuda")
    table = []
    for suite, lens, build in (("linear", args.linear_lens, linear_rows), ("nsa", args.lens, nsa_rows)):
        if suite not in args.suites:
            continue
        for T in lens:
            rows, shape = build(T)
            fns, outs = {name: fn for name, fn, _ in rows}, {}

            def output(name):  # a row's output, computed once (the reference of other rows)
                if name not in outs:
                    with torch.no_grad():
                        outs[name] = fns[name]()
                return outs[name]

            for name, fn, vs in rows:
                rec = dict(suite=suite, name=name, seq_len=T, **shape, env=env, error=None)
                if isinstance(fn, Exception):
                    rec["error"] = f"{type(fn).__name__}: {fn}"
                else:
                    try:
                        rec["latency_ms"], rec["peak_mem_bytes"] = _time(fn)
                        if vs is not None and not isinstance(fns.get(vs), Exception):
                            rec["rel_err"], rec["rel_err_vs"] = rel_err(output(name), output(vs)), vs
                    except Exception as exc:  # noqa: BLE001
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                table.append(row_line(rec))
                print(table[-1], flush=True)
            outs.clear()
            torch.cuda.empty_cache()
    print("\n" + HEADER + "\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
