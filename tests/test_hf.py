"""The Hugging Face adapter on a tiny Llama built from a config and saved locally."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import hf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _inputs():
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    return ids, mask


def test_dense_through_the_adapter_reproduces_the_model(tiny_llama):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        for impl in ("reference", "sdpa"):
            got = hf.load(tiny_llama, "dense", impl=impl)(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[1, 7:], want[1, 7:], rtol=1e-4, atol=1e-4)  # real tokens


def test_generation_with_training_free_methods(tiny_llama):
    ids, mask = _inputs()
    ref = hf.load(tiny_llama, "dense")
    want = ref.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
    for name, kw in [("sliding_window", {"window": 128}), ("minference", {"pattern": "a_shape", "num_sink": 4,
                                                                          "window": 128})]:
        m = hf.load(tiny_llama, name, **kw)  # budgets covering everything: the same tokens
        assert torch.equal(m.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False), want)
        assert type(m.model.layers[0].self_attn._attnbench_method).__name__ in ("SlidingWindow", "MInference")
