"""What every task is: its config's keys (conf/task/*.yaml, built through their ``_target_``),
read as ``self.cfg.<key>``; each task adds what its runner asks of it (inputs, data,
evaluation)."""
from __future__ import annotations

from omegaconf import OmegaConf


class Task:
    def __init__(self, **settings):
        self.cfg = OmegaConf.create(settings)


def to_device(batch, device):
    """A batch (a tensor, or a tuple of them for two-document tasks) on ``device``."""
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)
