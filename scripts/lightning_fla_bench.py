"""Lightning Attention's causal tiled form against flash-linear-attention (fla) and cuDNN dense
attention, forward and forward+backward latency at 16k-64k tokens on one GPU (issue 26: within
1.2x of fla's chunked linear attention, or a statement of what limits it).

Rows, per length T (B=1, H heads of d, bf16 unless --dtype, causal):
  ours tiled (decay)     methods.lightning.tiled_causal with TransNormerLLM's decay (the
                         official slopes, methods.lightning.Lightning(decay=True).log_decay())
  ours tiled (no decay)  the same without decay (TransNormer)
  ours triton bv=..      methods.kernels.lightning.lightning_causal (decay / no decay): one
                         program per (head, block of bv value columns) walking the chunks in
                         order; its backward three such walks in one launch (dQ forward, dK
                         and dV from the end); a row per --block-v
  ours triton 2-pass bv  the same with two_pass=True (fla's chunked form): a sequential pass
                         stores the state before every chunk, a second computes all chunks at
                         once (backward: forward and reversed states, then dQ, dK, dV)
  fla simple_gla (decay) fla.ops.simple_gla.chunk_simple_gla with g_gamma = the same log decays,
                         scale 1: the same product, fla's chunked Triton kernel
  fla linear_attn        fla.ops.linear_attn.chunk_linear_attn(normalize=False), scale 1: the
                         no-decay product
  cudnn dense            torch SDPA restricted to the cuDNN backend (softmax attention)
No feature map and no norm in any row: each times the attention product alone, on the same
q, k, v (features taken as given). Modes: ``fwd`` times the forward alone (no gradient);
``fwd+bwd`` the forward and torch.autograd.grad of <out, dO> for q, k and v (one table each).
Before timing, ours and fla's outputs, and in fwd+bwd their gradients, are compared at T=2048
(relative error printed; ours tiled, autograd through the PyTorch tiling, is the reference).
fla absent or failing to import: its rows say "fla unavailable (why)" and the rest still runs;
a row or check that fails at run time prints its error and the others still run. fla's rows
take [B, T, H, d] views of the same tensors (the transposes, and fla's own copies to
contiguous, are in its time).

    python scripts/lightning_fla_bench.py [--lens 16384,32768,65536] [--heads 16] [--dim 128]
        [--modes fwd,fwd+bwd] [--out results/local/lightning_fla.md]
    TRITON_INTERPRET=1 python scripts/lightning_fla_bench.py --device cpu --dtype fp32 --lens 64,96 \
        --heads 2 --dim 16 --block 16 --reps 1 --out /tmp/lfb.md     (a smoke run of the script here)
fla (pure Python wheels, no build): pip install .whl_extra/*.whl  (fla-core, flash-linear-attention, einops)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from methods.lightning import Lightning, tiled_causal  # noqa: E402


def fla_ops():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # absent, or its import fails on this torch / triton
        return None, f"fla unavailable ({type(e).__name__}: {str(e)[:80]})"
    return (chunk_simple_gla, chunk_linear_attn), None


def ms(fn, reps: int, dev: str = "cuda") -> float:
    if dev == "cpu":  # the smoke run (--device cpu): one call, wall time
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def candidates(H: int, d: int, block: int, dev: str = "cuda", block_vs=(64,)):
    """name -> function of (q, k, v) in [B, H, T, d] (ours, SDPA) or None and a reason; a
    Triton row per value-column block in ``block_vs`` (the kernel's programs per head: d / bv)."""
    ld = Lightning(decay=True, num_heads=H, num_kv_heads=H, head_dim=d).log_decay().to(dev, torch.float32)
    ops, why = fla_ops()
    out = {
        "ours tiled (decay)": (lambda q, k, v: tiled_causal(q, k, v, block, ld), None),
        "ours tiled (no decay)": (lambda q, k, v: tiled_causal(q, k, v, block, None), None),
    }
    try:
        from methods.kernels import lightning as kern
        for two, bv in ((two, bv) for two in (False, True) for bv in block_vs):
            tag = f"ours triton {'2-pass ' if two else ''}bv={bv}"
            out[f"{tag} (decay)"] = (lambda q, k, v, bv=bv, two=two: kern.lightning_causal(
                q, k, v, ld, chunk=block, block_v=bv, two_pass=two), None)
            out[f"{tag} (no decay)"] = (lambda q, k, v, bv=bv, two=two: kern.lightning_causal(
                q, k, v, None, chunk=block, block_v=bv, two_pass=two), None)
    except ImportError as e:  # triton absent
        out["ours triton (decay)"] = out["ours triton (no decay)"] = (None, f"no Triton kernel ({e})")
    if ops is None:
        out["fla simple_gla (decay)"] = out["fla linear_attn"] = (None, why)
    else:
        simple_gla, linear_attn = ops
        out["fla simple_gla (decay)"] = (lambda q, k, v: simple_gla(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_gamma=ld,
            scale=1.0)[0].transpose(1, 2), None)
        out["fla linear_attn"] = (lambda q, k, v: linear_attn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=False)[0].transpose(1, 2),
            None)

    def cudnn(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out["cudnn dense"] = (cudnn, None)
    return out


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fwd_bwd(fn):
    """fn (q, k, v) -> out made into (q, k, v, do) -> the gradients of <out, do> for q, k, v."""
    def run(q, k, v, do):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves, do)
    return run


def rel_err(ref, got) -> float:
    ref, got = (torch.cat([x.float().flatten() for x in t]) for t in (ref, got))
    return float((ref - got).norm() / ref.norm())


def pairs(names):
    """(checks, ratios): each fla and Triton row checked against ours tiled of the same decay;
    each of ours timed against fla's row of the same decay."""
    fla = {"(decay)": "fla simple_gla (decay)", "(no decay)": "fla linear_attn"}
    tiled = {"(decay)": "ours tiled (decay)", "(no decay)": "ours tiled (no decay)"}
    checks = [(tiled[s], fla[s]) for s in fla]
    checks += [(tiled[n[n.index("("):]], n) for n in names if n.startswith("ours triton")]
    ratios = [(n, fla[n[n.index("("):]]) for n in names if n.startswith("ours ")]
    return checks, ratios


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="16384,32768,65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64, help="our tiling's block (the method's default)")
    ap.add_argument("--block-v", default="64,32", help="the kernel's value-column blocks, a Triton row each "
                    "(32: the kernel's default since session 14; 64 the one before; smaller: more programs per head)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (comma-separated)")
    ap.add_argument("--untimed", default="", help="comma-separated row-name prefixes checked but not timed "
                    "(e.g. 'ours tiled': the PyTorch tiling's fwd+bwd is ~100x the kernels' and takes minutes)")
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes: only these rows are timed "
                    "(the others say so), e.g. 'ours triton bv=32' and 'fla' in two runs, each in its own time")
    ap.add_argument("--no-checks", action="store_true", help="skip the agreement checks at 2k (their compiles "
                    "and autotuning come first otherwise)")
    ap.add_argument("--out", default="results/local/lightning_fla.md")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (TRITON_INTERPRET=1, "
                    "tiny --lens, --dtype fp32: the interpreter has no bf16), no meaningful times")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if not modes or set(modes) - {"fwd", "fwd+bwd"}:
        sys.exit(f"lightning_fla_bench: --modes takes fwd and/or fwd+bwd, got {a.modes!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("lightning_fla_bench: needs a CUDA GPU")
    H, d, dev, dt = a.heads, a.dim, a.device, DTYPES[a.dtype]
    cands = candidates(H, d, a.block, dev, [int(b) for b in a.block_v.split(",")])
    checks, ratios = pairs(list(cands))
    g = torch.Generator(device=dev).manual_seed(0)

    def qkv(T):  # features as a model would give them: SiLU, scaled so the decayed sums stay in range
        x = [torch.randn(1, H, T, d, device=dev, generator=g, dtype=dt) for _ in range(4)]
        return (torch.nn.functional.silu(x[0]) / d ** 0.5, torch.nn.functional.silu(x[1]) / d ** 0.5, x[2],
                x[3] / T ** 0.5)  # dO, scaled so the key gradients (sums over later queries) stay in range

    gpu = torch.cuda.get_device_name() if dev == "cuda" else dev
    lines = [f"# Lightning causal product vs fla and cuDNN dense ({gpu}, torch "
             f"{torch.__version__}, B=1, H={H}, d={d}, {a.dtype}, modes {', '.join(modes)})", ""]
    lens = [int(t) for t in a.lens.split(",")]
    for mode in modes:
        bwd = mode == "fwd+bwd"

        def call(fn, q, k, v, do, bwd=bwd):
            if bwd:
                return fwd_bwd(fn)(q, k, v, do)
            with torch.no_grad():
                return (fn(q, k, v),)

        lines += [f"## {mode}", ""]
        t_mode = time.perf_counter()
        q, k, v, do = qkv(min(2048, max(lens)))
        for ref, other in ([] if a.no_checks else checks):
            f_ref, f_o = cands[ref][0], cands[other][0]
            if f_o is None:
                lines.append(f"check {ref} vs {other}: skipped ({cands[other][1]})")
                continue
            t0 = time.perf_counter()
            try:
                err = rel_err(call(f_ref, q, k, v, do), call(f_o, q, k, v, do))
                what = "outputs" if not bwd else "dq, dk, dv"
                lines.append(f"check {ref} vs {other} at T={q.shape[2]} ({what}): rel err {err:.2e}")
            except Exception as e:  # noqa: BLE001 - a failing check says why, the rest still runs
                lines.append(f"check {ref} vs {other}: error: {type(e).__name__}: {str(e)[:100]}")
            # as it happens, with its wall time (compiles and autotuning included): a run cut short
            # still shows where its time went
            print(f"{lines[-1]} [{time.perf_counter() - t0:.1f} s]", flush=True)
        lines += ["", "| row | " + " | ".join(f"T={t} ms" for t in lens) + " |", "|---|" + "---|" * len(lens)]
        res = {}
        untimed = tuple(p.strip() for p in a.untimed.split(",") if p.strip())
        only = tuple(p.strip() for p in a.only.split(",") if p.strip())
        for name, (fn, why) in cands.items():
            cells = []
            for T in lens:
                if fn is None:
                    cells.append(why)
                    continue
                if untimed and name.startswith(untimed):
                    cells.append("not timed (--untimed)")
                    continue
                if only and not name.startswith(only):
                    cells.append("not timed (--only)")
                    continue
                try:
                    q, k, v, do = qkv(T)
                    t = ms(lambda: call(fn, q, k, v, do), a.reps, dev)
                    res[name, T] = t
                    cells.append(f"{t:.3f}")
                except torch.cuda.OutOfMemoryError:
                    cells.append("OOM")
                except Exception as e:  # noqa: BLE001 - a row that fails says why, the others still run
                    cells.append(f"error: {type(e).__name__}: {str(e)[:60]}")
                finally:
                    q = k = v = do = None
                    if dev == "cuda":
                        torch.cuda.empty_cache()
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            print(f"{lines[-1]} [{time.perf_counter() - t_mode:.0f} s into the mode]", flush=True)
        lines.append("")
        for ours, theirs in ratios:
            rs = [f"T={T}: {res[ours, T] / res[theirs, T]:.2f}x" for T in lens if (ours, T) in res and (theirs, T) in res]
            lines.append(f"{mode} {ours} / {theirs}: " + (", ".join(rs) if rs else "n/a")
                         + " (target <= 1.2x)")
        lines.append("")
        text = "\n".join(lines) + "\n"  # written after each mode: a later mode cut short keeps this one
        print(text, flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
