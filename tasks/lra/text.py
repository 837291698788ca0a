"""LRA Text: IMDB reviews at byte level (Tay et al. 2021, Sec. 2.2), loaded by tasks/lra/hub.py."""
from __future__ import annotations

from tasks.lra import hub
from tasks.lra.base import LRATask


class Text(LRATask):
    def load(self) -> dict:
        return hub.text(self.cfg)
