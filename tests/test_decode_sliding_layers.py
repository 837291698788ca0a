"""Generation through the decode contract (models/hf_decode.py) in a model that mixes sliding-
window and full-attention layers (a tiny Gemma 3 built from a config, no asset): only the
full-attention layers run the method's decode path; the sliding layers keep their window."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import hf_decode  # noqa: E402

PROMPT, NEW, WINDOW = 24, 6, 8


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        attn_logit_softcapping=None, final_logit_softcapping=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma3")
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _ids(seed=1, n=PROMPT):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(seed))


def test_dense_decode_keeps_the_sliding_layers_window(tiny_gemma):
    """Teacher-forced decode logits equal the model's own (eager attention: its window on the
    sliding layers) at every position; a prompt three windows long, so a layer that ignored its
    window would differ."""
    forced = _ids(5, NEW)
    got = hf_decode.generate(hf_decode.load(tiny_gemma, "dense", impl="reference"), _ids(), NEW, forced=forced)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_gemma, attn_implementation="eager").eval()
    with torch.no_grad():
        want = ref(input_ids=torch.cat([_ids(), forced], 1)).logits
        full = transformers.AutoModelForCausalLM.from_pretrained(tiny_gemma, attn_implementation="eager").eval()
        full.config.sliding_window = 10_000  # the window ignored: other logits (the test can fail)
        for layer in full.model.layers:
            layer.self_attn.sliding_window = None
        unwindowed = full(input_ids=torch.cat([_ids(), forced], 1)).logits
    for j, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, want[:, PROMPT - 1 + j], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got.logits[-1], unwindowed[:, -2], rtol=1e-4, atol=1e-4)
    assert [s["path"] for s in got.stats] == ["SinkWindowAdapter", "DenseAdapter", "SinkWindowAdapter"]


def test_only_full_attention_layers_run_the_method(tiny_gemma):
    got = hf_decode.generate(hf_decode.load(tiny_gemma, "quest", page_size=4, token_budget=8), _ids(), NEW)
    paths = [s["path"] for s in got.stats]
    assert paths == ["SinkWindowAdapter", "Quest", "SinkWindowAdapter"]
    row = 2 * 2 * 2 * 16 * 4  # one token: K and V, B=2, Hkv=2, head dim 16, fp32
    for s in (got.stats[0], got.stats[2]):  # a rolling cache of the window, each step reading all of it
        assert s["bytes_held"] == WINDOW * row and s["bytes_read_per_step"] == WINDOW * row
    assert got.stats[1]["bytes_held"] > (PROMPT + NEW) * row  # every token, plus Quest's page summaries


def test_calibration_leaves_the_sliding_layers_out(tiny_gemma):
    model = hf_decode.load(tiny_gemma, "loki", d=4, k=8)
    assert sorted(hf_decode.calibrate(model, _ids(3, 20))) == [1]
    got = hf_decode.generate(model, _ids(), NEW)
    assert [s["path"] for s in got.stats] == ["SinkWindowAdapter", "Loki", "SinkWindowAdapter"]


def test_a_model_of_only_sliding_layers_is_refused_before_generation(tmp_path):
    """Every layer sliding-window: no layer would run the method, so generation is refused
    before the prefill (no layer's cache filled); dense decode of the same model runs."""
    from methods.base import AttentionInputError

    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128,
        sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention"],
        attn_logit_softcapping=None, final_logit_softcapping=None)
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path)
    model = hf_decode.load(str(tmp_path), "quest", token_budget=8, page_size=4)
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(AttentionInputError, match="no layer of this model would run the method 'quest'"):
        hf_decode.generate(model, _ids(), 2)
    assert not calls  # refused before any forward
    got = hf_decode.generate(hf_decode.load(str(tmp_path), "dense", impl="reference"), _ids(), 2)
    assert got.tokens.shape == (2, 2)


def test_dense_layers_covering_the_full_layers_are_refused(tiny_gemma):
    """The one full-attention layer (index 1) among the first two dense ones: nothing runs Quest."""
    from methods.base import AttentionInputError

    with pytest.raises(AttentionInputError, match="no layer of this model"):
        hf_decode.generate(hf_decode.load(tiny_gemma, "quest", dense_layers=2, token_budget=8, page_size=4), _ids(), 2)
    hf_decode.generate(hf_decode.load(tiny_gemma, "quest", dense_layers=1, token_budget=8, page_size=4), _ids(), 2)
