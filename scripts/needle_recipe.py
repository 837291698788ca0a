"""Does a small LM learn to answer needle questions? A quick CPU probe of the training recipe.

Trains a small DecoderLM (dense attention unless --method) on needle episodes only (tasks.perplexity's
``needle_episodes``: Shakespeare filler, ``--needles`` key-value needles, then each question
and its answer) and every 250 steps prints the held-out answer-digit accuracy under teacher
forcing, and the share of windows whose every answer digit is right. ``--w`` weighs the
answer bytes in the loss (task.answer_weight in the harness).

    python scripts/needle_recipe.py --T 256 --needles 1 --w 1    # 2026-11-29: 0.10 at 750 steps
    python scripts/needle_recipe.py --T 256 --needles 1 --w 10   # 1.00 at 750 steps

``--method NAME key=value ...`` trains the same model with another attention method (its
conf/method/NAME.yaml, overridden), e.g. ``--method nsa block_size=16 window=32``: which
trainable methods learn the lookup with the same recipe and budget, at CPU size.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models.lm import DecoderLM
from tasks.perplexity import answer_mask, documents, needle_episodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=256, help="training window (bytes)")
    ap.add_argument("--needles", type=int, default=1, help="needles per window")
    ap.add_argument("--w", type=float, default=1.0, help="loss weight of the answer bytes")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--episodes", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", nargs="+", default=["dense"], metavar="NAME [key=value ...]",
                    help="the attention method and overrides of its config")
    a = ap.parse_args()
    import yaml

    import methods

    mcfg = methods.compose_method(a.method[0])
    for kv in a.method[1:]:
        key, _, value = kv.partition("=")
        mcfg[key] = yaml.safe_load(value)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    text = "\n\n".join(documents(OmegaConf.create({"source": "shakespeare"}))["train"])[:3_000_000]
    X = needle_episodes(text, a.episodes, a.T + 1, seed=1, needles=a.needles)
    H = needle_episodes(text, 128, a.T + 1, seed=99, needles=a.needles)  # held out: other keys, values
    MX, MH = answer_mask(X), answer_mask(H)
    model = DecoderLM(mcfg, vocab_size=256, max_len=a.T, dim=a.dim,
                      depth=a.depth, heads=a.dim // 32, head_dim=32, mlp_dim=2 * a.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    for step in range(a.steps + 1):
        if step % 250 == 0:
            model.eval()
            with torch.no_grad():
                right = model(H[:, :-1].long()).argmax(-1) == H[:, 1:].long()
            model.train()
            tgt = MH[:, 1:]
            print(f"{' '.join(a.method)} step {step}: answer digits right {float((right & tgt).sum() / tgt.sum()):.3f}, "
                  f"windows all right {float((right | ~tgt).all(1).float().mean()):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step == a.steps:
            break
        idx = torch.randint(0, len(X), (a.bs,))
        x = X[idx].long()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        w = 1 + (a.w - 1) * MX[idx][:, 1:].flatten().float()
        loss = (loss * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
