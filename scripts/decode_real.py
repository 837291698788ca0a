"""Decode through each method's decode path in a real model: SmolLM2-135M-Instruct (the asset
cache's dequantized checkpoint), a prompt of Austen prose, and dense decode's greedy continuation
fed to every method (teacher forcing), so that each step's next-token distribution is compared
with dense decode's on the same context.

    python scripts/decode_real.py --prompt 1024 --steps 32

Per method: the share of steps whose greedy token equals dense's, the mean KL(dense || method) of
the next-token distribution, and per layer (mean over layers) the KV bytes held and read per step.
"""
from __future__ import annotations

import argparse

import torch

from models import hf_decode, pretrained
from tasks import corpora
from tasks.real_text import _tokens

METHODS = [("dense", {"impl": "reference"}), ("quest", {"token_budget": 256}),
           ("quest", {"token_budget": 256, "dense_layers": 2}),  # the paper's first two layers dense
           ("sparq", {}), ("streaming_llm", {"num_sink": 4, "window": 256, "impl": "reference"})]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = pretrained.load("smollm2_135m")  # makes sure the dequantized checkpoint exists
    saved = pretrained.model_file("smollm2_135m")[0].parent / "hf" / dense.asset["sha256"][:16]
    ids = _tokens(dense.tokenizer, corpora.prose("austen"), 2000, args.prompt).unsqueeze(0)
    del dense
    ref = None
    print("| method | greedy = dense | KL(dense || method) | bytes held / layer | bytes read / step / layer |")
    print("|:--|--:|--:|--:|--:|")
    for name, kw in METHODS:
        model = hf_decode.load(str(saved), name, **kw)
        g = hf_decode.generate(model, ids, args.steps, forced=None if ref is None else ref.tokens)
        if ref is None:
            ref = g
        lp = [torch.log_softmax(x.double(), -1) for x in g.logits]
        lq = [torch.log_softmax(x.double(), -1) for x in ref.logits]
        kl = sum(float((b.exp() * (b - a)).sum()) for a, b in zip(lp, lq)) / len(lp)
        agree = float((g.tokens == ref.tokens).double().mean())
        held = sum(s["bytes_held"] for s in g.stats) / len(g.stats)
        read = sum(s["bytes_read_per_step"] for s in g.stats) / len(g.stats)
        print(f"| {name} {kw} | {agree:.3f} | {kl:.4g} | {held:.0f} | {read:.0f} |", flush=True)


if __name__ == "__main__":
    main()
