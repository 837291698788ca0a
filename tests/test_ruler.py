"""The RULER-like suite: exact lengths, answers that the prompts really hold, scoring."""
import re
from collections import Counter

import pytest

from runners import run
from tasks import ruler
from tasks.text import ByteTokenizer

FILLER = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 200


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_have_exact_length_and_are_deterministic(task):
    tok = ByteTokenizer()
    for length in (2500, 3001):
        s = ruler.make_sample(tok, FILLER, task, length, seed=7)
        assert len(s.ids) == length and s.answers
        assert s == ruler.make_sample(tok, FILLER, task, length, seed=7)
    assert ruler.make_sample(tok, FILLER, task, 2500, seed=8).answers != s.answers or task == "cwe"


def test_answers_are_what_the_prompt_says():
    tok = ByteTokenizer()
    s = ruler.make_sample(tok, FILLER, "niah_multivalue", 2000, seed=1)
    text = tok.decode(s.ids)
    key = re.search(r"numbers for (\w+) mentioned", text).group(1)
    assert sorted(re.findall(rf"numbers for {key} is: (\d+)", text)) == sorted(s.answers)
    s = ruler.make_sample(tok, FILLER, "vt", 2000, seed=2)
    text = tok.decode(s.ids)
    value = re.search(r"VAR \w+ = (\d+)\.", text).group(1)
    held, changed = {value}, True
    assign = re.findall(r"VAR (\w+) = (\w+)\.", text)
    names = set()
    while changed:  # follow the chain independently
        changed = False
        for a, b in assign:
            if b in held or b in names:
                if a not in names:
                    names.add(a)
                    changed = True
    assert names == set(s.answers)
    s = ruler.make_sample(tok, FILLER, "cwe", 2500, seed=3)
    words = re.findall(r"\d+\. ([a-z]+)", tok.decode(s.ids))
    assert {w for w, _ in Counter(words).most_common(3)} == set(s.answers)


def test_string_match_all_and_errors():
    assert ruler.string_match_all("the numbers are 123 and 456", ["123", "456"]) == 1.0
    assert ruler.string_match_all("only 123", ["123", "456"]) == 0.5
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="does not fit the model's window of 1000"):
        ruler.make_sample(tok, FILLER, "vt", 2000, 0, window=1000)
    with pytest.raises(ValueError, match="shorter than its content"):
        ruler.make_sample(tok, FILLER, "fwe", 300, 0)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.make_sample(tok, FILLER, "qa", 3000, 0)


def test_suite_runs_through_the_evaluate_runner(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=lm/ruler-smoke", "method=sliding_window", "method.window=128",
                      "task.tasks=[niah_single,vt,cwe]", f"store={tmp_path}/r.jsonl", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "ok", rec.error
    assert [c["task"] for c in rec.metrics["cells"]] == ["niah_single", "vt", "cwe"]
    assert all(0.0 <= c["score"] <= 1.0 for c in rec.metrics["cells"])
    ex = rec.metrics["examples"]  # one generated answer per cell, beside what was asked
    assert [e["task"] for e in ex] == ["niah_single", "vt", "cwe"] and all(e["answers"] for e in ex)


def test_needle_and_ruler_figures_from_records(compose_cfg, tmp_path):
    from analysis.figures import main as figures

    store = f"store={tmp_path}/r.jsonl"
    run(compose_cfg("experiment=lm/ruler-smoke", "task.tasks=[niah_single,vt]", store, tiny=False))
    run(compose_cfg("experiment=lm/needle-smoke", store, tiny=False))
    assert figures(["needle", "--store", f"{tmp_path}/r.jsonl", "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "needle-dense.png").stat().st_size > 1000
    assert figures(["ruler", "--store", f"{tmp_path}/r.jsonl", "--out", str(tmp_path / "ruler.md")]) == 0
    text = (tmp_path / "ruler.md").read_text()
    assert "niah_single @2048" in text and "vt @2048" in text and "avg" in text
    assert figures(["ruler", "--store", f"{tmp_path}/none.jsonl", "--out", str(tmp_path / "x.md")]) == 1


def test_every_task_fits_the_configured_lengths_of_a_byte_level_lm():
    """The lengths in conf/task/ruler.yaml hold every task's content, with room for the answer
    within the model's 4096-token window (a GPU run failed on both before they did)."""
    from omegaconf import OmegaConf

    from methods import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "task" / "ruler.yaml")
    filler = "To be, or not to be, that is the question. " * 400
    for L in cfg.lengths:
        assert L + 12 <= 4096
        for task in cfg.tasks:
            assert len(ruler.make_sample(ByteTokenizer(), filler, task, int(L), seed=1).ids) == L
