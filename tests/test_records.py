"""The JSONL store: atomic appends, killed writers, concurrent writers."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from runners import records


def _rec(i, pad=0):
    return {"run_id": f"r{i}", "status": "ok", "time": str(i), "payload": "x" * pad}


def test_partial_line_is_skipped_with_warning_and_next_append_is_clean(store):
    records.append(store, _rec(0))
    with open(store, "a") as f:
        f.write('{"run_id": "r1", "status": "o')  # a writer killed mid-line
    records.append(store, _rec(2))
    with pytest.warns(UserWarning, match="skipped 1 partial"):
        got = records.read(store)
    assert [r["run_id"] for r in got] == ["r0", "r2"]


def test_killed_writer_loses_no_finished_record(store, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from runners import records
        i = 0
        while True:
            records.append({store!r}, {{"run_id": f"r{{i}}", "status": "ok", "time": "t",
                                       "payload": "x" * 200000}})
            print(i, flush=True)
            i += 1
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.time() + 60
    while len(acknowledged) < 20 and time.time() < deadline:
        acknowledged.append(int(p.stdout.readline()))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(acknowledged) == 20
    with open(store, "rb") as f:
        lines = f.read().split(b"\n")
    complete = [ln for ln in lines if ln.strip()]
    partial = 0
    for ln in complete:
        try:
            json.loads(ln)
        except ValueError:
            partial += 1
    assert partial <= 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {r["run_id"] for r in records.read(store)}
    # every record the writer finished (printed) is there
    assert {f"r{i}" for i in acknowledged} <= got


def _writer(store, wid, n):
    for i in range(n):
        records.append(store, {"run_id": f"w{wid}-{i}", "status": "ok", "time": "t",
                               "payload": str(wid) * (1000 + 37 * i)})


def test_concurrent_writers_neither_lose_nor_interleave(store):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(store, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = records.read(store)
    assert len(got) == 160
    assert len({r["run_id"] for r in got}) == 160
    for r in got:
        wid = r["run_id"][1]
        assert set(r["payload"]) == {wid}


def test_done_ids_only_counts_ok(store):
    records.append(store, {"run_id": "a", "status": "ok", "time": "t"})
    records.append(store, {"run_id": "b", "status": "oom", "time": "t"})
    assert records.done_ids(store) == {"a"}


def test_run_id_ignores_store_and_force():
    a = {"method": {"impl": "sdpa"}, "store": "x", "runner": {"force": False, "n": 1}}
    b = {"method": {"impl": "sdpa"}, "store": "y", "runner": {"force": True, "n": 1}}
    c = {"method": {"impl": "reference"}, "store": "y", "runner": {"force": True, "n": 1}}
    assert records.run_id(a, seq_len=3) == records.run_id(b, seq_len=3)
    assert records.run_id(a, seq_len=3) != records.run_id(a, seq_len=4)
    assert records.run_id(a) != records.run_id(c)
    # a store written before runner.skip_dense_forward existed keeps its run_ids (resumes skip them)
    d = {"method": {"impl": "sdpa"}, "store": "x", "runner": {"force": False, "n": 1, "skip_dense_forward": True}}
    assert records.run_id(a, seq_len=3) == records.run_id(d, seq_len=3)


def test_record_rejects_unknown_status():
    with pytest.raises(ValueError, match="status must be one of"):
        records.RunRecord(run_id="x", time="t", git_commit=None, config={}, seed=0, method="m",
                          method_params={}, impl="reference", real_kernel=False, model="m",
                          task="t", runner="kernel", seq_len=1, batch_size=1, dtype="f",
                          device="cpu", env={}, status="fine")
