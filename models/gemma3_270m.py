"""Gemma-3-270M (conf/model/gemma3_270m.yaml): see ``models.pretrained``. Only its
full-attention layers run the method (``layers: full_attention``); its sliding-window layers
keep their window through the model's own attention."""
from models.pretrained import PretrainedLM


class Gemma3(PretrainedLM):
    model_name = "gemma3_270m"
