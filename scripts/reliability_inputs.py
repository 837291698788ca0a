"""The bad-input table of the reliability report (issue 22, item 7): invalid input to the
attention methods, and what each did with it.

    python scripts/reliability_inputs.py        # prints the markdown table

``bad_input_rows()`` runs each case (small shapes, reference paths: seconds on a CPU) and returns
one dict per case: ``case`` (what was wrong, and on which method), ``expected`` (the exception
type the contract promises: AttentionInputError for inputs, checked before any compute, ValueError
for hyperparameters, checked when the method is built) and ``got`` (the exception type and message
raised, or "accepted" when nothing was raised: a gap). Budgets larger than the sequence (a window
of at least T, more blocks than there are) are legal and not listed: the methods attend to what
there is (methods/base.py, "Legal edge cases").
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import methods  # noqa: E402

SMALL = dict(num_heads=4, num_kv_heads=2, head_dim=8, max_seq_len=64)
INPUT, BUILD = "AttentionInputError", "ValueError"


@functools.lru_cache(maxsize=None)
def _composed(name: str):
    return methods.compose_method(name)  # Hydra's compose once per method


def _load(name: str, **kw):
    """methods.load without composing again: the config, the hyperparameters, the structure."""
    from omegaconf import OmegaConf

    kw = {**SMALL, "impl": "reference", **kw}
    structural = {n: kw.pop(n) for n in list(kw) if n in methods.STRUCTURAL}
    return methods.build(OmegaConf.merge(_composed(name), kw), **structural)


@functools.lru_cache(maxsize=None)
def _method(name: str):
    return _load(name)


def _qkv(B=2, T=16, tk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tk = T if tk is None else tk
    return (torch.randn(B, 4, T, 8, generator=g).to(dtype), torch.randn(B, 2, tk, 8, generator=g).to(dtype),
            torch.randn(B, 2, tk, 8, generator=g).to(dtype))


def _causal(name: str) -> bool:
    return not _method(name).supports_noncausal


def _call(name, q, k, v, **kw):
    kw.setdefault("causal", _causal(name))
    return lambda: _method(name)(q, k, v, **kw)


def _build(name, **kw):
    return lambda: _load(name, **kw)


def _poisoned(which: str, value: float):
    t = dict(zip("qkv", _qkv()))
    t[which][0, 1, 2, 3] = value
    return t["q"], t["k"], t["v"]


def _cases():
    q, k, v = _qkv()
    kpm = torch.ones(2, 16, dtype=torch.bool)
    three = (k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3])
    return [
        # dtypes
        ("integer (int64) q, k, v: dense", INPUT, _call("dense", q.long(), k.long(), v.long())),
        ("integer (int32) q, k, v: sliding_window", INPUT, _call("sliding_window", q.int(), k.int(), v.int())),
        ("integer q, k, v: performer", INPUT, _call("performer", q.long(), k.long(), v.long())),
        ("bool q, k, v: bigbird", INPUT, _call("bigbird", q > 0, k > 0, v > 0)),
        ("complex q, k, v: nystrom", INPUT, _call("nystrom", q.cfloat(), k.cfloat(), v.cfloat())),
        ("q float32, k and v float16: linformer", INPUT, _call("linformer", q, k.half(), v.half())),
        ("numpy q: dense", INPUT, _call("dense", q.numpy(), k, v)),
        # shapes and head layout
        ("q of 3 dims: nsa", INPUT, _call("nsa", q[0], k, v)),
        ("k and v of 5 dims: minference", INPUT, _call("minference", q, k[None], v[None])),
        ("batch of q (2) and k, v (1) differ: sparsek", INPUT, _call("sparsek", q, k[:1], v[:1])),
        ("length of k (16) and v (15) differ: sliding_window", INPUT, _call("sliding_window", q, k, v[:, :, :15])),
        ("head dim of q (8) and k, v (4) differ: bigbird", INPUT, _call("bigbird", q, k[..., :4], v[..., :4])),
        ("head dim 0: dense", INPUT, _call("dense", q[..., :0], k[..., :0], v[..., :0])),
        ("head dim 16, method built for 8: performer", INPUT,
         _call("performer", *(torch.cat([t, t], -1) for t in (q, k, v)))),
        ("query heads (4) not a multiple of KV heads (3): dense", INPUT, _call("dense", q, *three)),
        ("query heads (4) not a multiple of KV heads (3): nystrom", INPUT, _call("nystrom", q, *three)),
        ("query heads (2), method built for 4: nsa", INPUT, _call("nsa", q[:, :2], k, v)),
        ("causal, more queries (16) than keys (4): dense", INPUT,
         _call("dense", q, k[:, :, :4], v[:, :, :4], causal=True)),
        ("queries (8) and keys (16) of different lengths: nsa", INPUT, _call("nsa", q[:, :, :8], k, v)),
        ("5 query and 16 key landmarks (A not square): nystrom", INPUT, _call("nystrom", q[:, :, :5], k, v)),
        ("length 128 over max_seq_len 64: linformer", INPUT, _call("linformer", *_qkv(T=128))),
        # the causal flag
        ("causal=True, not a causal method: linformer", INPUT, _call("linformer", q, k, v, causal=True)),
        ("causal=False, causal-only method: nsa", INPUT, _call("nsa", q, k, v, causal=False)),
        ("causal='yes' (not a bool): dense", INPUT, _call("dense", q, k, v, causal="yes")),
        # the padding mask
        ("key_padding_mask float: dense", INPUT, _call("dense", q, k, v, key_padding_mask=kpm.float())),
        ("key_padding_mask [B, Tk - 1]: nystrom", INPUT, _call("nystrom", q, k, v, key_padding_mask=kpm[:, :15])),
        ("key_padding_mask [B, 1, Tk]: performer", INPUT, _call("performer", q, k, v, key_padding_mask=kpm[:, None])),
        ("key_padding_mask of batch 1 for batch 2: bigbird", INPUT,
         _call("bigbird", q, k, v, key_padding_mask=kpm[:1])),
        ("key_padding_mask int64: nsa", INPUT, _call("nsa", q, k, v, key_padding_mask=kpm.long())),
        # values
        ("NaN in q: dense", INPUT, _call("dense", *_poisoned("q", math.nan))),
        ("Inf in k: sliding_window", INPUT, _call("sliding_window", *_poisoned("k", math.inf))),
        ("-Inf in v: bigbird", INPUT, _call("bigbird", *_poisoned("v", -math.inf))),
        ("NaN in v: nystrom", INPUT, _call("nystrom", *_poisoned("v", math.nan))),
        ("NaN in k: performer", INPUT, _call("performer", *_poisoned("k", math.nan))),
        ("Inf in q: nsa", INPUT, _call("nsa", *_poisoned("q", math.inf))),
        ("NaN in q: minference", INPUT, _call("minference", *_poisoned("q", math.nan))),
        ("NaN in k: sparsek", INPUT, _call("sparsek", *_poisoned("k", math.nan))),
        # budgets and hyperparameters, at build time
        ("window 0: sliding_window", BUILD, _build("sliding_window", window=0)),
        ("window -8: sliding_window", BUILD, _build("sliding_window", window=-8)),
        ("window 2.5 (not an integer): sliding_window", BUILD, _build("sliding_window", window=2.5)),
        ("block_size 0: bigbird", BUILD, _build("bigbird", block_size=0)),
        ("num_window_blocks 0: bigbird", BUILD, _build("bigbird", num_window_blocks=0)),
        ("num_random_blocks -1: bigbird", BUILD, _build("bigbird", num_random_blocks=-1)),
        ("num_landmarks 0: nystrom", BUILD, _build("nystrom", num_landmarks=0)),
        ("pinv_iters -1: nystrom", BUILD, _build("nystrom", pinv_iters=-1)),
        ("num_features 0: performer", BUILD, _build("performer", num_features=0)),
        ("chunk_size 0: performer", BUILD, _build("performer", chunk_size=0)),
        ("proj_len 0: linformer", BUILD, _build("linformer", proj_len=0)),
        ("window 0: nsa", BUILD, _build("nsa", window=0)),
        ("num_selected (top-n blocks) 0: nsa", BUILD, _build("nsa", num_selected=0)),
        ("compress_stride 32 over compress_block 16: nsa", BUILD, _build("nsa", compress_block=16, compress_stride=32)),
        ("k (top-k) 0: sparsek", BUILD, _build("sparsek", k=0)),
        ("window 0: sparsek", BUILD, _build("sparsek", window=0)),
        ("pattern 'diagonal' (unknown): minference", BUILD, _build("minference", pattern="diagonal")),
        ("window -1: minference", BUILD, _build("minference", window=-1)),
        ("slash_size 1.5 (not an integer): minference", BUILD, _build("minference", slash_size=1.5)),
        ("last_q 0: minference", BUILD, _build("minference", last_q=0)),
        ("query_chunk 0: sparsek", BUILD, _build("sparsek", query_chunk=0)),
        ("num_heads 0: dense", BUILD, _build("dense", num_heads=0)),
        ("head_dim 0: dense", BUILD, _build("dense", head_dim=0)),
        ("num_kv_heads 3 for num_heads 4: dense", BUILD, _build("dense", num_kv_heads=3)),
        ("backend 'tpu': dense", BUILD, _build("dense", impl="sdpa", backend="tpu")),
        ("impl 'cuda' (unknown): dense", BUILD, _build("dense", impl="cuda")),
    ]


def bad_input_rows() -> list[dict]:
    """Run every case: [{"case", "expected", "got"}], ``got`` being "accepted" or the exception's
    type and message."""
    rows = []
    for case, expected, run in _cases():
        try:
            run()
            got = "accepted"
        except Exception as exc:  # noqa: BLE001 - whatever it raised is the row's finding
            got = f"{type(exc).__name__}: {exc}"
        rows.append({"case": case, "expected": expected, "got": got})
    return rows


def markdown(rows: list[dict]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| case | expected | got |", "|---|---|---|"]
    lines += [f"| {esc(r['case'])} | {esc(r['expected'])} | {esc(r['got'])} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    rows = bad_input_rows()
    print(markdown(rows))
    accepted = sum(r["got"] == "accepted" for r in rows)
    print(f"\n{len(rows)} bad inputs, {accepted} accepted")
    sys.exit(1 if accepted else 0)
