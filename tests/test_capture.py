"""q/k/v capture on a tiny Llama: the captured tensors are the rotated q/k the layer attends with."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import hf  # noqa: E402
from tasks.capture import capture  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return hf.load(str(path), "dense", impl="reference")


def test_captured_qkv_reproduce_the_layer_output(tiny):
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    outputs = {}
    attn = tiny.model.layers[1].self_attn
    hooks = [attn.o_proj.register_forward_hook(lambda m, i, o: outputs.setdefault("pre_o", i[0])),
             attn.q_proj.register_forward_hook(lambda m, i, o: outputs.setdefault("q_raw", o))]
    with torch.no_grad(), capture(tiny, layers=[1, 2]) as qkv:
        tiny(input_ids=ids)
    for h in hooks:
        h.remove()
    assert set(qkv) == {1, 2} and len(qkv[1]) == 1
    q, k, v = qkv[1][0]
    assert q.shape == (1, 4, 20, 8) and k.shape == (1, 2, 20, 8) and v.shape == (1, 2, 20, 8)  # GQA kept
    # independent attention of the captured tensors equals what entered the output projection
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(s, -1) @ vv).transpose(1, 2).reshape(1, 20, 32)
    torch.testing.assert_close(o, outputs["pre_o"], rtol=1e-5, atol=1e-5)
    # RoPE was applied: position 0 is the raw projection (rotation by angle 0), later ones are not
    q_raw = outputs["q_raw"].view(1, 20, 4, 8).transpose(1, 2)
    torch.testing.assert_close(q[:, :, 0], q_raw[:, :, 0])
    assert not torch.allclose(q[:, :, 5], q_raw[:, :, 5], atol=1e-3)
    assert not hasattr(attn, "_attnbench_capture")  # the hook is gone after the block


def test_unknown_layer_is_an_error(tiny):
    with pytest.raises(ValueError, match="do not exist"):
        with capture(tiny, layers=[7]):
            pass
