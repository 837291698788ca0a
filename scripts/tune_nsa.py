"""Time NSA's Triton kernels on the GPU under alternative launch settings.

    python scripts/tune_nsa.py [--seq-len 65536] [--out F.jsonl]

The paper's shape by default (B=1, 64 query heads, 4 KV heads (--heads, --kv-heads), D=128, selection blocks of 64, 16 of them,
compression blocks of 32 every 16 tokens), bf16, random inputs. Each kernel of
``methods.kernels.nsa_compressed`` / ``nsa_selected`` (the compressed attention, the selection-block importance,
the selection, the top-n) is timed (p50 of ``runners.bench.time_ms``) under every setting in ``LAUNCH``;
each setting's output is compared with the default's (max |difference|) so that a faster
setting that computes something else shows. The defaults are ``NSA_LAUNCH`` (methods/kernels/_common.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.kernels import nsa_compressed, nsa_selected  # noqa: E402
from methods.kernels._common import NSA_LAUNCH  # noqa: E402
from runners import bench, records  # noqa: E402

# compressed: (block_m, block_n, num_warps, num_stages); importance: (rows, block_n, warps,
# stages[, atomic]), rows = tokens x the group's heads; the selection: (order, segment, warps,
# stages), its tile is its block; topn: warps
LAUNCH = {  # earlier sweeps: kernels/tune_nsa_*.jsonl
    "compressed": [(128, 64, 8, 3), (64, 64, 4, 2), (256, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3)],
    "importance": [(256, 32, 8, 2), (256, 64, 8, 2), (256, 16, 8, 2), (128, 32, 8, 2), (128, 32, 4, 2),
                   (64, 64, 4, 2), (256, 32, 8, 3), (256, 32, 8, 3, 1), (256, 64, 8, 3, 1), (256, 32, 8, 2, 1),
                   (128, 32, 8, 2, 1), (128, 32, 4, 2, 1)],  # a fifth 1: the importance added atomically
    "selected": [(0, 0, 2, 2), (1, 256, 4, 2), (1, 256, 4, 1), (1, 512, 4, 2), (1, 256, 4, 2, 32), (1, 256, 2, 2, 32),
                 (1, 256, 8, 2, 128), (1, 512, 8, 2, 128), (1, 1024, 8, 2, 128)],
    # (0, -): per token; (1, segment, warps, stages, tile rows): by key block (kernels/tune_nsa_sel*_055320d:
    # per token 2 warps best, by block 4 warps and 2 stages, segments 128-512 alike)
    "topn": [1, 2, 4],  # warps (several rows a program measured slower: tune_nsa_f73bb5b.jsonl)
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--kernels", nargs="+", default=list(LAUNCH), choices=list(LAUNCH))
    ap.add_argument("--block-bytes", type=float, default=None,
                    help="GiB of partial outputs the selection by key block holds (nsa_selected.NSA_BLOCK_BYTES)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scripts/tune_nsa.py times CUDA kernels: no CUDA device here")
    if args.block_bytes:
        nsa_selected.NSA_BLOCK_BYTES = int(args.block_bytes * 2**30)
    T, H, Hkv, D, bs, n, cb, cs = args.seq_len, args.heads, args.kv_heads, 128, 64, 16, 32, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, T, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    nc = (T - cb) // cs + 1
    kc, vc = (torch.randn(1, Hkv, nc, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    _, lse = nsa_compressed.nsa_compressed_attention(q, kc, vc, cb, cs)
    imp = nsa_compressed.nsa_importance(q, kc, lse, bs, cb, cs, 0, T)
    sel = nsa_compressed.nsa_topn(imp, 0, bs, n)
    calls = {
        "compressed": lambda c: nsa_compressed.nsa_compressed_attention(q, kc, vc, cb, cs, launch=c)[0],
        "importance": lambda c: nsa_compressed.nsa_importance(q, kc, lse, bs, cb, cs, 0, T, launch=c),
        "selected": lambda c: nsa_selected.nsa_selected_attention(q, k, v, sel, bs, launch=c),
        "topn": lambda c: nsa_compressed.nsa_topn(imp, 0, bs, n, warps=c),
    }
    def keep(row):  # printed, and appended at once: a later failure loses nothing measured
        print(json.dumps(row), flush=True)
        if args.out:
            records.append(args.out, row)

    for name in args.kernels:
        default = NSA_LAUNCH[name]
        if name == "importance" and H == Hkv:
            default = NSA_LAUNCH["importance_mha"]
        if name == "selected" and H // Hkv <= nsa_selected.NSA_SMALL_GROUP:
            default = NSA_LAUNCH["selected_small"]
        ref = calls[name](default).float()
        for c in LAUNCH[name]:
            try:
                diff = float((calls[name](c).float() - ref).abs().max())
                t = bench.time_ms(lambda: calls[name](c), "cuda", 3, rep_ms=200)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(name, c, type(exc).__name__, str(exc)[:160], flush=True)
                continue
            keep(dict(T=T, H=H, Hkv=Hkv, kernel=name, launch=c, p50_ms=t["p50"], max_diff=diff,
                      default=c == default, block_bytes=nsa_selected.NSA_BLOCK_BYTES))
        del ref
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1),  # noqa: E731
                                                                     v.repeat_interleave(H // Hkv, 1), is_causal=True)
    keep(dict(T=T, H=H, Hkv=Hkv, kernel="cuDNN SDPA causal (same shape)", p50_ms=bench.time_ms(dense, "cuda", 3)["p50"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
