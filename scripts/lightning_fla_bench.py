"""Lightning Attention's causal tiled form against flash-linear-attention (fla) and cuDNN dense
attention, forward latency at 16k-64k tokens on one GPU (issue 26: within 1.2x of fla's chunked
linear attention, or a statement of what limits it).

Rows, per length T (B=1, H heads of d, bf16, causal):
  ours tiled (decay)     methods.lightning.tiled_causal with TransNormerLLM's decay (the
                         official slopes, methods.lightning.Lightning(decay=True).log_decay())
  ours tiled (no decay)  the same without decay (TransNormer)
  ours triton            methods.kernels.lightning.lightning_causal (decay / no decay): one
                         program per (head, value block) walking the chunks in order
  fla simple_gla (decay) fla.ops.simple_gla.chunk_simple_gla with g_gamma = the same log decays,
                         scale 1: the same product, fla's chunked Triton kernel
  fla linear_attn        fla.ops.linear_attn.chunk_linear_attn(normalize=False), scale 1: the
                         no-decay product
  cudnn dense            torch SDPA restricted to the cuDNN backend (softmax attention)
No feature map and no norm in any row: each times the attention product alone, on the same
q, k, v (features taken as given). Before timing, ours and fla's outputs are compared at T=2048
(relative error printed). fla absent or failing to import: its rows say "fla unavailable (why)" and the rest still runs.

    python scripts/lightning_fla_bench.py [--lens 16384,32768,65536] [--heads 16] [--dim 128]
        [--out results/local/lightning_fla.md]
fla (pure Python wheels, no build): pip install .whl_extra/*.whl  (fla-core, flash-linear-attention, einops)
"""
from __future__ import annotations

import argparse
import statistics
import sys
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


def ms(fn, reps: int) -> float:
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


def candidates(H: int, d: int, block: int):
    """name -> function of (q, k, v) in [B, H, T, d] (ours, SDPA) or None and a reason."""
    ld = Lightning(decay=True, num_heads=H, num_kv_heads=H, head_dim=d).log_decay()
    ops, why = fla_ops()
    out = {
        "ours tiled (decay)": (lambda q, k, v: tiled_causal(q, k, v, block, ld.to(q.device)), None),
        "ours tiled (no decay)": (lambda q, k, v: tiled_causal(q, k, v, block, None), None),
    }
    try:
        from methods.kernels import lightning as kern  # a Triton kernel, once there is one
        out["ours triton (decay)"] = (lambda q, k, v: kern.lightning_causal(q, k, v, ld.to(q.device)), None)
        out["ours triton (no decay)"] = (lambda q, k, v: kern.lightning_causal(q, k, v, None), None)
    except ImportError:
        out["ours triton (decay)"] = out["ours triton (no decay)"] = (
            None, "no Triton kernel for Lightning (methods/kernels/lightning.py absent)")
    if ops is None:
        out["fla simple_gla (decay)"] = out["fla linear_attn"] = (None, why)
    else:
        simple_gla, linear_attn = ops
        out["fla simple_gla (decay)"] = (lambda q, k, v: simple_gla(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g_gamma=ld.to(q.device, torch.float32),
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="16384,32768,65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=64, help="our tiling's block (the method's default)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="results/local/lightning_fla.md")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lightning_fla_bench: needs a CUDA GPU")
    H, d, dev = a.heads, a.dim, "cuda"
    cands = candidates(H, d, a.block)
    g = torch.Generator(device=dev).manual_seed(0)

    def qkv(T):  # features as a model would give them: SiLU, scaled so the decayed sums stay in range
        x = [torch.randn(1, H, T, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
        return torch.nn.functional.silu(x[0]) / d ** 0.5, torch.nn.functional.silu(x[1]) / d ** 0.5, x[2]

    lines = [f"# Lightning causal product vs fla and cuDNN dense ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, B=1, H={H}, d={d}, bf16, forward)", ""]
    q, k, v = qkv(2048)
    for ref, other in (("ours tiled (decay)", "fla simple_gla (decay)"), ("ours tiled (no decay)", "fla linear_attn"),
                       ("ours tiled (decay)", "ours triton (decay)")):
        f_ref, f_o = cands[ref][0], cands[other][0]
        if f_o is None:
            lines.append(f"check {ref} vs {other}: skipped ({cands[other][1]})")
            continue
        r, o = f_ref(q, k, v).float(), f_o(q, k, v).float()
        lines.append(f"check {ref} vs {other} at T=2048: rel err {float((r - o).norm() / r.norm()):.2e}")
    lens = [int(t) for t in a.lens.split(",")]
    lines += ["", "| row | " + " | ".join(f"T={t} ms" for t in lens) + " |", "|---|" + "---|" * len(lens)]
    res = {}
    for name, (fn, why) in cands.items():
        cells = []
        for T in lens:
            if fn is None:
                cells.append(why)
                continue
            q, k, v = qkv(T)
            try:
                t = ms(lambda: fn(q, k, v), a.reps)
                res[name, T] = t
                cells.append(f"{t:.3f}")
            except torch.cuda.OutOfMemoryError:
                cells.append("OOM")
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a row that fails says why, the others still run
                cells.append(f"error: {type(e).__name__}: {str(e)[:60]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for ours, theirs in (("ours tiled (decay)", "fla simple_gla (decay)"),
                         ("ours triton (decay)", "fla simple_gla (decay)"),
                         ("ours tiled (no decay)", "fla linear_attn"), ("ours triton (no decay)", "fla linear_attn")):
        ratios = [f"T={T}: {res[ours, T] / res[theirs, T]:.2f}x" for T in lens if (ours, T) in res and (theirs, T) in res]
        lines.append(f"{ours} / {theirs}: " + (", ".join(ratios) if ratios else "n/a") + " (target <= 1.2x)")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
