"""Decode through each method's decode path in a real model: SmolLM2-135M-Instruct (the asset
cache's dequantized checkpoint). Every layer prefills the prompt with the method's own prefill
and generates through its decode path (``models.hf_decode``); a method without one decodes
densely, and the record says so (``phases``).

    python scripts/decode_real.py --prompt 1024 --steps 32 --needle-lengths 1024 --budget 256 --out results/decode/real_model

Two measurements per method:
  fidelity  a prompt of Austen prose; dense decode's greedy continuation is fed to every method
            (teacher forcing), so each step's next-token distribution is compared with dense
            decode's on the same context: the share of steps whose greedy token equals dense's,
            the mean KL(dense || method), and per layer (mean over layers) the KV bytes held and
            read per step
  needle    the needle prompts of the pretrained runner (``tasks.real_text.needle_prompt``: Paul
            Graham's essays, a seven-digit number at each depth, the chat template), the answer
            teacher-forced through the decode steps: a hit when the greedy prediction at each
            answer position repeats the answer and the next does not continue the number
            (``tasks.real_text.answered``); accuracy over lengths x depths x trials

With ``--out``: ``<out>.jsonl`` (one record per method: its hyperparameters, which phase ran
which method, the figures above) and ``<out>.md`` (the table printed).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from models import hf_decode, pretrained
from tasks import corpora, real_text
from tasks.real_text import _tokens


# (name, kwargs): decode paths of their own (Quest, SparQ, StreamingLLM, NSA, SparseK) and the
# sliding window's (sinks + window adapter). NSA and SparseK are trained with the model: their
# gates and scorer here are at initialisation (NSA: every gate 0.5), so they measure the decode
# path, not the trained method. The linear family is left out: its outputs are not softmax's.
# Every budget is ``--budget`` tokens (B): Quest's token budget, StreamingLLM's and the sliding
# window's window, NSA's selected blocks (B / 32 blocks of 32, plus a window of B / 2), SparseK's
# k + window (B / 2 each); SparQ keeps its default (1/8 of the cache).
def methods(b: int) -> list[tuple[str, dict]]:
    return [("dense", {"impl": "reference"}), ("quest", {"token_budget": b}),
            ("quest", {"token_budget": b, "dense_layers": 2}),  # the paper's first two layers dense
            # the official accuracy script's page choice (plain top pages, the page being written not kept)
            ("quest", {"token_budget": b, "dense_layers": 2, "keep_last_page": False}),
            ("sparq", {}), ("streaming_llm", {"num_sink": 4, "window": b, "impl": "reference"}),
            ("sliding_window", {"window": b, "impl": "reference"}),
            ("nsa", {"impl": "reference", "block_size": 32, "num_selected": max(1, b // 32), "window": b // 2}),
            ("sparsek", {"k": b // 2, "window": b // 2})]


def phases(name: str, kw: dict, stats: list) -> dict:
    """Which method ran each phase, from the layers' decode paths (``hf_decode.generate``'s stats)."""
    dense_layers = int(kw.get("dense_layers", 0))
    decode = sorted({s["path"] + (" (dense fallback: no decode path)" if s["decode_fallback"] == "dense" else "")
                     for s in stats[dense_layers:]})
    out = {"prefill": f"{name} (its own causal prefill)", "decode": ", ".join(decode)}
    if dense_layers:
        out["dense_layers"] = f"layers 0-{dense_layers - 1}: dense prefill and decode"
    return out


def needle_accuracy(model, tok, lengths, depths, trials: int, seed: int = 0) -> dict:
    """Needle accuracy through the decode path: each answer teacher-forced after the prompt."""
    hay = real_text.essay_tokens(tok, 3 * max(lengths))
    rng = random.Random(seed)
    hits = {}
    for n in lengths:
        for d in depths:
            for _ in range(trials):
                value = str(rng.randint(1_000_000, 9_999_999))
                prompt, answer = real_text.needle_prompt(tok, hay[rng.randrange(0, len(hay) - n):], n, d, value)
                dev = next(model.parameters()).device
                forced = torch.tensor([answer + answer[-1:]], device=dev)  # the last one is never fed
                g = hf_decode.generate(model, torch.tensor([prompt], device=dev), len(answer) + 1, forced=forced)
                hits.setdefault(f"{n}@{d:g}", []).append(real_text.answered(tok, g.tokens[0].tolist(), answer))
    flat = [h for v in hits.values() for h in v]
    return {"needle_accuracy": sum(flat) / len(flat), "needle_trials": len(flat),
            "needle_ci95": real_text.wilson(sum(flat), len(flat)),
            "needle_cells": {c: sum(v) / len(v) for c, v in hits.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=1024, help="fidelity prompt length (tokens)")
    ap.add_argument("--steps", type=int, default=32, help="fidelity decode steps")
    ap.add_argument("--needle-lengths", default="1024", help="needle prompt lengths, comma separated ('' = none)")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--trials", type=int, default=2, help="needle prompts per (length, depth)")
    ap.add_argument("--budget", type=int, default=256, help="tokens each sparse method reads (above)")
    ap.add_argument("--methods", default=None, help="only these method names, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="float32 (the CPU default) or bfloat16 (the CUDA default)")
    ap.add_argument("--out", default=None, help="write <out>.jsonl and <out>.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = pretrained.load("smollm2_135m")  # makes sure the dequantized checkpoint exists
    saved = pretrained.model_file("smollm2_135m")[0].parent / "hf" / dense.asset["sha256"][:16]
    tok = dense.tokenizer
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ids = _tokens(tok, corpora.prose("austen"), 2000, args.prompt).unsqueeze(0).to(device)
    del dense
    lengths = [int(x) for x in args.needle_lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",")]
    every = methods(args.budget)
    chosen = every if args.methods is None else [m for n in args.methods.split(",") for m in every if m[0] == n]
    if chosen[0][0] != "dense":
        chosen = [every[0], *chosen]  # dense decode is the reference
    ref, rows = None, []
    head = ("| method | prefill / decode | greedy = dense | KL(dense || method) | needle | bytes held / layer | "
            "bytes read / step / layer |")
    lines = [head, "|:--|:--|--:|--:|--:|--:|--:|"]
    print(head + "\n" + lines[1], flush=True)
    for name, kw in chosen:
        t0 = time.time()
        model = hf_decode.load(str(saved), name, dtype=dtype, **kw).to(device)
        g = hf_decode.generate(model, ids, args.steps, forced=None if ref is None else ref.tokens)
        if ref is None:
            ref = g
        lp = [torch.log_softmax(x.double(), -1) for x in g.logits]
        lq = [torch.log_softmax(x.double(), -1) for x in ref.logits]
        row = {"method": name, "kwargs": kw, "phases": phases(name, kw, g.stats), "model": "smollm2_135m",
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
               "prompt": args.prompt, "steps": args.steps,
               "greedy_agree": float((g.tokens == ref.tokens).double().mean()),
               "kl_dense_method": sum(float((b.exp() * (b - a)).sum()) for a, b in zip(lp, lq)) / len(lp),
               "bytes_held_per_layer": sum(s["bytes_held"] for s in g.stats) / len(g.stats),
               "bytes_read_per_step_per_layer": sum(s["bytes_read_per_step"] for s in g.stats) / len(g.stats)}
        if lengths:
            row.update(needle_accuracy(model, tok, lengths, depths, args.trials))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        label = name + (" " + ", ".join(f"{k}={v}" for k, v in kw.items()) if kw else "")
        needle = f"{row['needle_accuracy']:.2f} ({row['needle_trials']})" if lengths else "-"
        line = (f"| {label} | {row['phases']['prefill'].split(' ')[0]} / {row['phases']['decode']} | "
                f"{row['greedy_agree']:.3f} | {row['kl_dense_method']:.4g} | {needle} | "
                f"{row['bytes_held_per_layer']:.0f} | {row['bytes_read_per_step_per_layer']:.0f} |")
        lines.append(line)
        print(line, flush=True)
        if args.out:  # after each method: a long run that is stopped keeps what it measured
            write(args, lengths, depths, rows, lines)


def write(args, lengths, depths, rows, lines) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    device = rows[0]["device"] if rows else args.device
    note = (f"SmolLM2-135M-Instruct, {device}, {rows[0]['dtype'] if rows else ''}, budget {args.budget} tokens, fidelity prompt {args.prompt} tokens x "
            f"{args.steps} steps; needle lengths {lengths}, depths {depths}, {args.trials} trials each "
            f"(`python scripts/decode_real.py` with these options).")
    out.with_suffix(".md").write_text(note + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
