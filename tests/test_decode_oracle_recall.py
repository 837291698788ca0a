"""scripts/decode_oracle_recall.py: the top-k mass, against a sort written here."""
import math

import torch

from scripts.decode_oracle_recall import oracle
from tasks.fidelity import structured_qkv


def test_oracle_is_the_sorted_softmax_mass_and_grows_with_k():
    got = oracle(300, [1, 4, 300], D=16, heads=2, rows=3)
    q, k, _ = structured_qkv(1, 2, 1, 300, 16, "cpu", torch.float32, 0, True)
    p = torch.softmax((q[0, :, -3:] @ k[0, 0].T) / math.sqrt(16), -1)
    srt = p.sort(-1, descending=True).values
    for n in (1, 4):
        assert abs(got[n] - float(srt[..., :n].sum(-1).mean())) < 1e-6
    assert abs(got[300] - 1.0) < 1e-5 and got[1] <= got[4] <= got[300]
