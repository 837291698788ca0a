"""Files the harness loads (data cache, checkpoints) are read with weights_only=True: a crafted
pickle is refused and its code never runs."""
import hashlib
import json
import pickle

import pytest
import torch

from tasks import cache


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would write the marker file
        return (_touch, (self.marker,))


def _touch(path):
    with open(path, "w") as f:
        f.write("pwned")


def test_a_crafted_cache_file_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path))
    key = {"task": "x"}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = tmp_path / "kind" / f"{digest}.pt"
    path.parent.mkdir()
    marker = tmp_path / "marker"
    torch.save({"data": _Payload(str(marker))}, path, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        cache.cached("kind", key, lambda: {"data": torch.zeros(1)})
    assert not marker.exists()


def test_the_cache_round_trips_plain_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_DATA", str(tmp_path))
    data = {"train": (torch.arange(4), torch.zeros(4)), "kind": "lm", "pad_id": None}
    cache.cached("k", {"a": 1}, lambda: data)
    again = cache.cached("k", {"a": 1}, lambda: pytest.fail("built twice"))
    assert torch.equal(again["train"][0], torch.arange(4)) and again["kind"] == "lm"
