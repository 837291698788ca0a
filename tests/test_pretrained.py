"""The real pretrained model: checks before compute (always), and the adapted SmolLM2 against
the unadapted one (when the model is in the asset cache; CI fetches it)."""
import json

import pytest
import torch

import methods
from models import pretrained

HAVE_SMOLLM2 = (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists()
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


def test_missing_model_file_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    with pytest.raises(pretrained.ModelAssetError, match="missing: run python scripts/fetch_assets.py"):
        pretrained.load("smollm2_135m")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        pretrained.load("gpt5")


def test_corrupt_model_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2_135m"
    folder.mkdir()
    (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF truncated")
    (folder / "MANIFEST.json").write_text(json.dumps({"files": {"SmolLM2-135M-Instruct.Q4_1.gguf": "0" * 64}}))
    with pytest.raises(pretrained.ModelAssetError, match="corrupt"):
        pretrained.load("smollm2_135m")


def test_a_method_that_cannot_attend_causally_is_refused_before_loading():
    import transformers

    config = transformers.LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                      max_position_embeddings=8192)
    with pytest.raises(methods.AttentionInputError, match="cannot attend causally"):
        pretrained.check_method(methods.compose_method("linformer"), config)
    pretrained.check_method(methods.compose_method("sliding_window"), config)  # GQA 9/3 is fine


@needs_model
def test_dense_through_the_adapter_equals_the_unadapted_model():
    import transformers

    model = pretrained.load("smollm2_135m")
    assert model.asset["num_heads"] == 9 and model.asset["num_kv_heads"] == 3 and model.asset["context"] == 8192
    saved = next((pretrained.cache_dir() / "smollm2_135m" / "hf").iterdir())
    ref = transformers.AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    ids = model.tokenizer("It is a truth universally acknowledged, that a single man in possession "
                          "of a good fortune, must be in want of a wife.", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[0, -1].argmax() == want[0, -1].argmax()
