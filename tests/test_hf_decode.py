"""Generation through the decode contract in a real transformers model (models/hf_decode.py), on a
tiny Llama built from a config (grouped-query: 4 query heads, 2 KV heads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from methods.base import AttentionInputError  # noqa: E402
from models import hf, hf_decode  # noqa: E402

PROMPT, NEW = 40, 8


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _ids():
    return torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(1))


def test_dense_decode_through_the_contract_generates_as_the_model_does(tiny_llama):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    ids = _ids()
    want = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    got = hf_decode.generate(hf_decode.load(tiny_llama, "dense", impl="reference"), ids, NEW)
    assert torch.equal(got.tokens, want[:, PROMPT:])
    dense_held = 2 * 2 * 2 * (PROMPT + NEW) * 8 * 4  # K and V, B=2, Hkv=2, head dim 8, fp32
    assert all(s["decode_fallback"] is None and s["bytes_held"] == dense_held for s in got.stats)


def test_streaming_llm_decode_steps_give_its_prefill_logits(tiny_llama):
    """Each generated token's logits equal those of the method's own prefill over the whole
    sequence at that position (every layer's decode step is its prefill row), while the cache
    holds only the sinks and the window."""
    kw = dict(num_sink=2, window=8, impl="reference")
    got = hf_decode.generate(hf_decode.load(tiny_llama, "streaming_llm", **kw), _ids(), NEW)
    full = torch.cat([_ids(), got.tokens], 1)
    forced = torch.randint(0, 64, (2, NEW), generator=torch.Generator().manual_seed(5))  # teacher forcing
    fed = hf_decode.generate(hf_decode.load(tiny_llama, "streaming_llm", **kw), _ids(), NEW, forced=forced)
    with torch.no_grad():
        fed_pre = hf.load(tiny_llama, "streaming_llm", **kw)(input_ids=torch.cat([_ids(), forced], 1)).logits
    for j, logits in enumerate(fed.logits):
        torch.testing.assert_close(logits, fed_pre[:, PROMPT - 1 + j], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        pre = hf.load(tiny_llama, "streaming_llm", **kw)(input_ids=full).logits
    for j, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, pre[:, PROMPT - 1 + j], rtol=1e-5, atol=1e-5)
    assert all(s["path"] == "StreamingLLM" and s["bytes_held"] == 2 * 2 * 2 * (2 + 8) * 8 * 4 for s in got.stats)


def test_quest_in_the_model(tiny_llama):
    ids = _ids()
    dense = hf_decode.generate(hf_decode.load(tiny_llama, "dense", impl="reference"), ids, NEW)
    wide = hf_decode.generate(hf_decode.load(tiny_llama, "quest", page_size=4, token_budget=4096), ids, NEW)
    assert torch.equal(wide.tokens, dense.tokens)  # a budget over the cache reads it all
    narrow = hf_decode.generate(hf_decode.load(tiny_llama, "quest", page_size=4, token_budget=12), ids, NEW)
    assert all(n["bytes_read_per_step"] < d["bytes_read_per_step"] for n, d in zip(narrow.stats, dense.stats))
    first = hf_decode.generate(hf_decode.load(tiny_llama, "quest", page_size=4, token_budget=12, dense_layers=1),
                               ids, NEW, forced=narrow.tokens)  # the paper's dense first layers (here one)
    assert [s["path"] for s in first.stats] == ["DenseAdapter", "Quest"]
    assert first.stats[0]["bytes_read_per_step"] == dense.stats[0]["bytes_read_per_step"]
    assert first.stats[1]["bytes_read_per_step"] < dense.stats[1]["bytes_read_per_step"]


def test_bad_use_is_refused(tiny_llama):
    model = hf_decode.load(tiny_llama, "dense")
    kw = hf_decode.cache_kwarg(model)
    with pytest.raises(AttentionInputError, match="ContractCache"):
        model(input_ids=_ids())  # the model's own cache: the decode path would not see it
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(AttentionInputError, match="padded prompts"):
        model(input_ids=_ids(), attention_mask=mask, use_cache=True, **{kw: hf_decode.ContractCache(model, PROMPT)})
    cache = hf_decode.ContractCache(model, PROMPT + 1)
    model(input_ids=_ids(), use_cache=True, **{kw: cache})
    with pytest.raises(AttentionInputError, match="one token"):
        model(input_ids=_ids()[:, :2], use_cache=True, **{kw: cache})
    cache = hf_decode.ContractCache(model, PROMPT + 1)
    model(input_ids=_ids(), use_cache=True, **{kw: cache})
    model(input_ids=_ids()[:, :1], use_cache=True, **{kw: cache})
    with pytest.raises(AttentionInputError, match="capacity"):
        model(input_ids=_ids()[:, :1], use_cache=True, **{kw: cache})
    with pytest.raises(AttentionInputError, match="ContractCache"):  # after a ContractCache, the own cache again
        model(input_ids=_ids())
