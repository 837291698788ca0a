"""Train SeerAttention's AttnGate by self-distillation on a pretrained model (the model frozen).

    PYTHONPATH=. python scripts/train_seer_gate.py --device cuda --seq-len 4096 --windows 8 --steps 400
    PYTHONPATH=. python scripts/train_seer_gate.py --device cpu --seq-len 128 --windows 2 --steps 5 --layers 0

The recipe (Gao et al. 2024, Sec. 3.2; methods/seer_attention.py): the model runs dense
attention on windows of real prose (``--prose``, from ``--skip`` tokens on), and the q/k of each
layer are captured (tasks/capture.py: after RoPE, as a method receives them). The target of each
layer and window is the block-pooled dense attention map (``distill_target``: max-pooled over
block tiles, rows normalised); the gate of each layer (W_q, W_k; nothing else trains) learns it
by AdamW on KL(target || gate) (``distill_loss``), cycling over the training windows. The last
window is held out: its loss before and after training is reported per layer. Training starts
at token 50000 (``--skip``), past the prose windows the real-model tasks evaluate on.

The gates are saved with ``torch.save`` as {"meta": ..., "layers": {layer: state_dict}, "loss":
...} (tensors and plain values only: ``torch.load(weights_only=True)`` reads it) into the asset
cache (``~/.cache/attnbench/seer_gates/``, or ``--out``), never into the repository; use it with
``method=seer_attention method.gate=trained method.gate_path=<file>``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def capture_windows(model, source: str, seq_len: int, windows: int, skip: int, layers) -> dict:
    """{layer: [(q, k) per window]} of consecutive windows of ``seq_len`` tokens."""
    from tasks import corpora, real_text
    from tasks.capture import capture

    dev = next(model.parameters()).device
    ids = real_text._tokens(model.tokenizer, corpora.prose(source), skip, seq_len * windows).view(windows, seq_len)
    out = {i: [] for i in layers}
    for w in range(windows):
        with torch.no_grad(), capture(model, layers=list(layers)) as qkv:
            model(input_ids=ids[w:w + 1].to(dev), logits_to_keep=1)
        for i in layers:
            q, k, _ = qkv[i][0]
            out[i].append((q.float(), k.float()))
    return out


def train_layer(samples, args, num_heads, num_kv_heads, head_dim, device, seed) -> tuple[dict, dict]:
    """One layer's gate trained on its (q, k) windows (the last held out): (state_dict, losses)."""
    from methods.seer_attention import SeerAttention, distill_target

    torch.manual_seed(seed)
    gate = SeerAttention(block_size=args.block_size, hidden_size=args.hidden_size, gate="untrained",
                         num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, impl="reference").to(device)
    targets = [distill_target(q, k, args.block_size, causal=True) for q, k in samples]
    train = list(range(len(samples) - 1)) or [0]
    held = len(samples) - 1
    opt = torch.optim.AdamW(gate.parameters(), lr=args.lr, weight_decay=0.0)

    def held_loss():
        with torch.no_grad():
            return float(gate.distill_loss(*samples[held], target=targets[held]))

    before = held_loss()
    losses = []
    for step in range(args.steps):
        w = train[step % len(train)]
        loss = gate.distill_loss(*samples[w], target=targets[w])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {k: v.detach().cpu() for k, v in gate.state_dict().items()}
    return state, {"held_out_before": before, "held_out_after": held_loss(),
                   "train_first": losses[0] if losses else None, "train_last": losses[-1] if losses else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--prose", default="austen")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=8, help="windows of prose (the last is held out)")
    ap.add_argument("--skip", type=int, default=50000,
                    help="tokens skipped at the start: past the windows the real-model tasks read (from 2000 on)")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per layer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="gate file (default: the asset cache, seer_gates/)")
    args = ap.parse_args(argv)
    if args.windows < 2:
        ap.error("--windows must be at least 2 (the last one is held out)")

    from models import pretrained

    t0 = time.time()
    device = torch.device(args.device)
    model = pretrained.load(args.model, dtype=torch.float32).to(device)
    a = model.asset
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    captured = capture_windows(model, args.prose, args.seq_len, args.windows, args.skip, layers)
    del model
    gates, losses = {}, {}
    for i in layers:
        gates[i], losses[i] = train_layer(captured[i], args, a["num_heads"], a["num_kv_heads"], a["head_dim"],
                                          device, args.seed + i)
        print(f"layer {i:2d}: held-out KL {losses[i]['held_out_before']:.4f} -> {losses[i]['held_out_after']:.4f}",
              flush=True)
    meta = {"model": a["name"], "model_sha256": a["sha256"], "prose": args.prose, "seq_len": args.seq_len,
            "windows": args.windows, "skip": args.skip, "steps": args.steps, "lr": args.lr,
            "block_size": args.block_size, "hidden_size": args.hidden_size, "head_dim": a["head_dim"],
            "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"], "seed": args.seed,
            "q_pooling": "avg", "k_pooling": "maxminavg", "seconds": round(time.time() - t0, 1)}
    out = Path(args.out) if args.out else (pretrained.cache_dir() / "seer_gates" /
                                           f"{a['name']}_{a['sha256'][:12]}_b{args.block_size}_h{args.hidden_size}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save({"meta": meta, "layers": gates, "loss": losses}, tmp)
    tmp.rename(out)
    print(json.dumps({"gate_path": str(out), **meta,
                      "mean_held_out_before": sum(v["held_out_before"] for v in losses.values()) / len(losses),
                      "mean_held_out_after": sum(v["held_out_after"] for v in losses.values()) / len(losses)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
