"""runner=pretrained end to end on SmolLM2 (skipped when the model is not fetched; CI fetches
it): records carry the model and its hash, the text, the tokens; failures are records."""
import json

import pytest

from models import pretrained

pytestmark = pytest.mark.skipif(not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists(),
                                reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


def _run(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    store = tmp_path / f"records{len(list(tmp_path.iterdir()))}.jsonl"  # a store per run
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=real", f"store={store}", *overrides])
    run(cfg)
    return [json.loads(line) for line in store.read_text().splitlines()]


def test_perplexity_needle_and_fidelity_records(tmp_path):
    small = ["task.seq_len=128", "runner.timing_len=128"]
    (ppl,) = _run(tmp_path, "task=perplexity", "method=dense", "task.prose_stride=64", *small)
    assert ppl["status"] == "ok" and ppl["runner"] == "pretrained" and ppl["model"] == "smollm2_135m"
    assert ppl["details"]["model_asset"]["sha256"] == pretrained.model_file("smollm2_135m")[1]
    assert ppl["details"]["text"] == "prose:austen" and ppl["metrics"]["tokens_scored"] == 127
    assert 5 < ppl["metrics"]["perplexity"] < 100  # a real model on real prose: tens
    assert ppl["latency_ms"]["prefill"]["p50"] > 0

    (ndl,) = _run(tmp_path, "task=needle", "method=dense", "task.token_lengths=[200]",
                  "task.depths=[0.5]", *small)
    assert ndl["status"] == "ok" and ndl["metrics"]["needle@200"] == 1.0  # dense finds it at 200 tokens

    recs = _run(tmp_path, "task=fidelity", "method=sliding_window", "method.window=64",
                "task.layers=[0,29]", *small)
    fid = recs[-1]
    assert fid["status"] == "ok" and 0 < fid["metrics"]["recall"] < 1 and fid["metrics"]["real_rel_err"] > 0


def test_a_method_that_cannot_attend_causally_is_a_failed_record(tmp_path):
    (rec,) = _run(tmp_path, "task=perplexity", "method=nystrom", "task.seq_len=256", "task.prose_stride=128")
    assert rec["status"] != "ok" and "cannot attend causally" in rec["error"]
    assert not rec["latency_ms"]  # nothing was measured


def test_publish_keeps_the_first_finished_checkpoint(tmp_path):
    """Two processes dequantizing the same model at once (two jobs on a fresh cache): the second
    rename finds the folder already there and discards its own copy instead of failing the run
    (it failed a GPU run with 'Directory not empty'); a target that is not a finished checkpoint
    still raises."""
    from models.pretrained import publish

    saved = tmp_path / "hf" / "abc"
    first, second = tmp_path / "hf" / "a.partial", tmp_path / "hf" / "b.partial"
    for d in (first, second):
        d.mkdir(parents=True)
        (d / "config.json").write_text(d.name)
    publish(first, saved)
    assert (saved / "config.json").read_text() == "a.partial" and not first.exists()
    publish(second, saved)
    assert (saved / "config.json").read_text() == "a.partial" and not second.exists()
    broken, third = tmp_path / "hf" / "broken", tmp_path / "hf" / "c.partial"
    (broken / "x").mkdir(parents=True)
    third.mkdir()
    with pytest.raises(OSError):
        publish(third, broken)
