"""Decoder LM, strided perplexity, the Shakespeare corpus, LM training with every method."""
import math
from pathlib import Path

import pytest
import torch

import methods
from models.lm import DecoderLM, rope
from runners import run
from tasks import perplexity


def test_uniform_model_perplexity_is_the_vocabulary_size():
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    out = perplexity.evaluate(lambda x: torch.zeros(1, x.shape[1], 256), tokens, context=64, stride=16,
                              device="cpu")
    assert out["ppl"] == pytest.approx(256.0) and out["bpb"] == pytest.approx(8.0)
    assert out["tokens"] == 999


@pytest.mark.parametrize("context,stride", [(10, 10), (10, 3), (64, 64), (7, 1)])
def test_strided_evaluation_scores_each_token_once(context, stride):
    seen = []

    def fn(x):  # a model that remembers which targets it was asked to predict
        seen.append(x.shape[1])
        return torch.zeros(1, x.shape[1], 4)

    out = perplexity.evaluate(fn, torch.zeros(101, dtype=torch.long), context, stride, "cpu")
    assert out["tokens"] == 100 and max(seen) <= context - 1
    with pytest.raises(ValueError, match="stride"):
        perplexity.evaluate(fn, torch.zeros(10, dtype=torch.long), 4, 5, "cpu")


def test_rope_scores_depend_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    s = lambda a, b: float(rope(q, torch.tensor([a])) @ rope(k, torch.tensor([b])).transpose(-1, -2))  # noqa: E731
    assert s(5, 2) == pytest.approx(s(13, 10), rel=1e-5)
    assert s(5, 2) != pytest.approx(s(5, 3), rel=1e-3)


def _lm(name="dense", **kw):
    cfg = methods.compose_method(name)
    for k, v in kw.items():
        cfg[k] = v
    torch.manual_seed(0)
    return DecoderLM(cfg, vocab_size=32, max_len=48, dim=32, depth=2, heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48).eval()


@pytest.mark.parametrize("name", ["dense", "sliding_window", "performer", "bigbird"])
def test_lm_is_causal(name):
    m = _lm(name)
    x = torch.randint(0, 32, (2, 40), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 25:] = (y[:, 25:] + 7) % 32
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :25], m(y)[:, :25], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation():
    m = _lm("dense", impl="reference")
    prompt = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(2))
    out = m.generate(prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq[:, 10:]) and m.decode_fallback is None
    sw = _lm("sliding_window", window=4, impl="reference")  # decodes with its window: the same
    out = sw.generate(prompt, 6)                               # as recomputing the windowed prefill
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, sw(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq[:, 10:]) and sw.decode_fallback is None
    ms = _lm("minference", pattern="a_shape", num_sink=2, window=4)
    ms.generate(prompt, 3)
    assert ms.decode_fallback == "dense"  # MInference decodes dense by design
    with pytest.raises(ValueError, match="window of 48"):
        m.generate(prompt, 40)


def test_shakespeare_corpus_through_datasets():
    from tasks import text

    files = text.shakespeare_files()
    assert len(files) > 30
    from omegaconf import OmegaConf

    docs = text.documents(OmegaConf.create({"source": "shakespeare"}))
    assert len(docs["test"]) >= 2 and len(docs["train"]) > 30
    assert "ROMEO" in "".join(docs["train"] + docs["val"] + docs["test"])


def test_lm_smoke_trains_with_one_method_of_each_family(compose_cfg, tmp_path, monkeypatch, representative):
    """The LM runner end to end (train, checkpoints, strided test perplexity); causal training
    with every method is test_layers.py's."""
    method_name = representative
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    cfg = compose_cfg("experiment=lm/shakespeare-smoke", f"method={method_name}", "task.eval_tokens=512",
                      f"runner.checkpoint_dir={tmp_path}/ck", f"store={tmp_path}/r.jsonl", tiny=False)
    rec = run(cfg)[0]  # 512 test tokens (the experiment's 2048: 64 windows per evaluation, 3 evaluations)
    if not methods.load(method_name).supports_causal:
        assert rec.status == "error" and "not causal" in rec.error
        return
    assert rec.status == "ok", rec.error
    assert math.isfinite(rec.metrics["test_ppl"]) and rec.metrics["test_bpb"] > 0
    assert rec.train["tokens"] == 6 * 8 * 65


def test_needle_grid_on_a_trained_checkpoint_with_methods_swapped_in(compose_cfg, tmp_path, monkeypatch):
    from analysis.plots import needle_heatmap

    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path / "data"))
    train = compose_cfg("experiment=lm/shakespeare-smoke", "task.max_len=256", "runner.steps=4",
                        f"runner.checkpoint_dir={tmp_path}/ck", f"store={tmp_path}/t.jsonl", tiny=False)
    trained = run(train)[0]
    assert trained.status == "ok"
    ckpt = trained.details["checkpoint"]
    for name, kw in [("dense", []), ("minference", ["method.pattern=a_shape", "method.num_sink=4", "method.window=32"]),
                     ("sliding_window", ["method.window=64"])]:
        cfg = compose_cfg("experiment=lm/needle-smoke", f"method={name}", *kw, f"runner.checkpoint={ckpt}",
                          f"store={tmp_path}/e.jsonl", tiny=False)
        rec = run(cfg)[0]
        assert rec.status == "ok", rec.error
        assert rec.details["missing_keys"] == [] and rec.details["checkpoint"] == ckpt
        cells = rec.metrics["cells"]
        assert {(c["length"], c["depth"]) for c in cells} == {(L, d) for L in (160, 240) for d in (0.0, 0.5, 1.0)}
        assert all(c["score"] in (0.0, 1.0) for c in cells)
        assert rec.details["decode_fallback"] == ("dense" if name == "minference" else None)
    assert needle_heatmap(cells, tmp_path / "h.png", "fixture").stat().st_size > 1000
    # the training state (last.pt) loads as its model; a checkpoint of another shape is an error
    last = str(Path(ckpt).with_name("last.pt"))
    rec = run(compose_cfg("experiment=lm/needle-smoke", f"runner.checkpoint={last}", f"store={tmp_path}/e.jsonl",
                          "runner.force=true", tiny=False))[0]
    assert rec.status == "ok" and rec.details["missing_keys"] == []
    rec = run(compose_cfg("experiment=lm/needle-smoke", f"runner.checkpoint={ckpt}", "model.depth=3",
                          f"store={tmp_path}/e.jsonl", tiny=False))[0]
    assert rec.status == "error" and "does not fit the model" in rec.error


def test_needle_prompt_longer_than_the_window_is_an_error_record(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=lm/needle-smoke", "task.lengths=[300]", f"store={tmp_path}/e.jsonl", tiny=False)
    rec = run(cfg)[0]
    assert rec.status == "error" and "does not fit the model's window" in rec.error


def test_needle_episodes_are_prompts_followed_by_their_answers():
    from tasks.perplexity import needle_episodes
    from tasks.text import ByteTokenizer

    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 40
    eps = needle_episodes(text, 3, 600, seed=1)
    assert eps.shape == (3, 600) and eps.dtype == torch.uint8
    tok = ByteTokenizer()
    for row in eps:
        s = tok.decode(row.tolist())
        key = s.split("What is the special magic number for ")[1].split("?")[0]
        value = s.split(f"The special magic number for {key} is ")[1].split(".")[0]
        assert s.endswith(f"The special magic number for {key} is {value}.")
        assert len(value) == 7 and value.isdigit()
    assert not torch.equal(eps[0], eps[1])


def test_needle_episodes_with_several_needles_answer_each_from_its_own_needle():
    import re

    from tasks.perplexity import needle_episodes

    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 80
    eps = needle_episodes(text, 4, 1200, seed=2, needles=5)
    assert eps.shape == (4, 1200)
    for row in eps:
        s = bytes(row.tolist()).decode()
        needles = dict(re.findall(r"The special magic number for (\w+) is (\d+)\. ", s))
        answers = re.findall(r"What is the special magic number for (\w+)\? The special magic number for \1 is (\d+)\.", s)
        assert len(needles) == 5 and sorted(k for k, _ in answers) == sorted(needles)
        assert all(needles[k] == v for k, v in answers)
        first_q = s.index("What is")
        assert all(s.index(f"for {k} is {v}") < first_q for k, v in needles.items()), "needles precede questions"
    from tasks.perplexity import answer_mask

    mask = answer_mask(eps)
    assert mask.sum(1).tolist() == [5 * 7] * 4
    assert all(bytes(r[m].tolist()).isdigit() for r, m in zip(eps, mask))
    packed = needle_episodes(text, 6, 2000, seed=3, needles=4, min_len=300)
    for row in packed:
        s = bytes(row.tolist()).decode()
        asked = re.findall(r"What is the special magic number for (\w+)\? The special magic number for \1 is (\d+)\.", s)
        assert len(asked) >= 2, "several episodes packed in a window"
        for k, v in asked:  # each answered from its own needle, which comes before its question
            assert s.index(f"for {k} is {v}. ") < s.index(f"What is the special magic number for {k}?")
    with pytest.raises(ValueError, match="fewer needles"):
        needle_episodes(text, 1, 600, needles=5)
