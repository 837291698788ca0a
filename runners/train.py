"""runner=train: train a model with an attention method on a task, evaluate, record.

AdamW with linear warmup then linear (or cosine) decay; bf16 autocast on the GPU; evaluation
on the validation split every ``eval_every`` steps and the best model kept; the test split
evaluated with the best model at the end; a checkpoint every ``ckpt_every`` steps from which
an interrupted run resumes (model, optimiser, schedule, step, random states: the resumed run
follows the same path as an uninterrupted one); a progress bar; one record with the task's
metrics (tasks/: accuracy, perplexity), steps, tokens and wall time. Deterministic on the CPU
for a fixed seed.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from methods.dense_forward import dense_forward
from runners import records
from runners.device import autocast, resolve_device, resolve_dtype
from tasks.base import to_device

log = logging.getLogger(__name__)


def lr_at(step: int, r) -> float:
    warm, total = int(r.warmup_steps), int(r.steps)
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * frac)) if r.decay == "cosine" else max(0.0, 1 - frac)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The examples of a step: epoch permutations seeded by (seed, epoch), so any step's
    batch is known without replaying the ones before it (what resuming relies on)."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    return _epoch_perm(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    """One epoch's permutation, drawn once (not at every step of the epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _take(x, idx):
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]


def distributed(device) -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` the process group is started here (NCCL on
    GPUs, gloo on the CPU) and each rank takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


class NoBudget(Exception):
    """With ``runner.target_density``: the method has no budget knob (``methods.budget.KNOBS``),
    so no run at that density exists: status skipped, "not run: no budget knob (<why>)"."""

    not_run = "no budget knob"


def fit_budget(model, T: int, target: float, rec, seed: int) -> None:
    """Every attention method of ``model`` at the budget that reaches ``target`` density at ``T``
    tokens (causal as the model is): the knob fitted once (``methods.budget.fit_density``) on the
    first method through its reference path (which counts pairs; a FlexAttention path counts
    blocks of 128, which a short sequence fills) on seeded random inputs of its heads, then set
    in every one, each keeping its own path. The record carries the fit (``details.budget``) and
    the achieved density (``metrics.density_achieved``, ``metrics.target_density``). NoBudget
    where there is no knob."""
    import copy

    from methods import budget
    from methods.base import AttentionMethod

    def outermost(parent):  # the model's attention methods, not the parts inside one (SEA's Performer estimator)
        for name, child in parent.named_children():
            if isinstance(child, AttentionMethod):
                yield parent, name, child
            else:
                yield from outermost(child)

    slots = list(outermost(model))
    first = slots[0][2]
    if budget.knob(first) is None:
        raise NoBudget(f"{type(first).__name__} has no budget knob (methods.budget.KNOBS)")
    ref = copy.deepcopy(first).cpu()
    if "reference" in getattr(ref, "impls", ()):
        ref.impl = "reference"
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = ref.num_heads, ref.num_kv_heads, ref.head_dim
    q = torch.randn(1, H, T, D, generator=g)
    k, v = (torch.randn(1, Hkv, T, D, generator=g) for _ in range(2))
    fit = budget.fit_density(ref, q, k, v, bool(getattr(model, "causal", True)), target)
    for parent, name, child in slots:
        setattr(parent, name, budget.with_budget(child, fit.value))  # a copy of each: its own path kept
    rec.details["budget"] = fit.record()
    rec.metrics["target_density"], rec.metrics["density_achieved"] = float(target), float(fit.density)


class DenseForward(Exception):
    """With ``runner.skip_dense_forward``: the method's forward pass is dense attention
    (``methods.dense_forward``), so training it would train dense attention: the run records
    status skipped, "not run: forward is dense attention (<why>)"."""

    not_run = "forward is dense attention"


@dataclass
class TrainRunner:
    """conf/runner/train.yaml."""

    steps: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    betas: list[float]
    warmup_steps: int
    decay: str  # linear | cosine
    grad_clip: float
    eval_every: int
    eval_batches: int | None  # validation batches per evaluation (None: the whole split)
    ckpt_every: int
    checkpoint_dir: str
    resume: bool
    cpu_threads: int
    force: bool
    skip_dense_forward: bool = False  # methods whose forward is dense attention: a "not run" record
    # equal budget (``+runner.target_density=0.25``): every layer's method at the budget that reaches
    # this density at the task's length (methods.budget; absent from conf: run_ids unchanged)
    target_density: float | None = None

    def output_dirs(self) -> dict:
        """Where the run writes besides the store (checked before it starts)."""
        return {"checkpoint folder": self.checkpoint_dir}

    def run(self, cfg: DictConfig) -> list[records.RunRecord]:
        r = self
        device = resolve_device(cfg.device)
        if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        rank, world = distributed(device)
        dtype = resolve_dtype(cfg.dtype, device)
        if device.type == "cpu":
            torch.set_num_threads(int(r.cpu_threads))
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(int(cfg.seed))
        rec = records.new(cfg, device, dtype, seq_len=int(cfg.task.max_len), batch_size=int(r.batch_size))
        if world > 1:
            rec.details["world_size"] = world
            if int(r.batch_size) % world:
                raise ValueError(f"runner.batch_size={r.batch_size} (the global batch) must divide "
                                 f"evenly over {world} processes")
        # one process trains a run_id at a time (the ranks of one torchrun job are that process)
        claimed = records.claim(cfg.store, rec.run_id) if world == 1 else contextlib.nullcontext(True)
        with claimed as mine:
            if not mine:
                log.info("run_id %s is being trained by another process; skipped", rec.run_id)
                return []
            if not r.force and rec.run_id in records.done_ids(cfg.store):
                log.info("an ok record with run_id %s exists; skipped", rec.run_id)
                return []
            return self._run(cfg, rec, device, dtype, rank, world)

    def _run(self, cfg, rec, device, dtype, rank, world) -> list[records.RunRecord]:
        r = self
        ckdir = Path(r.checkpoint_dir) / rec.run_id
        try:
            why = dense_forward(cfg.method.get("_target_", "")) if r.skip_dense_forward else ""
            if why:  # before any data or model: its training would be dense attention's
                raise DenseForward(why)
            task = instantiate(cfg.task)
            data = task.load()
            model = instantiate(cfg.model, method=cfg.method, vocab_size=data["vocab_size"],
                                num_classes=data["num_classes"], max_len=int(cfg.task.max_len),
                                pad_id=data["pad_id"], cls_id=data.get("cls_id"), _recursive_=False).to(device)
            if r.target_density is not None:
                fit_budget(model, int(cfg.task.max_len), float(r.target_density), rec, int(cfg.seed))
            rec.causal = bool(getattr(model, "causal", True))
            _train(r, cfg, task, model, data, device, dtype, ckdir, rec, rank, world)
        except Exception as exc:  # noqa: BLE001 - recorded; a sweep goes on
            records.fail(rec, exc)
            log.error("training failed: %s", rec.error)
            if world > 1:
                raise  # the other ranks wait in a collective: end them all
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if rank != 0:
            return []
        rec.time = records.now()
        records.append(cfg.store, rec)
        return [rec]


def _train(r: TrainRunner, cfg, task, model, data, device, dtype, ckdir: Path, rec, rank: int = 0,
           world: int = 1) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if world > 1:  # each rank computes its share of the global batch; gradients are averaged
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=float(r.lr), weight_decay=float(r.weight_decay),
                            betas=tuple(r.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, r))
    amp = autocast(device, dtype)
    state = {"step": 0, "best_val": -float("inf"), "wall_s": 0.0, "tokens": 0, "losses": []}
    last = ckdir / "last.pt"
    if r.force and last.exists():  # force: start over, never resume (not even a finished run)
        log.info("runner.force: %s is not resumed; training starts over", last)
    if r.resume and not r.force and last.exists():
        rec.details["resumed_from_sha1"] = records.file_hash(last)
        ck = records.load_checkpoint(last, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        if device.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        state = ck["state"]
        rec.details["resumed_from_step"] = state["step"]
        log.info("resumed from %s at step %d", last, state["step"])

    def save(path, extra=None):
        if rank != 0:
            return
        ckdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "state": state, **(extra or {})}, tmp)
        os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact

    x, y = data["train"]
    n, bs, steps = len(y), int(r.batch_size), int(r.steps)
    lm = data.get("kind") == "lm"
    weights = data.get("loss_weight")
    pending: list[torch.Tensor] = []  # the losses of the steps since the last read-back

    def flush() -> float:
        """Move the pending losses into state["losses"] (one host sync); the last one."""
        lv = torch.stack(pending)
        if world > 1:  # the global batch's mean loss, as one process would see it
            dist.all_reduce(lv)
            lv = lv / world
        state["losses"].extend(lv.tolist())
        pending.clear()
        return state["losses"][-1]

    model.train()
    bar = tqdm(total=steps, initial=state["step"], desc=f"train {rec.method}", unit="step",
               disable=rank != 0 or None)
    t0 = time.perf_counter()
    while state["step"] < steps:
        step = state["step"]
        idx = batch_indices(n, bs, step, int(cfg.seed)).chunk(world)[rank]  # this rank's share
        xb, yb = to_device(_take(x, idx), device), y[idx].to(device)
        with amp:
            if lm and weights is not None:  # a weighted mean over the tokens (task.answer_weight);
                w = weights[idx][:, 1:].to(device).float()  # logits only where the weight is > 0
                sel = w > 0
                logits = net(xb[:, :-1], select=sel)
                loss = F.cross_entropy(logits.float(), xb[:, 1:][sel].long(), reduction="none")
                loss = (loss * w[sel]).sum() / w.sum()
            elif lm:  # next-token prediction on a window of max_len + 1 tokens
                logits = net(xb[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), xb[:, 1:].long().flatten())
            else:
                logits = net(*xb) if isinstance(xb, tuple) else net(xb)
                loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if r.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, float(r.grad_clip))
        opt.step()
        sched.step()
        state["step"] += 1
        state["tokens"] += int(bs * (x[0].shape[1] if isinstance(x, tuple) else x.shape[1]))
        pending.append(loss.detach())  # read back in bulk: no host sync every step
        bar.update()
        evaluate = state["step"] % int(r.eval_every) == 0 or state["step"] == steps
        if evaluate or state["step"] % int(r.ckpt_every) == 0 or len(pending) >= 100:
            lv = flush()
            bar.set_postfix(loss=f"{lv:.3f}")
        if evaluate and rank == 0:
            acc = task.validate(model, data["val"], device, amp, int(r.eval_batch_size), r.eval_batches)
            bar.set_postfix(loss=f"{lv:.3f}", val=f"{acc:.3f}")
            if acc > state["best_val"]:
                state["best_val"] = acc
                torch.save(model.state_dict(), ckdir.mkdir(parents=True, exist_ok=True) or ckdir / "best.pt")
        if state["step"] % int(r.ckpt_every) == 0 or state["step"] == steps:
            state["wall_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save(last)
            if world > 1:
                dist.barrier()
    bar.close()
    if rank != 0:
        return
    state["wall_s"] += time.perf_counter() - t0
    if (ckdir / "best.pt").exists():
        model.load_state_dict(records.load_checkpoint(ckdir / "best.pt", map_location=device))
    rec.metrics.update(task.test(model, data["test"], device, amp, int(r.eval_batch_size), state["best_val"]))
    rec.metrics["final_train_loss"] = state["losses"][-1] if state["losses"] else None
    rec.train = {"steps": state["step"], "tokens": state["tokens"], "wall_s": state["wall_s"],
                 "loss_curve": state["losses"][:: max(1, len(state["losses"]) // 200)]}
    rec.details["checkpoint"] = str(ckdir / "best.pt")
    rec.real_kernel = bool(model.method.real_kernel)  # known once it has run
