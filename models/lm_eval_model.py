"""An lm-eval model, ``attnbench``: a Hugging Face causal LM with its attention through any
attnbench method, so that any lm-eval task runs with any method.

    python -m models.lm_eval_model --model attnbench \\
        --model_args pretrained=PATH,method=minference,method.pattern=a_shape --tasks TASKS
(the same arguments as ``lm_eval``; this entry point registers the model first). Method
hyperparameters are ``method.<name>=<value>`` model arguments. ``pretrained`` is a path, a hub
name, or a model of the asset cache (``smollm2_135m``: ``models.pretrained``, checked against
its hash). ``layers`` (``models.hf.routed_layers``; default ``full_attention``: every layer
of SmolLM2, the full-attention layers of Gemma 3) chooses the layers that run the method.
Records like the other runs': ``attnbench model=smollm2_135m task=lm_harness
method=M`` (tasks/lm_harness.py: a local task generated from the essays, read by lm-eval).
"""
from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from models import hf


@register_model("attnbench")
class AttnbenchLM(HFLM):
    def __init__(self, pretrained, method: str = "dense", **kwargs):
        from models import pretrained as assets

        hf.register()
        if pretrained in assets.SPECS:  # a model of the asset cache, by name
            pretrained = str(assets.checkpoint(pretrained)[0])
        spec = {"name": method}
        for k in [k for k in kwargs if k.startswith("method.")]:
            spec[k.split(".", 1)[1]] = kwargs.pop(k)
        layers = kwargs.pop("layers", "full_attention")  # a model's sliding-window layers keep their window
        super().__init__(pretrained=pretrained, attn_implementation=hf.NAME, **kwargs)
        self.model.config.attnbench_method = spec
        self.model.config.attnbench_layers = hf.routed_layers(self.model.config, layers)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
