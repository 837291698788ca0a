"""Gemma 3 through the adapter: only its full-attention layers run the method, its
sliding-window layers keep their window. On a tiny random Gemma 3 (always) and on
Gemma-3-270M (when it is in the asset cache: python scripts/fetch_assets.py --gemma; CI
fetches SmolLM2 only, so these are skipped there)."""
import json

import pytest
import torch

from models import hf, pretrained

HAVE_GEMMA = (pretrained.cache_dir() / "gemma3_270m" / "MANIFEST.json").exists()
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="Gemma-3-270M is not fetched "
                                 "(python scripts/fetch_assets.py --gemma)")


def _tiny_gemma(tmp_path, **over):
    import transformers

    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
              max_position_embeddings=64, layer_types=["sliding_attention", "full_attention"] * 3)
    kw.update(over)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw)).eval()
    model.save_pretrained(tmp_path)
    return model


def _full(config):
    return [i for i, t in enumerate(config.layer_types) if t == "full_attention"]


def _with_method(model):
    return sorted(m.layer_idx for m in model.modules() if hasattr(m, "_attnbench_method"))


def test_tiny_gemma_routes_its_full_attention_layers_and_matches_eager(tmp_path):
    ref = _tiny_gemma(tmp_path)
    with pytest.raises(ValueError, match=r"layers \[0, 2, 4\] are sliding_attention layers \(window 4\)"):
        hf.load(str(tmp_path))  # layers=all would put the method in place of the windows
    with pytest.raises(ValueError, match="sliding_attention"):
        hf.load(str(tmp_path), layers=[1, 2])
    model = hf.load(str(tmp_path), layers="full_attention")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 > window 4
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref.set_attn_implementation("eager")
        want = ref(input_ids=ids).logits
    assert _with_method(model) == _full(model.config) == [1, 3, 5]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the window matters here: the same weights with full attention everywhere differ
    ref.config.layer_types = ["full_attention"] * 6
    for m in ref.modules():
        if hasattr(m, "sliding_window"):
            m.sliding_window, m.is_sliding = None, False
    with torch.no_grad():
        assert not torch.allclose(ref(input_ids=ids).logits, want, atol=1e-3)


def test_tiny_gemma_with_another_scale_or_a_softcap_is_refused(tmp_path):
    _tiny_gemma(tmp_path, query_pre_attn_scalar=32)  # scale 32**-0.5, not 1/sqrt(16)
    model = hf.load(str(tmp_path), layers="full_attention")
    with pytest.raises(ValueError, match=r"scale 1/sqrt\(16\); layer 1 of this model uses 0.17"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))
    _tiny_gemma(tmp_path, attn_logit_softcapping=50.0)
    model = hf.load(str(tmp_path), layers="full_attention")
    with pytest.raises(ValueError, match="soft-cap; layer 1 of this model caps its logits at 50.0"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))


@needs_gemma
def test_gemma_dense_through_the_adapter_equals_the_unadapted_model():
    with pytest.raises(ValueError, match="window 512"):
        pretrained.load("gemma3_270m")  # layers=all: refused before the weights load
    model = pretrained.load("gemma3_270m", layers="full_attention")
    a = model.asset
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["context"]) == (4, 1, 256, 32768)
    assert a["routed_layers"] == _full(model.config) == [5, 11, 17] and a["num_layers"] == 18
    ids = model.tokenizer("It is a truth universally acknowledged, that a single man in possession "
                          "of a good fortune, must be in want of a wife. " * 24, return_tensors="pt").input_ids
    assert ids.shape[1] > 600  # past the sliding window of 512
    with torch.no_grad():
        got = model(input_ids=ids, logits_to_keep=64).logits
        assert _with_method(model) == [5, 11, 17]
        model.set_attn_implementation("eager")  # the unadapted model: transformers' own attention
        want = model(input_ids=ids, logits_to_keep=64).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _run(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from methods import CONF_DIR
    from runners import run

    store = tmp_path / f"records{len(list(tmp_path.iterdir()))}.jsonl"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=gemma3_270m", f"store={store}", "+runner.timed_tasks=[]",
                                                       *overrides])  # no timed prefill: quality only
    run(cfg)
    return [json.loads(line) for line in store.read_text().splitlines()]


@needs_gemma
def test_gemma_perplexity_and_needle_records(tmp_path):
    ppl = {}
    for method in ("dense", "sliding_window"):
        window = ["method.window=128"] if method == "sliding_window" else []  # 128 < 512 tokens
        (rec,) = _run(tmp_path, "task=perplexity", f"method={method}", *window, "task.seq_len=512",
                      "task.prose_windows=1")
        assert rec["status"] == "ok", rec["error"]
        assert rec["model"] == "gemma3_270m" and rec["details"]["model_asset"]["routed_layers"] == [5, 11, 17]
        assert rec["metrics"]["tokens_scored"] == 511
        ppl[method] = rec["metrics"]["perplexity"]
    assert 5 < ppl["dense"] < 100  # a real model on real prose: tens
    assert ppl["sliding_window"] != ppl["dense"]  # the method ran (window 128 < 512 tokens)

    (ndl,) = _run(tmp_path, "task=needle", "method=dense", "task.token_lengths=[768]", "task.depths=[0.5]",
                  "task.trials=1")
    assert ndl["status"] == "ok", ndl["error"]
    assert ndl["metrics"]["needle@768"] == 1.0  # past the sliding window of 512


def test_a_tokenizer_without_a_chat_template_frames_plain_text():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tasks import real_text

    words = ["[UNK]", "<bos>", "Question", ":", "Answer", "Why", "?", "Because"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>")
    assert fast.chat_template is None
    head, tail = real_text.chat_frame(fast)("Why?", "Because")
    assert head == [1]  # the begin-of-text token, then the body
    assert tail == [2, 3, 5, 6, 4, 3, 7]  # Question: Why? Answer: Because
