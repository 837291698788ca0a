"""Which RULER families does dense SmolLM2-135M answer at a length? CPU, ``transformers``
``generate`` with its KV cache, greedy, 24 new tokens, on the prompts task=ruler builds for a
pretrained model (the essays as filler, the chat template, RULER's string match). It chose the
RULER families and lengths of scripts/kv_compression.py (results/kv_compression/ruler_probe.md).

    python scripts/ruler_dense_probe.py --length 4000 --tasks niah_single,niah_multikey --prompts 3
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

from models import pretrained
from tasks import real_text, ruler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, required=True, help="prompt tokens")
    ap.add_argument("--tasks", default=",".join(ruler.TASKS))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    saved, _ = pretrained.checkpoint("smollm2_135m")
    tok = transformers.AutoTokenizer.from_pretrained(saved)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    hay = real_text.essay_tokens(tok, 3 * args.length)
    enc, chat = real_text.Encoder(tok), real_text.chat_frame(tok)
    for name in args.tasks.split(","):
        score = 0.0
        for s in range(args.prompts):
            smp = ruler.make_sample(enc, hay, name, args.length, seed=s * 1000 + 7, chat=chat)
            t = time.time()
            with torch.no_grad():
                out = model.generate(torch.tensor([smp.ids]), max_new_tokens=24, do_sample=False)
            text = tok.decode(out[0, args.length:], skip_special_tokens=True)
            sc = ruler.string_match_all(text, smp.answers)
            score += sc
            print(f"{name} {args.length} prompt {s}: {sc:.2f} {smp.answers} {text[:80]!r} ({time.time() - t:.1f}s)",
                  flush=True)
        print(f"== {name} at {args.length}: {score / args.prompts:.2f}", flush=True)


if __name__ == "__main__":
    main()
