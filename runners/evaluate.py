"""runner=evaluate: a trained language model, with any method swapped in, on a generation
task (task=needle), one record per run with every cell of the grid.

The checkpoint (``runner.checkpoint``, a ``best.pt`` of the training runner) is loaded into
the model built with the configured method: training-free methods replace the attention of
a model trained with another one; parameters the new method has and the checkpoint lacks
keep their initialisation, and the record lists them. Without a checkpoint the model is
randomly initialised (for tests of the pipeline only; the record says so).
"""
from __future__ import annotations

import logging

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from runners import bench, records
from runners.context import (
    attention_method,
    autocast,
    base_record,
    method_cfg,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)


def build_model(cfg, device):
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    model = get_method(cfg.runner.model_class)(method_cfg(cfg), vocab_size=256, num_classes=256,
                                                max_len=int(cfg.runner.max_len), **kw).to(device).eval()
    info = {"checkpoint": cfg.runner.checkpoint}
    if cfg.runner.checkpoint:
        state = torch.load(cfg.runner.checkpoint, map_location=device, weights_only=False)
        if isinstance(state, dict) and "model" in state and "opt" in state:  # a training state
            state = state["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        # only the swapped-in method's own parameters may be new (e.g. a Performer's projection)
        lost = [k for k in missing if ".method." not in k]
        if lost or unexpected:
            raise ValueError(f"checkpoint {cfg.runner.checkpoint} does not fit the model "
                             f"(model={cfg.model.get('name')}): missing {lost[:5]}"
                             f"{'...' if len(lost) > 5 else ''}, unexpected {list(unexpected)[:5]}")
        info.update(missing_keys=list(missing), unexpected_keys=list(unexpected))
    else:
        info["note"] = "random initialisation (no checkpoint): a pipeline test, not a result"
    return model, info


def run(cfg: DictConfig) -> list[records.RunRecord]:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(int(cfg.runner.cpu_threads))
    rec = base_record(cfg, device, dtype, seq_len=max(int(x) for x in cfg.task.lengths), causal=True)
    if not cfg.runner.force and rec.run_id in records.done_ids(cfg.store):
        log.info("an ok record with run_id %s exists; skipped", rec.run_id)
        return []
    try:
        model, info = build_model(cfg, device)
        rec.details.update(info)
        rec.metrics.update(get_method(cfg.task.evaluator)(model, cfg, device, dtype))
        rec.details["decode_fallback"] = getattr(model, "decode_fallback", None)
        rec.real_kernel = bool(attention_method(model).real_kernel)
    except Exception as exc:  # noqa: BLE001 - recorded; a sweep goes on
        rec.status = "oom" if bench.is_oom(exc) else "error"
        rec.error = f"{type(exc).__name__}: {exc}"
        log.error("evaluation failed: %s", rec.error)
    records.append(cfg.store, rec)
    return [rec]


def _filler_and_tokenizer(cfg):
    """The filler text (the corpus' test documents) and the byte tokenizer of our LMs."""
    from tasks.needle import ByteTokenizer
    from tasks.perplexity import documents

    return "\n\n".join(documents(OmegaConf.create({"source": cfg.task.corpus}))["test"]), ByteTokenizer()


def needle(model, cfg, device, dtype) -> dict:
    """Every (length, depth) cell of the needle grid, ``task.samples`` prompts each."""
    from tasks import needle as nd

    t = cfg.task
    filler, tok = _filler_and_tokenizer(cfg)
    amp = autocast(device, dtype)
    cells, examples = [], []
    grid = [(int(L), float(d)) for L in t.lengths for d in t.depths]
    for i, (L, d) in enumerate(tqdm(grid, desc="needle", unit="cell")):
        hits = []
        for s in range(int(t.samples)):
            p = nd.make_prompt(tok, filler, L, d, seed=int(cfg.seed) * 1_000_003 + i * 1000 + s,
                               window=model.max_len - int(cfg.runner.max_new_tokens))
            with amp:
                out = model.generate(torch.tensor([p.ids], device=device), int(cfg.runner.max_new_tokens))
            hits.append(nd.score(tok, out[0].tolist(), p.answer))
            if s == 0:  # what the model answered, for reading the record
                examples.append({"length": L, "depth": d, "answer": p.answer,
                                 "generated": tok.decode(out[0].tolist())})
        cells.append({"length": L, "depth": d, "score": sum(hits) / len(hits)})
    return {"cells": cells, "accuracy": sum(c["score"] for c in cells) / len(cells), "examples": examples}


def ruler(model, cfg, device, dtype) -> dict:
    """Each task of the RULER-like suite at each length, ``task.samples`` prompts each."""
    from tasks import ruler as rl

    t = cfg.task
    filler, tok = _filler_and_tokenizer(cfg)
    amp = autocast(device, dtype)
    cells, examples = [], []
    grid = [(name, int(L)) for name in t.tasks for L in t.lengths]
    for i, (name, L) in enumerate(tqdm(grid, desc="ruler", unit="cell")):
        scores = []
        for s in range(int(t.samples)):
            smp = rl.make_sample(tok, filler, name, L, seed=int(cfg.seed) * 1_000_003 + i * 1000 + s,
                                 window=model.max_len - int(cfg.runner.max_new_tokens))
            with amp:
                out = model.generate(torch.tensor([smp.ids], device=device), int(cfg.runner.max_new_tokens))
            scores.append(rl.string_match_all(tok.decode(out[0].tolist()), smp.answers))
            if s == 0:  # the question's end and what the model answered, for reading the record
                examples.append({"task": name, "length": L, "answers": list(smp.answers),
                                 "prompt_end": tok.decode(smp.ids[-160:]), "generated": tok.decode(out[0].tolist())})
        cells.append({"task": name, "length": L, "score": sum(scores) / len(scores)})
    return {"cells": cells, "average": sum(c["score"] for c in cells) / len(cells), "examples": examples}
