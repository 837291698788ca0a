"""step_record = "bytes" (issue 24 follow-up): what models.hf_decode asks of a decode path's
accounting during generation: the same bytes as the full record, kept on device, with no host
synchronisation (no tensor turned into a Python number) and no positions."""
import contextlib

import pytest
import torch

from tests.decode_helpers import B, load, qkv

CASES = [
    ("quest", dict(token_budget=8, page_size=4)),
    ("retrieval_attention", dict(top_k=4, num_sink=2, window=4, nprobe=2, query_links=2)),
    ("squeezed_attention", dict(percent_clusters=20.0, observation_window=4)),
    ("squeezed_attention", dict(percent_clusters=20.0, observation_window=4, hierarchical=True,
                                percent_clusters_l1=8.0)),
]


@contextlib.contextmanager
def host_reads_refused():
    """While inside: a tensor turned into a Python number or bool (a host synchronisation on a
    GPU) raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    with pytest.MonkeyPatch.context() as m:
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            m.setattr(torch.Tensor, name, refuse)
        yield


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] + ("_hier" if c[1].get("hierarchical") else "") for c in CASES])
def test_bytes_record_equals_the_full_one_without_host_reads(name, kw):
    L, T = 30, 34
    q, k, v = qkv(T, seed=11)
    full, lean = load(name, **kw), load(name, **kw)
    lean.step_record = "bytes"
    caches = [p.new_cache(B, T, q.dtype) for p in (full, lean)]
    for p, c in zip((full, lean), caches):
        p.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L], c)
    for i in range(L, T):
        one = [t[:, :, i:i + 1] for t in (q, k, v)]
        want = full.decode(*one, caches[0])
        lean.append(caches[1], one[1], one[2])
        sel = lean.select(one[0], caches[1])
        got = lean.attend_selected(one[0], caches[1], sel)
        with host_reads_refused():  # the accounting alone: the checks of decode() read their inputs
            info = lean.step_info(caches[1], sel)
        torch.testing.assert_close(got, want)
        assert "positions" not in info and "stats" not in info
        for key in ("bytes_read", "index_bytes", "kv_bytes"):
            assert float(info[key]) == full.last_step[key]
        assert full.last_step["kv_bytes"] > 0


def test_the_guard_catches_a_host_read():
    """The guard above can fail: the full record (float of its byte counts) raises under it."""
    q, k, v = qkv(20, seed=1)
    m = load("quest", token_budget=8, page_size=4)
    cache = m.new_cache(B, 20, q.dtype)
    m.prefill(q[:, :, :19], k[:, :, :19], v[:, :, :19], cache)
    m.append(cache, k[:, :, 19:], v[:, :, 19:])
    sel = m.select(q[:, :, 19:], cache)
    with host_reads_refused(), pytest.raises(AssertionError, match="host"):
        m.step_info(cache, sel)


def test_model_generation_records_bytes_only_and_the_same_figures(tmp_path):
    """models.hf_decode puts every layer's path on the bytes record (device tensors, summed once
    by Session.stats); a session switched back to the full record after its prefill reports the
    same bytes per step."""
    transformers = pytest.importorskip("transformers")
    from models import hf_decode

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    model = hf_decode.load(str(tmp_path), "retrieval_attention", top_k=4, num_sink=2, window=4, nprobe=2)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(1))
    step = torch.tensor([[3], [5]])
    stats = []
    for record in ("bytes", "full"):
        s = hf_decode.Session(model, 33)
        s.prefill(ids)
        for la in s.cache.layers:
            assert la.path.step_record == "bytes"
            la.path.step_record = record
        for _ in range(3):
            s.step(step)
        kinds = {type(b) for la in s.cache.layers for b in la.bytes_read}
        assert kinds == ({torch.Tensor} if record == "bytes" else {float})
        stats.append([x["bytes_read_per_step"] for x in s.stats()])
    assert stats[0] == pytest.approx(stats[1], rel=1e-12) and min(stats[0]) > 0
