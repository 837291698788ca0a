"""lm-eval end to end, offline: a local task file, a tiny local Llama and tokenizer."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("lme")
    rows = [{"question": f"Is {a} more than {b}?", "choices": ["yes", "no"], "answer": int(a <= b)}
            for a, b in [(3, 1), (2, 5), (7, 4), (1, 9), (6, 6), (8, 2)]]
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "tiny.yaml").write_text(
        "task: attnbench_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'test.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r["question"] + " yes no" for r in rows],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=1, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return root, model_dir


def _acc(model, args, root):
    from lm_eval.tasks import TaskManager

    import models.lm_eval_model  # noqa: F401  (registers "attnbench")

    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["attnbench_tiny"], device="cpu",
                                  batch_size=2, task_manager=TaskManager(include_path=str(root)))
    return out["results"]["attnbench_tiny"]["acc,none"]


def test_lm_eval_runs_any_method_offline(tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, model_dir = tiny
    own = _acc("hf", f"pretrained={model_dir}", root)
    dense = _acc("attnbench", f"pretrained={model_dir},method=dense", root)
    assert dense == pytest.approx(own)  # dense through the adapter scores as the model itself
    mi = _acc("attnbench", f"pretrained={model_dir},method=minference,method.pattern=a_shape,"
                           f"method.num_sink=2,method.window=4", root)
    assert 0.0 <= mi <= 1.0


def test_lm_eval_command_line(tiny, tmp_path):
    import os
    import subprocess
    import sys

    root, model_dir = tiny
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "models.lm_eval_model", "--model", "attnbench", "--model_args",
                        f"pretrained={model_dir},method=sliding_window,method.window=8", "--tasks",
                        "attnbench_tiny", "--include_path", str(root), "--device", "cpu", "--batch_size", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "attnbench_tiny" in p.stdout and "acc" in p.stdout
