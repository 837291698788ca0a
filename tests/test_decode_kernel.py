"""The split-K decode kernel (methods/kernels/decode.py) against a softmax written here: dense
over the cache, with per-batch lengths, and through an index list (the gather path), grouped-
query heads, several splits merged. CPU under TRITON_INTERPRET=1 (fp32), the GPU in bf16."""
import math

import pytest
import torch

from methods.kernels import decode

pytestmark = pytest.mark.skipif(not decode.usable(torch.zeros(1)) and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _expected(q, k, v, keep):
    """Softmax attention of q [B, H, D] over the keys keep[b, hk] (bool [B, Hkv, T]) of k, v."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    lse = torch.full((B, H), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            sel = keep[b, hk].nonzero().flatten()
            if len(sel) == 0:
                continue
            s = (k[b, hk, sel].double() @ q[b, h].double()) / math.sqrt(D)
            p = torch.softmax(s, 0)
            out[b, h] = p @ v[b, hk, sel].double()
            lse[b, h] = torch.logsumexp(s, 0)
    return out, lse


def _cache(B=2, H=6, Hkv=2, T=200, D=32, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g) * 1.5
    v = torch.randn(B, Hkv, T, D, generator=g)
    return (t.to(device, dtype) for t in (q, k, v))


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("splits", [1, 3, None])
def test_dense_decode_equals_softmax_over_the_cache(splits):
    q, k, v = _cache(device=_device())
    out, lse = decode.decode_attention(q, k, v, splits=splits, block_n=16)
    want, want_lse = _expected(q.cpu(), k.cpu(), v.cpu(), torch.ones(k.shape[:3], dtype=torch.bool))
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-4)


def test_lengths_cut_each_batch_elements_cache():
    q, k, v = _cache(T=130, device=_device())
    lengths = torch.tensor([130, 37], dtype=torch.int32, device=q.device)
    out, lse = decode.decode_attention(q, k, v, lengths=lengths, splits=4, block_n=16)
    keep = torch.zeros(k.shape[:3], dtype=torch.bool)
    keep[0] = True
    keep[1, :, :37] = True
    want, want_lse = _expected(q.cpu(), k.cpu(), v.cpu(), keep)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-4)


def test_gather_reads_only_the_indexed_keys_per_kv_head():
    q, k, v = _cache(T=150, device=_device())
    B, Hkv, T = k.shape[:3]
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:40] for _ in range(Hkv)]) for _ in range(B)])
    idx[0, 1, 30:] = -1           # a shorter list: -1 is no key
    idx[1, 0, 5] = 140            # past this element's length below: not read
    lengths = torch.tensor([150, 120], dtype=torch.int32)
    keep = torch.zeros(B, Hkv, T, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for p in idx[b, h].tolist():
                if 0 <= p < int(lengths[b]):
                    keep[b, h, p] = True
    out, lse = decode.decode_attention(q, k, v, lengths=lengths.to(q.device), indices=idx.to(q.device),
                                       splits=3, block_n=16)
    want, want_lse = _expected(q.cpu(), k.cpu(), v.cpu(), keep)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-4)


def test_a_head_with_no_key_gives_zeros_and_minus_inf():
    q, k, v = _cache(B=1, T=20, device=_device())
    idx = torch.full((1, 2, 8), -1, dtype=torch.int32, device=q.device)
    idx[0, 0, :3] = torch.tensor([0, 5, 7])
    out, lse = decode.decode_attention(q, k, v, indices=idx, block_n=16)
    assert torch.all(out[0, 3:] == 0) and torch.all(torch.isinf(lse[0, 3:]))  # KV head 1's query heads
    want, _ = _expected(q.cpu(), k.cpu(), v.cpu(), torch.zeros(1, 2, 20, dtype=torch.bool).index_fill_(2, torch.tensor([0, 5, 7]), True))
    torch.testing.assert_close(out[0, :3].cpu().double(), want[0, :3], atol=1e-4, rtol=1e-4)


def test_gather_without_lengths_reads_positions_past_the_index_count():
    """Positions anywhere in the cache, more of them than the list is long (a bound taken from
    the list's length instead of the cache's would drop them)."""
    q, k, v = _cache(B=1, T=300, device=_device())
    idx = torch.tensor([[[290, 3, 150, 299, 64, 200, 17, 250], [0, 1, 2, 280, 281, 282, 100, -1]]],
                       dtype=torch.int32)
    keep = torch.zeros(1, 2, 300, dtype=torch.bool)
    for h in range(2):
        keep[0, h, [p for p in idx[0, h].tolist() if p >= 0]] = True
    out, lse = decode.decode_attention(q, k, v, indices=idx.to(q.device), splits=2, block_n=16)
    want, want_lse = _expected(q.cpu(), k.cpu(), v.cpu(), keep)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-4)


def test_owner_bits_give_each_query_head_of_a_group_its_own_keys():
    """With ``owners`` query head g of a KV head's group attends only the listed positions whose
    bit g is set (a softmax per query head written here); a head owning none gives zeros."""
    q, k, v = _cache(T=90, device=_device())  # B=2, H=6, Hkv=2: groups of 3
    B, H, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = H // Hkv
    g = torch.Generator().manual_seed(2)
    owners = torch.randint(0, 2 ** G, (B, Hkv, T), generator=g, dtype=torch.int32)
    owners[1, 1] &= ~2  # query head 4 (batch 1) owns nothing
    idx = torch.full((B, Hkv, T + 7), -1, dtype=torch.int32)
    idx[:, :, :T] = torch.stack([torch.stack([torch.randperm(T, generator=g) for _ in range(Hkv)]) for _ in range(B)])
    idx[0, 0, 3] = -1  # a position not listed is not read, whatever its bits
    out, lse = decode.decode_attention(q, k, v, indices=idx.to(q.device), owners=owners.to(q.device),
                                       splits=3, block_n=16)
    for b in range(B):
        for h in range(H):
            hk, bit = h // G, h % G
            sel = [p for p in idx[b, hk].tolist() if p >= 0 and (int(owners[b, hk, p]) >> bit) & 1]
            if not sel:
                assert torch.all(out[b, h] == 0) and torch.isinf(lse[b, h])
                continue
            s = (k[b, hk, sel].cpu().double() @ q[b, h].cpu().double()) / math.sqrt(D)
            want = torch.softmax(s, 0) @ v[b, hk, sel].cpu().double()
            torch.testing.assert_close(out[b, h].cpu().double(), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(float(lse[b, h]), float(torch.logsumexp(s, 0)), atol=1e-4, rtol=1e-4)


def test_owners_need_indices_and_the_cache_shape():
    q, k, v = _cache(B=1, T=20)
    with pytest.raises(ValueError, match="owners must be"):
        decode.decode_attention(q, k, v, owners=torch.zeros(1, 2, 20, dtype=torch.int32))
    with pytest.raises(ValueError, match="owners must be"):
        decode.decode_attention(q, k, v, indices=torch.zeros(1, 2, 4, dtype=torch.int32),
                                owners=torch.zeros(1, 2, 19, dtype=torch.int32))


@pytest.mark.parametrize("bad", ["q_shape", "heads", "lengths", "indices"])
def test_bad_input_is_named(bad):
    q, k, v = _cache(B=1, T=20)
    args = {"q_shape": (q[:, None], k, v), "heads": (q[:, :5], k, v)}.get(bad, (q, k, v))
    kw = {"lengths": {"lengths": torch.tensor([3.0])},
          "indices": {"indices": torch.zeros(1, 3, 4, dtype=torch.int32)}}.get(bad, {})
    with pytest.raises(ValueError, match={"q_shape": "q \\[B, H, D\\]", "heads": "multiple of KV heads",
                                          "lengths": "lengths", "indices": "indices"}[bad]):
        decode.decode_attention(*args, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_decode_on_gpu_matches_sdpa():
    q, k, v = _cache(B=2, H=32, Hkv=8, T=70000, D=128, dtype=torch.bfloat16, device="cuda")
    out, _ = decode.decode_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_launch_for_reads_the_bucket_at_or_below_the_shape(tmp_path):
    import json

    entries = [{"head_dim": 128, "batch_kv": bk, "n_keys": n, "block_n": bn, "num_warps": 4, "num_stages": 2,
                "programs_per_sm": pps, "gpu": "test"}
               for bk, n, bn, pps in [(8, 32768, 32, 1), (8, 131072, 64, 2), (64, 32768, 128, 3)]]
    path = tmp_path / "launch.json"
    path.write_text(json.dumps({"entries": entries}))
    pick = lambda *a: (lambda e: (e["block_n"], e["programs_per_sm"]))(decode.launch_for(*a, path=str(path)))  # noqa: E731
    assert pick(128, 8, 32768) == (32, 1)
    assert pick(128, 8, 100000) == (32, 1)     # the largest length at or below
    assert pick(128, 8, 1 << 20) == (64, 2)
    assert pick(128, 8, 1024) == (32, 1)       # below every bucket: the smallest
    assert pick(128, 32, 1 << 20) == (64, 2)   # batch x KV heads 32: the bucket of 8
    assert pick(128, 64, 1 << 20) == (128, 3)
    assert pick(128, 4, 32768) == (32, 1)
    assert decode.launch_for(64, 8, 32768, path=str(path))["source"] == "default"  # no entry for the head dim
    assert decode.launch_for(64, 8, 32768, path=str(path))["block_n"] == decode.DECODE_LAUNCH["block_n"]
