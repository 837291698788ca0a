"""KV-cache compression on the real model (issue 27): accuracy against compression ratio for every
press on needle, RULER-like and the shared-context multi-turn task, each run as

    attnbench method=<press> task=<needle|ruler|multiturn> model=smollm2_135m press.ratio=<r>

(in this process, through ``runners.run``, SmolLM2 loaded once), then the table and the
frontier plot (``analysis.kv_compression``):

    python scripts/kv_compression.py --budget-s 420  # GPU: 4000 and 8000 tokens, about 8 minutes on one H200
    python scripts/kv_compression.py --cpu-tiny      # CPU: 256 tokens, one prompt per cell (a smoke run)

Presses: StreamingLLM, H2O, SnapKV, PyramidKV, random, RazorAttention, Eigen Attention at
ratios 0.5, 0.9, 0.25, 0.75 (``press.ratio``, run in that order); FastGen has no ratio (its
budget is its ``recovery``): it runs at recoveries 0.95, 0.8, 0.99, 0.9 and is placed by the
compression it measured. Dense (no press: the prefill path) is the reference on each task and
runs first. Needle and RULER run query-aware (the question ends the prompt); multi-turn in each
``--multiturn-settings`` (default query-agnostic). The GPU grid fits one 9-minute run: one
prompt per cell (``--trials``), RULER niah_single, niah_multikey and vt, multi-turn 2 turns, no
prefill timing (results/kv_compression/README.md has the estimate). ``--budget-s``: no run
starts after that many seconds (the rest are listed; the same command resumes). The x axis of
the frontier is the measured share of cache bytes evicted (1 - bytes held / dense bytes, from
the caches' tensors), not the nominal ratio. Records go to ``<out>/records.jsonl`` (a finished
run is skipped when run again), the table to ``<out>/table.md`` and the plot to
``<out>/frontier.png``; each run's line gives its prefills, decode steps and their time.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

PRESSES = ["streaming_llm_press", "h2o", "snapkv", "pyramidkv", "random_press", "razor_attention",
           "eigen_attention", "fastgen"]
RATIOS = [0.5, 0.9, 0.25, 0.75]  # in the order they run (--budget-s cuts the last)
FASTGEN_RECOVERY = [0.95, 0.8, 0.99, 0.9]
TASKS = ["needle", "ruler", "multiturn"]


GPU_TRIALS = 1  # prompts per cell on the GPU (needle: per depth; multi-turn: contexts)
RULER_TRIALS = 2  # RULER prompts per (task, length) on the GPU
# the RULER families dense SmolLM2-135M answers at all at 4000 tokens (CPU probe, 3 prompts each:
# niah_single 2/3, niah_multiquery 0.5, niah_multivalue 0.33; niah_multikey, vt, cwe and fwe 0):
# a family dense scores 0 on cannot show what a press loses
RULER_TASKS = ["niah_single", "niah_multivalue", "niah_multiquery"]
# and at 8000 tokens (its window is 8192) dense answers none of 3 niah_single prompts (same probe;
# the GPU run's dense records at 8000 show it too): the presses' RULER runs at 2000 and 4000
RULER_LENGTHS = [2000, 4000]


def task_overrides(task: str, lengths: list[int], tiny: bool, trials: int | None = None) -> list[str]:
    ls = "[" + ",".join(map(str, lengths)) + "]"
    n = trials if trials is not None else (1 if tiny else GPU_TRIALS)
    if task == "needle":
        return [f"task.token_lengths={ls}", "task.depths=[0.5]" if tiny else "task.depths=[0.1,0.5,0.9]",
                f"task.trials={n}", "task.batch_size=1"]
    if task == "ruler":
        n = trials if trials is not None else (1 if tiny else RULER_TRIALS)
        return [f"task.token_lengths={ls}", "task.tasks=[niah_single]" if tiny else
                f"task.tasks=[{','.join(RULER_TASKS)}]", f"task.trials={n}", f"task.max_new_tokens={12 if tiny else 24}"]
    if task == "multiturn":
        return [f"task.token_lengths={ls}", f"task.trials={n}", f"task.needles={2 if tiny else 4}", "task.turns=2"]
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def jobs(presses, ratios, tasks, settings, lengths, tiny: bool, recoveries=FASTGEN_RECOVERY,
         trials: int | None = None, ruler_lengths: list[int] | None = None) -> list[list[str]]:
    """The runs, dense first, then one ratio (and one FastGen recovery) at a time over every
    task and press, in the order given: a run cut short by ``--budget-s`` loses the last
    ratios of every task alike, not a whole task. RULER runs at ``ruler_lengths`` (default:
    ``lengths``); dense RULER at those and ``lengths`` both (where dense scores 0 no press can
    show a loss: the record says where that is)."""
    cells = []  # (task base overrides, the press setting overrides, dense's base)
    for task in tasks:
        ls = ruler_lengths if task == "ruler" and ruler_lengths else lengths
        base = ["model=smollm2_135m", f"task={task}", *task_overrides(task, ls, tiny, trials)]
        wide = ["model=smollm2_135m", f"task={task}", *task_overrides(task, sorted({*ls, *lengths}), tiny, trials)]
        for setting in (settings if task == "multiturn" else ["query_aware"]):
            cells.append((base, [f"press.setting={setting}"] if task == "multiturn" else [], wide))
    dense = ["method=dense", f"impl={'reference' if tiny else 'sdpa'}"]
    out = [[*wide, *dense, *(["task.setting=" + st[0].split("=")[1]] if st else [])] for _, st, wide in cells]
    cells = [(base, st) for base, st, _ in cells]
    for i in range(max(len(ratios), len(recoveries))):
        for base, st in cells:
            for press in presses:
                extra = ["method.min_window=32"] if press == "razor_attention" and tiny else []
                if press == "fastgen":
                    out += [[*base, "method=fastgen", f"method.recovery={recoveries[i]}", *st]] if i < len(recoveries) else []
                elif i < len(ratios):
                    out.append([*base, f"method={press}", f"press.ratio={ratios[i]}", *st, *extra])
    return out


def reuse_model() -> None:
    """Load SmolLM2 once for the whole sweep: ``models.hf_decode.load`` (what a press's model is
    built on) returns the same model each time, its layers' methods dropped and the new method
    config set, so each run builds its own press on the weights already in memory (a load is
    about 3 s; the sweep makes about a hundred runs). Weights are never changed by a run."""
    from models import hf_decode

    orig, loaded = hf_decode.load, {}

    def load(path_or_name, method="dense", dtype=None, dense_layers=0, method_cfg=None, **method_kwargs):
        key = (str(path_or_name), dtype, int(dense_layers))
        if key not in loaded:
            loaded[key] = orig(path_or_name, method, dtype, dense_layers, method_cfg, **method_kwargs)
        model = loaded[key]
        for m in model.modules():
            if "_attnbench_method" in m.__dict__ or "_attnbench_method" in getattr(m, "_modules", {}):
                delattr(m, "_attnbench_method")
        model.config.attnbench_method = method_cfg if method_cfg is not None else {"name": method, **method_kwargs}
        model.config.attnbench_dense_layers = int(dense_layers)
        return model

    hf_decode.load = load


class Meter:
    """Counts what each run generated through the press sessions (prefills, prefilled tokens,
    decode steps) and the time they took: the figures the GPU budget is estimated from."""

    def __init__(self):
        from models import hf_decode

        self.reset()
        meter, prefill, step = self, hf_decode.Session.prefill, hf_decode.Session.step

        def timed_prefill(s, input_ids):
            t = time.perf_counter()
            out = prefill(s, input_ids)
            meter.prefills += 1
            meter.prefill_tokens += int(input_ids.shape[-1])
            meter.prefill_s += time.perf_counter() - t
            return out

        def timed_step(s, token):
            t = time.perf_counter()
            out = step(s, token)
            meter.steps += 1
            meter.step_s += time.perf_counter() - t
            return out

        hf_decode.Session.prefill, hf_decode.Session.step = timed_prefill, timed_step

    def reset(self):
        self.prefills = self.prefill_tokens = self.steps = 0
        self.prefill_s = self.step_s = 0.0

    def line(self) -> str:
        if not self.prefills:
            return "no press session"
        return (f"{self.prefills} prefills ({self.prefill_tokens} tok, {self.prefill_s:.1f}s), {self.steps} decode steps "
                f"({self.step_s:.1f}s, {1000 * self.step_s / max(1, self.steps):.0f} ms/step)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="CPU smoke run: 256 tokens, one prompt per cell")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt tokens (default 4000 8000; --cpu-tiny: 256)")
    ap.add_argument("--ruler-lengths", type=int, nargs="+", default=None,
                    help=f"RULER's prompt tokens (default {' '.join(map(str, RULER_LENGTHS))} on the GPU, "
                         "--lengths with --cpu-tiny)")
    ap.add_argument("--presses", nargs="+", default=PRESSES)
    ap.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    ap.add_argument("--recoveries", type=float, nargs="+", default=FASTGEN_RECOVERY, help="FastGen's recovery values")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--multiturn-settings", nargs="+", default=["query_agnostic"],
                    help="query_agnostic and/or query_aware (default: query_agnostic, SCBench's setting)")
    ap.add_argument("--trials", type=int, default=None,
                    help=f"prompts per cell on every task (default: {GPU_TRIALS} on the GPU, 1 with --cpu-tiny)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run after this many seconds (the rest are listed; rerun to resume)")
    ap.add_argument("--out", default="results/kv_compression")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (--cpu-tiny; one is fastest on a shared CPU)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes sharing the grid (one GPU: decode steps are launch-bound, so several "
                         "processes fill it); each claims the next run not done or claimed by another "
                         "(runners.records.claim), the first writes the report after all have finished")
    ap.add_argument("--report-only", action="store_true", help="only the table and plot from the records")
    ap.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    args = ap.parse_args(argv)
    lengths = args.lengths or ([256] if args.cpu_tiny else [4000, 8000])
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        raise SystemExit(f"--ratios must be in (0, 1): {bad}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "records.jsonl"

    if args.report_only:
        return report(store, lengths, args.cpu_tiny, time.time())
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    raw = list(sys.argv[1:] if argv is None else argv)
    children = [subprocess.Popen([sys.executable, __file__, *raw, "--workers", "1", "--no-report"])
                for _ in range(args.workers - 1)]

    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    logging.basicConfig(level=logging.WARNING)
    reuse_model()
    meter = Meter()
    # no prefill timing in these records (runner.timed_tasks=[]): the sweep measures accuracy and bytes
    common = [f"store={store}", "+runner.timed_tasks=[]"] + (
        ["device=cpu", "dtype=float32", f"runner.cpu_threads={args.threads}"] if args.cpu_tiny else [])
    ruler_lengths = args.ruler_lengths or (lengths if args.cpu_tiny else RULER_LENGTHS)
    todo = jobs(args.presses, args.ratios, args.tasks, args.multiturn_settings, lengths, args.cpu_tiny,
                args.recoveries, args.trials, ruler_lengths)
    print(f"{len(todo)} runs, {', '.join(map(str, lengths))} tokens", flush=True)
    t0, left = time.time(), []
    for i, overrides in enumerate(todo):
        what = " ".join(o for o in overrides if o.startswith(("method", "task=", "press")))
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            left.append(what)
            continue
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, *common])
        meter.reset()
        t = time.time()
        recs = run(cfg)
        status = recs[0].status + (f" ({recs[0].error})" if recs and recs[0].error else "") if recs else "skipped (done)"
        print(f"[{i + 1}/{len(todo)} {time.time() - t0:.0f}s, run {time.time() - t:.1f}s] {what}: {status}; "
              f"{meter.line()}", flush=True)
    if left:
        print(f"budget of {args.budget_s:.0f}s spent: {len(left)} runs not started (rerun to resume):", *left, sep="\n  ")
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        print(f"{len(failed)} worker(s) failed (their runs are not in the store; rerun to resume)")
    if not args.no_report:
        report(store, lengths, args.cpu_tiny, t0)


def report(store: Path, lengths, cpu_tiny: bool, t0: float) -> None:
    """table.md and frontier.png beside the store, from its records."""
    from analysis import kv_compression

    rows = kv_compression.rows(store)
    table = kv_compression.table(rows)
    (store.parent / "table.md").write_text(table)
    kv_compression.frontier(rows, store.parent / "frontier.png",
                            title=f"SmolLM2-135M, {', '.join(map(str, lengths))} tokens"
                            + (" (CPU smoke run)" if cpu_tiny else ""))
    print(table)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
