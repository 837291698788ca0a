"""The real-text helpers on SmolLM2 (skipped when it is not fetched): batched teacher-forced
needle scoring against one plain forward per prompt; the fidelity capture kept per process."""
import pytest
import torch

from models import pretrained

pytestmark = pytest.mark.skipif(not (pretrained.cache_dir() / "smollm2_135m" / "MANIFEST.json").exists(),
                                reason="SmolLM2 is not fetched (python scripts/fetch_assets.py)")


@pytest.fixture(scope="module")
def model():
    return pretrained.load("smollm2_135m")


def test_batched_teacher_forcing_equals_one_forward_per_prompt(model):
    from tasks import real_text

    tok = model.tokenizer
    hay = real_text.essay_tokens(tok, 600)
    prompts, answers = [], []
    for i, (depth, value) in enumerate([(0.0, "1234567"), (0.5, "7654321"), (1.0, "5550123")]):
        p, a = real_text.needle_prompt(tok, hay[i * 50:], 120, depth, value)
        prompts.append(p)
        answers.append(a)
    prompts.append(prompts[0][:-3])  # another length: its own batch
    answers.append(answers[0])
    got = real_text.teacher_forced(model, prompts, answers, batch_size=3)
    with torch.no_grad():
        for p, a, g in zip(prompts, answers, got):
            logits = model(input_ids=torch.tensor([p + a])).logits[0]
            want = logits[len(p) - 1:].argmax(-1).tolist()  # the prediction at each answer position and after
            assert g == want and len(g) == len(a) + 1


def test_capture_is_kept_for_the_same_setting(model):
    from tasks import real_text

    calls = []
    h = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        a = real_text.capture_prose(model, "austen", 64, [0, 29])
        b = real_text.capture_prose(model, "austen", 64, [0, 29])
        assert b is a and len(calls) == 1 and a[0][0].shape == (1, 9, 64, 64)
        real_text.capture_prose(model, "austen", 64, [0])  # another setting: captured anew
        assert len(calls) == 2
    finally:
        h.remove()
