"""The reliability report (issue 22): bad input to the methods, and faults injected into runs,
sweeps and stores, with what each kept and what it lost. Writes results/reliability.md.

    PYTHONPATH=. python scripts/reliability.py [--out results/reliability.md]

Everything runs on the CPU at tiny sizes (the kernel runner at 64-128 tokens, a 2-3 step
ListOps training) in a temporary folder: a few minutes. The goal it checks: nothing finished is
lost, nothing stale or mixed is shown, every failure names itself. A row's verdict is "ok" when
that holds for its fault; the summary counts the rows where a finished record was lost or a wrong
number was shown (it must be 0).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners import records  # noqa: E402

EXE = [sys.executable, "-m", "runners.cli"]
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
TINY = ["device=cpu", "dtype=float32", "model.num_heads=2", "model.num_kv_heads=2", "model.head_dim=16",
        "runner.warmup=1", "runner.repeats=2", "runner.gate_len=32"]
METHODS = "method=dense,performer,nystrom,sliding_window"


def _args(args, store, sweep):
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    return [*EXE, *flags, *TINY, f"store={store}", f"hydra.sweep.dir={sweep}", f"hydra.run.dir={sweep}", *rest]


def cli(args, store, sweep, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(_args(args, store, sweep), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def popen(args, store, sweep) -> subprocess.Popen:
    return subprocess.Popen(_args(args, store, sweep), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read(store) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return records.read(store)


def ids(store) -> list[str]:
    return [r["run_id"] for r in read(store)]


def wait_for(cond, timeout=300, step=0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def last_line(text: str, *needles) -> str:
    """The last output line holding one of ``needles``: how the failure named itself."""
    import re

    lines = [re.sub(r"^\[[^]]*\]\[[^]]*\] ", "", ln.strip()) for ln in text.splitlines()
             if any(n in ln for n in needles)]
    return (lines[-1] if lines else "(no message)")[:160]


def row(fault, how, kept, lost, wrong, shows, ok=None) -> dict:
    ok = (lost == 0 and wrong == 0) if ok is None else ok
    return {"fault": fault, "injected": how, "finished records kept": kept, "finished records lost": lost,
            "wrong or stale numbers shown": wrong, "how it shows": shows, "verdict": "ok" if ok else "FAIL"}


# --- faults -------------------------------------------------------------------------------------

def kill_sweep_parent(tmp: Path) -> dict:
    store, lens = tmp / "r.jsonl", "runner.seq_lens=[64,80,96,112,128,144,160,176]"
    args = ["-m", "hydra/launcher=local", METHODS, lens, "runner.repeats=10"]
    p = popen(args, store, tmp / "m1")
    wait_for(lambda: p.poll() is not None or (store.exists() and len(ids(store)) >= 2))
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(1.0)  # a job's watch notices within 0.5 s
    before = set(ids(store))
    workers = {r["env"]["pid"] for r in read(store)}
    n1 = len(store.read_text().splitlines())
    time.sleep(3)
    n2 = len(store.read_text().splitlines())
    orphans = [w for w in workers if alive(w)]
    again = cli(args[:1] + args[2:], store, tmp / "m2")  # the same jobs, one process: completes the rest
    after = ids(store)
    lost = len(before - set(after))
    dup = len(after) - len(set(after))
    ok = not orphans and n2 == n1 and again.returncode == 0 and len(set(after)) == 32 and not dup
    return row("SIGKILL of a sweep's parent (joblib, 2 workers)",
               f"killed after {len(before)} of 32 records", f"{len(before)} of {len(before)}", lost, dup,
               f"{len(orphans)} workers alive 3 s later, {n2 - n1} lines appended after; the re-run skipped "
               f"the {len(before)} done and completed all 32 (exit {again.returncode})", ok and not lost)


def kill_worker(tmp: Path) -> dict:
    store = tmp / "r.jsonl"
    args = ["-m", "hydra/launcher=local", METHODS, "runner.seq_lens=[64,80,96,112,128,144]", "runner.repeats=10"]
    p = popen(args, store, tmp / "m1")
    wait_for(lambda: p.poll() is not None or (store.exists() and len(ids(store)) >= 1))
    victim = read(store)[-1]["env"]["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)
    out = p.communicate(timeout=600)[0]
    before = set(ids(store))
    again = cli(args[:1] + args[2:], store, tmp / "m2")
    after = ids(store)
    lost, dup = len(before - set(after)), len(after) - len(set(after))
    shows = (f"sweep exit {p.returncode}: " + last_line(out, "Error", "terminated", "failed")
             + f"; the re-run completed all 24 (exit {again.returncode})")
    ok = p.returncode != 0 and again.returncode == 0 and len(set(after)) == 24
    return row("SIGKILL of one sweep worker", f"worker {victim} killed after {len(before)} record(s)",
               f"{len(before)} of {len(before)}", lost, dup, shows, ok and not lost and not dup)


CKPT_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from hydra import compose, initialize_config_dir
from methods import CONF_DIR
from runners import run
real = torch.save
calls = []
def save(obj, f, *a, **k):
    calls.append(str(f))
    if len([c for c in calls if ".tmp" in c]) == 2 and ".tmp" in str(f):  # the second checkpoint
        import io
        buf = io.BytesIO(); real(obj, buf)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2]); out.flush()
        print("WRITING", flush=True)
        import time; time.sleep(600)
    return real(obj, f, *a, **k)
torch.save = save
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(config_name="config", overrides={overrides!r})
print(run(cfg)[0].status, flush=True)
"""


def listops(store, ck, *extra) -> list[str]:
    return ["experiment=lra/listops-smoke", "runner.steps=3", "runner.eval_every=3", "runner.ckpt_every=1",
            f"runner.checkpoint_dir={ck}", f"store={store}", *extra]


def compose(overrides):
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    from methods import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(config_name="config", overrides=overrides)


def kill_during_checkpoint(tmp: Path) -> dict:
    from runners import run

    store, ck = tmp / "r.jsonl", tmp / "ck"
    script = tmp / "train.py"
    script.write_text(CKPT_SCRIPT.format(root=str(ROOT), overrides=listops(store, ck)))
    p = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    seen = False
    for line in p.stdout:
        if line.strip() == "WRITING":
            seen = True
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    lasts = list(ck.glob("*/last.pt"))
    step = records.load_checkpoint(lasts[0], "cpu")["state"]["step"] if lasts else None
    partial = len(list(ck.glob("*/last.tmp*")))
    rec = run(compose(listops(store, ck)))[0]
    ok = seen and step == 1 and rec.status == "ok" and rec.details.get("resumed_from_step") == 1
    return row("SIGKILL during a checkpoint write (training)",
               "killed half-way through writing the step-2 checkpoint",
               f"last.pt of step {step} intact", 0, 0,
               f"{partial} partial temp file left beside it, never loaded; the re-run resumed from step "
               f"{rec.details.get('resumed_from_step')} and finished ({rec.status})", ok)


def full_disk(tmp: Path) -> list[dict]:
    from collections import namedtuple

    from runners import kernel, run

    out = []
    measured = []
    orig_measure, orig_statvfs = kernel.KernelRunner._check_and_measure, os.statvfs
    kernel.KernelRunner._check_and_measure = lambda self, *a, **k: measured.append(1)
    os.statvfs = lambda p: namedtuple("st", "f_bavail f_frsize")(0, 4096)
    try:
        run(compose([*TINY, "runner.seq_lens=[64,96]", f"store={tmp / 'a.jsonl'}"]))
        msg = "ran"
    except OSError as exc:
        msg = f"OSError: {exc}"
    finally:
        kernel.KernelRunner._check_and_measure, os.statvfs = orig_measure, orig_statvfs
    out.append(row("full disk, found before the run", "statvfs reports 0 bytes free", "-", 0, 0,
                   f"{msg[:150]} ({len(measured)} lengths measured)", not measured and "full file system" in msg))

    store = tmp / "b.jsonl"
    real_write, writes = os.write, []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(store):
            writes.append(1)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    records.os.write = write
    try:
        run(compose([*TINY, "runner.seq_lens=[64,96,128]", f"store={store}"]))
        msg = "no error"
    except OSError as exc:
        msg = f"{type(exc).__name__}: {exc}"
    finally:
        records.os.write = real_write
    lines = store.read_text().splitlines()
    whole = len(read(store))
    out.append(row("full disk during a run (the 2nd append fails)", "os.write raises ENOSPC on the store",
                   f"{whole} of 1 written", 1 - whole, 0,
                   f"the run stops: {msg[:90]}; {len(lines) - whole} partial lines; the 3rd length is not run",
                   whole == 1 and len(lines) == 1 and "No space" in msg))
    return out


def two_sweeps(tmp: Path) -> list[dict]:
    store = tmp / "r.jsonl"
    args = ["-m", METHODS, "runner.seq_lens=[64,80,96,112,128]"]
    a, b = popen(args, store, tmp / "m1"), popen(args, store, tmp / "m2")
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    got = ids(store)
    dup = len(got) - len(set(got))
    pids = {r["env"]["pid"] for r in read(store)}
    rows = [row("two sweeps at once on one store", "the same 20 jobs started twice, 2 sweep folders",
                f"{len(set(got))} of 20", 20 - len(set(got)), dup,
                f"each job ran once ({len(pids)} processes shared them; exits {a.returncode}, {b.returncode})",
                a.returncode == 0 == b.returncode and not dup and len(set(got)) == 20)]
    first = popen(args, tmp / "s.jsonl", tmp / "same")
    wait_for(lambda: (tmp / "same/.sweep.lock").exists() or first.poll() is not None)
    second = cli(["-m", "method=dense"], tmp / "s2.jsonl", tmp / "same")
    first.communicate(timeout=600)
    n2 = len(read(tmp / "s2.jsonl"))
    rows.append(row("two sweeps at once in one sweep folder", "the second given the first's hydra.sweep.dir",
                    f"{len(read(tmp / 's.jsonl'))} of 20 (the first)", 0, 0,
                    f"the second refused (exit {second.returncode}): "
                    + last_line(second.stdout + second.stderr, "in use"),
                    second.returncode == 1 and n2 == 0 and first.returncode == 0))
    del outs
    return rows


def corrupt_records(tmp: Path) -> list[dict]:
    from analysis.records import load
    from analysis.render import render
    from runners import run

    store = tmp / "r.jsonl"
    run(compose([*TINY, "runner.seq_lens=[64,96,128]", f"store={store}"]))
    good = store.read_text().splitlines()
    rows = []
    for name, text in (("a corrupt record (garbage mid-store)", "\n".join([good[0], "{not json at all", *good[1:]]) + "\n"),
                       ("a truncated record (the last line cut)", "\n".join(good) + "\n" + good[-1][: len(good[-1]) // 2])):
        store.write_text(text)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            kept = len(records.read(store))
        warned = str(w[0].message) if w else "no warning"
        table = render(load(store))
        records.append(store, json.loads(good[0]) | {"run_id": "extra", "time": "9999"})
        after = len(read(store))
        rows.append(row(name, "written into a store of 3 records", f"{kept} of 3", 3 - kept, 0,
                        f"read warns: {warned.split(': ', 1)[-1][:70]}; the leaderboard renders "
                        f"({table.count('| dense')} row); the next append is whole ({after} records)",
                        kept == 3 and after == 4 and "skipped 1" in warned))
    return rows


def bad_checkpoints(tmp: Path) -> list[dict]:
    from runners import run, with_impl

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    rows = []
    for name, write in (("a corrupt checkpoint (random bytes as last.pt)", lambda p: p.write_bytes(os.urandom(4096))),
                        ("a crafted pickle as last.pt (code in __reduce__)",
                         lambda p: p.write_bytes(pickle.dumps({"model": Payload()}, protocol=2)))):
        store, ck = tmp / f"{len(rows)}.jsonl", tmp / f"ck{len(rows)}"
        cfg = compose(listops(store, ck))
        rid = records.new(with_impl(cfg), "cpu", "float32", seq_len=int(cfg.task.max_len)).run_id
        (ck / rid).mkdir(parents=True)
        write(ck / rid / "last.pt")
        rec = run(cfg)[0]
        ran = (tmp / "pwned").exists()
        err = (rec.error or "").replace(str(tmp), "<tmp>")
        rows.append(row(name, "placed where the run resumes from", "-", 0, 0,
                        f"record status {rec.status}: {err[:220]}" + ("; ITS CODE RAN" if ran else
                                                                      "; nothing in it ran"),
                        rec.status == "error" and "last.pt cannot be loaded" in (rec.error or "") and not ran))
    return rows


def smoke_in_full_store(tmp: Path) -> dict:
    from analysis.records import load
    from analysis.tables import kernel_table, settings

    store = tmp / "r.jsonl"
    full = cli(["-m", "method=dense,sliding_window", "runner.seq_lens=[128]", "runner.repeats=3"], store, tmp / "m1")

    def full_table():
        for title, g in settings(load(store)):
            if "runner.repeats=2" not in title:
                return kernel_table(g).to_dict("records")
        return None

    before = full_table()
    smoke = cli(["method=dense", "runner.seq_lens=[128]", "runner.warmup=0"], store, tmp / "m2")
    after = full_table()
    diff = sum(a != b for a, b in zip(before or [], after or [])) if before and after else -1
    tables = len(list(settings(load(store))))
    return row("a smoke run written into a full run's store", "dense at the same length, other repeats/warm-up",
               "all", 0, max(diff, 0) if diff >= 0 else 1,
               f"{tables} tables (its own for the smoke run); the full run's rows, speedup included, unchanged "
               f"(exits {full.returncode}, {smoke.returncode})", diff == 0 and tables == 2)


def stale(tmp: Path) -> list[dict]:
    import shutil

    import torch

    from runners import run

    rows = []
    cfg = compose([*TINY, "runner.seq_lens=[64]", f"store={tmp / 'k.jsonl'}", "method=performer", "device=auto",
                   "dtype=auto"])
    from runners import with_impl

    cfg = with_impl(cfg)
    on_cpu = records.new(cfg, torch.device("cpu"), torch.float32, seq_len=64).run_id
    on_meta = records.new(cfg, torch.device("meta"), torch.float32, seq_len=64).run_id
    shutil.copytree(ROOT / "methods", tmp / "methods")
    saved, records.PROJECT_ROOT = records.PROJECT_ROOT, tmp
    try:
        before = records.new(cfg, "cpu", "float32", seq_len=64).run_id
        with open(tmp / "methods/kernels/linear_attn.py", "a") as f:
            f.write("\n# changed\n")
        after = records.new(cfg, "cpu", "float32", seq_len=64).run_id
    finally:
        records.PROJECT_ROOT = saved
    rows.append(row("device=auto on another device; the method's kernel edited",
                    "the same config's run_id on cpu and on another device; before and after the edit",
                    "-", 0, int(on_cpu == on_meta) + int(before == after),
                    "a done record of another device or older code is not reused: new run_ids "
                    f"({on_cpu[:6]} vs {on_meta[:6]}; {before[:6]} vs {after[:6]})",
                    on_cpu != on_meta and before != after))
    store, ck = tmp / "t.jsonl", tmp / "ck"
    first = run(compose(listops(store, ck)))[0]
    again = run(compose(listops(store, ck, "runner.force=true")))[0]
    rows.append(row("runner.force=true on a finished training run", "a run trained, then forced",
                    "2 of 2 records", 0, int("resumed_from_step" in again.details),
                    f"trained again from step 0 ({again.train['steps']} steps, {again.status}), not resumed "
                    f"from the finished last.pt; both records kept ({len(read(store))})",
                    first.status == again.status == "ok" and "resumed_from_step" not in again.details))
    return rows


FAULTS = (kill_sweep_parent, kill_worker, kill_during_checkpoint, full_disk, two_sweeps, corrupt_records,
          bad_checkpoints, smoke_in_full_store, stale)


# --- report -------------------------------------------------------------------------------------

def bad_inputs() -> tuple[list[dict] | None, str]:
    path = ROOT / "scripts" / "reliability_inputs.py"
    if not path.exists():
        return None, "scripts/reliability_inputs.py (issue 22, item 7) is not in this tree"
    sys.path.insert(0, str(path.parent))
    from reliability_inputs import bad_input_rows

    return bad_input_rows(), ""


def markdown(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows).astype(str).map(lambda s: s.replace("|", "/").replace("\n", " "))
    return df.to_markdown(index=False, disable_numparse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "reliability.md"))
    ap.add_argument("--only", nargs="*", help="run only these faults (function names)")
    args = ap.parse_args(argv)
    os.environ.update(TQDM_DISABLE="1")
    import logging

    logging.disable(logging.WARNING)
    started = time.time()
    faults = []
    for fn in FAULTS:
        if args.only and fn.__name__ not in args.only:
            continue
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"reliability-{fn.__name__}-") as tmp:
            try:
                got = fn(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - the battery reports it, and goes on
                got = row(fn.__name__, "-", "?", "?", "?", f"the battery itself failed: {type(exc).__name__}: {exc}",
                          False)
        got = got if isinstance(got, list) else [got]
        faults += got
        print(f"{fn.__name__}: {', '.join(r['verdict'] for r in got)} ({time.time() - t0:.0f} s)", flush=True)
    inputs, missing = bad_inputs()
    lost = sum(int(r["finished records lost"]) for r in faults if str(r["finished records lost"]).isdigit())
    wrong = sum(int(r["wrong or stale numbers shown"]) for r in faults
                if str(r["wrong or stale numbers shown"]).isdigit())
    failed = [r["fault"] for r in faults if r["verdict"] != "ok"]
    parts = ["# Reliability report", "",
             f"Generated by `PYTHONPATH=. python scripts/reliability.py` ({time.time() - started:.0f} s on "
             f"the CPU, git {records.git_commit() or 'unknown'}). Goal: nothing finished is lost, nothing stale or "
             "mixed is shown, every failure names itself.", "",
             f"**Faults: {len(faults)} rows, {len(failed)} not ok; finished records lost: {lost}; "
             f"wrong or stale numbers shown: {wrong}.**", "", "## Bad input to the methods", ""]
    if inputs is None:
        parts += [f"The table is missing: {missing}.", ""]
    else:
        named = [{**r, "verdict": "ok" if str(r["got"]).startswith(str(r["expected"])) else "gap"} for r in inputs]
        gaps = [r for r in named if r["verdict"] == "gap"]
        parts += [f"{len(inputs)} cases (scripts/reliability_inputs.py); {len(gaps)} where the error is not the "
                  f"one expected ({sum(str(r['got']) == 'accepted' for r in gaps)} accepted without an error).", "",
                  markdown(named), ""]
    parts += ["## Faults injected", "",
              "kept / lost count the records that had finished (been appended) when the fault struck; "
              "wrong or stale counts the table cells or reused results that would show a number of another "
              "experiment or of older code.", "", markdown(faults), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"written to {out}: {len(failed)} fault row(s) not ok, {lost} lost, {wrong} wrong")
    return 1 if failed or lost or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
