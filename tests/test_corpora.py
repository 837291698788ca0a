"""The R lazy-load reader, on a database written in the test from R's serialization format
(XDR, version 2), and the real texts when they are in the asset cache."""
import gzip
import struct
import zlib

import pytest

from tasks import corpora


def _i(*xs):
    return b"".join(struct.pack(">i", x) for x in xs)


def _chars(s: str) -> bytes:  # CHARSXP, ASCII
    b = s.encode()
    return _i(9 | (64 << 12), len(b)) + b


def _strsxp(items) -> bytes:
    return _i(16, len(items)) + b"".join(_chars(s) for s in items)


def _named_list(named: dict) -> bytes:
    """VECSXP with a names attribute: flags carry the has-attributes bit (1 << 9)."""
    body = _i(19 | (1 << 9), len(named)) + b"".join(named.values())
    attrs = _i(2 | (1 << 10)) + _i(1) + _chars("names") + _strsxp(list(named)) + _i(254)
    return body + attrs


def _serialize(obj: bytes) -> bytes:
    return b"X\n" + _i(2, 0x040200, 0x020300) + obj


@pytest.fixture
def database(tmp_path):
    books = {"first": ["CHAPTER 1", "", "It was a dark night."], "second": ["Call me Ishmael."]}
    rdb, index = b"", {}
    for name, lines in books.items():
        raw = _serialize(_strsxp(lines))
        chunk = struct.pack(">i", len(raw)) + zlib.compress(raw)
        index[name] = _i(13, 2, len(rdb), len(chunk))  # INTSXP [offset, length]
        rdb += chunk
    rdx = _serialize(_named_list({"variables": _named_list(index), "references": _named_list({}),
                                  "compressed": _i(10, 1, 1)}))
    (tmp_path / "x.rdb").write_bytes(rdb)
    (tmp_path / "x.rdx").write_bytes(gzip.compress(rdx))
    return tmp_path, books


def test_lazyload_reader_returns_every_character_vector(database):
    folder, books = database
    assert corpora.read_lazyload(folder / "x.rdb", folder / "x.rdx") == books


def test_truncated_object_is_an_error(database):
    folder, _ = database
    rdb = (folder / "x.rdb").read_bytes()
    bad = struct.pack(">i", 10_000) + rdb[4:]  # header promises more bytes than the stream holds
    (folder / "x.rdb").write_bytes(bad)
    with pytest.raises(ValueError, match="object 'first'"):
        corpora.read_lazyload(folder / "x.rdb", folder / "x.rdx")


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch_assets"):
        corpora.prose("austen")
    with pytest.raises(ValueError, match="unknown prose source"):
        corpora.prose("ulysses")


@pytest.mark.skipif(not (corpora.cache_dir() / "prose" / "MANIFEST.json").exists(),
                    reason="the prose asset is not fetched (python scripts/fetch_assets.py)")
def test_real_prose_and_essays():
    austen = corpora.prose("austen")
    assert austen.startswith("SENSE AND SENSIBILITY") and "Persuasion" in austen[-700_000:]
    assert "Call me Ishmael" in corpora.prose("mobydick")
    essays = corpora.essays()
    assert len(essays) >= 40 and all(text for _, text in essays)
