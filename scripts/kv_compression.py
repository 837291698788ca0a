"""KV-cache compression on the real model (issue 27): accuracy against compression ratio for every
press on needle, RULER-like and the shared-context multi-turn task, each run as

    attnbench method=<press> task=<needle|ruler|multiturn> model=smollm2_135m press.ratio=<r>

(in this process, through ``runners.run``), then the table and the frontier plot
(``analysis.kv_compression``):

    python scripts/kv_compression.py                 # GPU: 4000 and 8000 tokens (SmolLM2's context is 8192)
    python scripts/kv_compression.py --cpu-tiny      # CPU: 256 tokens, one prompt per cell (a smoke run)

Presses: StreamingLLM, H2O, SnapKV, PyramidKV, random, RazorAttention, Eigen Attention at
ratios 0.25, 0.5, 0.75, 0.9 (``press.ratio``); FastGen has no ratio (its budget is its
``recovery``): it runs at recoveries 0.99, 0.95, 0.9, 0.8 and is placed by the compression it
measured. Dense (no press: the prefill path) is the reference on each task. Needle and RULER
run query-aware (the question ends the prompt); multi-turn in each ``--multiturn-settings``.
The x axis of the frontier is the measured share of cache bytes evicted (1 - bytes held /
dense bytes, from the caches' tensors), not the nominal ratio. Records go to
``<out>/records.jsonl`` (a finished run is skipped when run again), the table to
``<out>/table.md`` and the plot to ``<out>/frontier.png``.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

PRESSES = ["streaming_llm_press", "h2o", "snapkv", "pyramidkv", "random_press", "razor_attention",
           "eigen_attention", "fastgen"]
RATIOS = [0.25, 0.5, 0.75, 0.9]
FASTGEN_RECOVERY = [0.99, 0.95, 0.9, 0.8]
TASKS = ["needle", "ruler", "multiturn"]


def task_overrides(task: str, lengths: list[int], tiny: bool) -> list[str]:
    ls = "[" + ",".join(map(str, lengths)) + "]"
    if task == "needle":
        return [f"task.token_lengths={ls}", "task.depths=[0.1,0.5,0.9]" if not tiny else "task.depths=[0.5]",
                f"task.trials={1 if tiny else 3}", "task.batch_size=1"]
    if task == "ruler":
        return [f"task.token_lengths={ls}", "task.tasks=[niah_single]" if tiny else
                "task.tasks=[niah_single,niah_multikey,niah_multivalue,vt]",
                f"task.trials={1 if tiny else 2}", f"task.max_new_tokens={12 if tiny else 32}"]
    if task == "multiturn":
        return [f"task.token_lengths={ls}", f"task.trials={1 if tiny else 3}", f"task.needles={2 if tiny else 4}",
                f"task.turns={2 if tiny else 3}"]
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def jobs(presses, ratios, tasks, settings, lengths, tiny: bool, recoveries=FASTGEN_RECOVERY) -> list[list[str]]:
    out = []
    for task in tasks:
        base = ["model=smollm2_135m", f"task={task}", *task_overrides(task, lengths, tiny)]
        for setting in (settings if task == "multiturn" else ["query_aware"]):
            st = [f"press.setting={setting}"] if task == "multiturn" else []
            out.append([*base, "method=dense", "impl=reference", *(["task.setting=" + setting] if st else [])])
            for press in presses:
                extra = ["method.min_window=32"] if press == "razor_attention" and tiny else []
                if press == "fastgen":
                    out += [[*base, "method=fastgen", f"method.recovery={r}", *st] for r in recoveries]
                else:
                    out += [[*base, f"method={press}", f"press.ratio={r}", *st, *extra] for r in ratios]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="CPU smoke run: 256 tokens, one prompt per cell")
    ap.add_argument("--lengths", type=int, nargs="+", help="prompt tokens (default 4000 8000; --cpu-tiny: 256)")
    ap.add_argument("--presses", nargs="+", default=PRESSES)
    ap.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    ap.add_argument("--recoveries", type=float, nargs="+", default=FASTGEN_RECOVERY, help="FastGen's recovery values")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--multiturn-settings", nargs="+", default=None,
                    help="query_agnostic and/or query_aware (default both; --cpu-tiny: query_agnostic)")
    ap.add_argument("--out", default="results/kv_compression")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (--cpu-tiny; one is fastest on a shared CPU)")
    args = ap.parse_args(argv)
    lengths = args.lengths or ([256] if args.cpu_tiny else [4000, 8000])
    settings = args.multiturn_settings or (["query_agnostic"] if args.cpu_tiny else ["query_agnostic", "query_aware"])
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        raise SystemExit(f"--ratios must be in (0, 1): {bad}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "records.jsonl"

    from hydra import compose, initialize_config_dir

    from analysis import kv_compression
    from methods import CONF_DIR
    from runners import run

    logging.basicConfig(level=logging.WARNING)
    common = [f"store={store}"] + (["device=cpu", "dtype=float32", f"runner.cpu_threads={args.threads}",
                                    "runner.timing_len=256", "runner.warmup=0", "runner.repeats=1"]
                                   if args.cpu_tiny else ["runner.timing_len=4000"])
    todo = jobs(args.presses, args.ratios, args.tasks, settings, lengths, args.cpu_tiny, args.recoveries)
    t0 = time.time()
    for i, overrides in enumerate(todo):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, *common])
        recs = run(cfg)
        what = " ".join(o for o in overrides if o.startswith(("method", "task=", "press")))
        status = recs[0].status + (f" ({recs[0].error})" if recs and recs[0].error else "") if recs else "skipped (done)"
        print(f"[{i + 1}/{len(todo)} {time.time() - t0:.0f}s] {what}: {status}", flush=True)
    table = kv_compression.table(kv_compression.rows(store))
    (out / "table.md").write_text(table)
    kv_compression.frontier(kv_compression.rows(store), out / "frontier.png",
                            title=f"SmolLM2-135M, {', '.join(map(str, lengths))} tokens"
                            + (" (CPU smoke run)" if args.cpu_tiny else ""))
    print(table)


if __name__ == "__main__":
    main()
