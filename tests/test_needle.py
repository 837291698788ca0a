"""Needle in a haystack: exact lengths, depths, determinism, errors, scoring, heatmap."""
import pytest

from analysis.plots import needle_heatmap
from tasks import needle
from tasks.text import ByteTokenizer

FILLER = ("Now is the winter of our discontent made glorious summer by this sun of York; "
          "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. ") * 60


@pytest.mark.parametrize("length", [200, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_exact_length_and_needle_at_depth(length, depth):
    tok = ByteTokenizer()
    p = needle.make_prompt(tok, FILLER, length, depth, seed=3)
    assert len(p.ids) == length
    text = tok.decode(p.ids)
    assert f"is {p.answer}." in text and text.rstrip().endswith("is")
    needle_ids = tok.encode(" " + needle.NEEDLE.format(key=p.key, value=p.answer) + " ")
    n_hay = length - len(needle_ids) - len(tok.encode(needle.QUESTION.format(key=p.key)))
    assert p.ids[p.needle_start:p.needle_start + len(needle_ids)] == needle_ids
    assert abs(p.needle_start - depth * n_hay) <= 1
    assert p == needle.make_prompt(tok, FILLER, length, depth, seed=3)  # deterministic


def test_prompt_errors_are_clear():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="does not fit the model's window of 512"):
        needle.make_prompt(tok, FILLER, 1024, 0.5, 0, window=512)
    with pytest.raises(ValueError, match="shorter than the needle"):
        needle.make_prompt(tok, FILLER, 20, 0.5, 0)
    with pytest.raises(ValueError, match="filler text has"):
        needle.make_prompt(tok, "short", 500, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        needle.make_prompt(tok, FILLER, 500, 1.5, 0)


def test_grid_scoring_and_heatmap(tmp_path):
    tok = ByteTokenizer()
    prompts = needle.grid(tok, FILLER, [256, 512], [0.0, 0.5, 1.0], seed=1)
    assert len(prompts) == 6 and len({p.answer for p in prompts}) == 6
    cells = []
    for i, p in enumerate(prompts):  # an oracle that answers right at short lengths only
        out = tok.encode(f" {p.answer}.") if p.length == 256 else tok.encode(" 0000000.")
        cells.append({"length": p.length, "depth": p.depth, "score": needle.score(tok, out, p.answer)})
    assert [c["score"] for c in cells] == [1.0] * 3 + [0.0] * 3
    assert needle_heatmap(cells, tmp_path / "h.png", "oracle").stat().st_size > 1000
