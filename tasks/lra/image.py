"""LRA Image: CIFAR-10 as 1024 grayscale pixels (Tay et al. 2021, Sec. 2.4), loaded by
tasks/lra/hub.py."""
from __future__ import annotations

from tasks.lra import hub
from tasks.lra.base import LRATask


class Image(LRATask):
    def load(self) -> dict:
        return hub.image(self.cfg)
