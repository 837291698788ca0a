"""LRA Retrieval: AAN citation pairs at byte level (Tay et al. 2021, Sec. 2.3), loaded by
tasks/lra/hub.py."""
from __future__ import annotations

from tasks.lra import hub
from tasks.lra.base import LRATask


class Retrieval(LRATask):
    def load(self) -> dict:
        return hub.retrieval(self.cfg)
