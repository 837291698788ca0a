"""SmolLM2-135M-Instruct (conf/model/smollm2_135m.yaml): see ``models.pretrained``."""
from models.pretrained import PretrainedLM


class SmolLM2(PretrainedLM):
    model_name = "smollm2_135m"
