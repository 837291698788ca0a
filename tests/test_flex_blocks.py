"""FlexAttention block masks built from the methods' block lists (issue 28): the blocks equal
those of the mask evaluated on every element, full blocks are wholly kept, and the flex output
equals the reference (masked dense attention) at small shapes on the CPU."""
import pytest
import torch

import methods
from methods import masks
from tests.conftest import seeded_qkv

BLK = 16  # FlexAttention's block in these tests (128 on a GPU): T = 88 leaves a partial last block
T = 88

CASES = {  # name: (method, kwargs, causal settings, full blocks: exactly those of the mask (True), none
    # (False), or some of the mask's wholly kept blocks (None: a block kept only by a union stays partial)
    "sliding_window": ("sliding_window", dict(window=20), (False, True), True),
    "bigbird": ("bigbird", dict(block_size=8, num_window_blocks=3, num_random_blocks=2), (False, True), True),
    "minference-a_shape": ("minference", dict(pattern="a_shape", num_sink=20, window=24), (True,), True),
    "minference-block_sparse": ("minference", dict(pattern="block_sparse", block_size=8, top_k_blocks=3),
                                (True,), True),
    "minference-vs-ranges": ("minference", dict(pattern="vertical_slash", vertical_size=6, slash_size=4,
                                                forced_sink=2, forced_local=3), (True,), False),
    "minference-vs-lines": ("minference", dict(pattern="vertical_slash", vertical_size=6, slash_size=4,
                                               forced_sink=2, forced_local=3, slash_mode="lines"), (True,), False),
    "hip": ("hip", dict(top_k=8, block_q=8, block_k=2, window=6), (False, True), None),
    "streaming_llm": ("streaming_llm", dict(num_sink=20, window=24), (True,), None),
    "moa": ("moa", dict(alpha=8, beta=0.2, num_sink=20), (True,), None),
    "s2_attention": ("s2_attention", dict(block_size=8, local_blocks=2, vert_stride=3), (False, True), True),
    "biformer": ("biformer", dict(region_size=8, topk=3, shared_routing=False), (False,), True),
    "sample_attention": ("sample_attention", dict(alpha=0.9, row_ratio=0.1, window_ratio=0.15), (True,), None),
    "star_attention": ("star_attention", dict(num_hosts=3, query_len=20, anchor_size=12), (True,), None),
    "sparse_transformer-strided": ("sparse_transformer", dict(pattern="strided", stride=12), (False, True), None),
    "sparse_transformer-strided-1": ("sparse_transformer", dict(pattern="strided", stride=1), (False, True), True),
    "sparse_transformer-fixed": ("sparse_transformer", dict(pattern="fixed", stride=8, summary=3), (False, True),
                                 None),
    "sparse_transformer-fixed-split": ("sparse_transformer", dict(pattern="fixed", stride=24, summary=5,
                                                                  heads="split"), (False, True), True),
    "sparse_transformer-strided-split": ("sparse_transformer", dict(pattern="strided", stride=20, heads="split"),
                                         (False, True), True),
    "sea": ("sea", dict(block_size=8, top_k_blocks=3, num_features=16), (False, True), True),
    "seer_attention": ("seer_attention", dict(block_size=8, hidden_size=16, gate="untrained", selection="topk",
                                              nz_ratio=0.4), (False, True), True),
    "sparge": ("sparge", dict(block_q=16, block_k=8, sim_threshold=0.0, cdf_threshold=0.6), (False, True), True),
    "routing_transformer": ("routing_transformer", dict(num_clusters=4, local_window=5), (False, True), None),
    "routing_transformer-no-window": ("routing_transformer", dict(num_clusters=3, balanced=False), (False, True),
                                      False),
    "hip-no-window": ("hip", dict(top_k=16, block_q=4, block_k=4, window=0), (False, True), True),
}


def element_blocks(mask, blk):
    """(any, all) per block of a [B, H, T, T] bool mask, from every element (padding: False)."""
    B, H, tq, tk = mask.shape
    nq, nk = -(-tq // blk), -(-tk // blk)
    x = torch.zeros(B, H, nq * blk, nk * blk, dtype=torch.bool)
    x[:, :, :tq, :tk] = mask
    x = x.view(B, H, nq, blk, nk, blk)
    return x.any(5).any(3), x.all(5).all(3)


def listed(num, idx, nk):
    """[B, H, nq, nk] bool of the blocks a BlockMask lists (num, idx: its kv counts and indices)."""
    lay = torch.zeros(*num.shape, nk + 1, dtype=torch.bool)
    live = torch.arange(idx.shape[-1]).view(1, 1, 1, -1) < num.unsqueeze(-1)
    lay.scatter_(-1, torch.where(live, idx.long(), nk), True)
    return lay[..., :nk]


@pytest.mark.parametrize("case", list(CASES))
def test_block_lists_equal_the_element_mask_and_the_reference(case):
    name, kw, settings, exact_full = CASES[case]
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16)
    ref = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl="reference", **kw).double()
    m = methods.load(name, num_heads=4, num_kv_heads=2, head_dim=16, impl="flex", **kw).double()
    ref.load_state_dict(m.state_dict())  # methods with weights (SeerAttention's gate): the same
    m.eval()  # the Routing Transformer's k-means steps only in training (mask_mod below runs with grad on)
    m.flex_block_size = BLK
    nk = -(-T // BLK)
    for causal in settings:
        with torch.no_grad():
            out = m(q, k, v, causal=causal)
            torch.testing.assert_close(out, ref(q, k, v, causal=causal), rtol=1e-9, atol=1e-10)
        assert m.last_path == "flex" and m.last_flex_build == "from_kv_blocks"
        mod = m.mask_mod(q, k, causal)
        if causal:
            mod = masks.and_masks(mod, masks.causal(0))
        el_any, el_all = element_blocks(masks.materialize(mod, 2, 4, T, T), BLK)
        bm = m._flex_block_mask(mod, q, k, causal, None)
        part = listed(bm.kv_num_blocks, bm.kv_indices, nk)
        full = listed(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
        assert not (part & full).any()
        assert torch.equal((part | full).expand_as(el_any), el_any)  # the blocks the mask touches, exactly
        assert not (full & ~el_all).any()  # a full block is wholly kept (no mask function runs there)
        if exact_full:
            assert torch.equal(full.expand_as(el_all), el_all)
        elif exact_full is False:
            assert not full.any()
        if name == "minference":  # the vertical-slash cells by chunks of one block row: the same blocks
            m.vs_cells = 1
            bm = m._flex_block_mask(mod, q, k, causal, None)
            assert torch.equal(listed(bm.kv_num_blocks, bm.kv_indices, nk), part)


def test_nsa_block_lists_equal_the_element_mask_and_the_reference():
    kw = dict(block_size=8, num_selected=3, window=12, compress_block=8, compress_stride=4)
    q, k, v = seeded_qkv(B=2, H=4, Hkv=2, T=T, D=16)
    m = methods.load("nsa", num_heads=4, num_kv_heads=2, head_dim=16, impl="flex", **kw).double()
    ref = methods.load("nsa", num_heads=4, num_kv_heads=2, head_dim=16, impl="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    m.flex_block_size = BLK
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, causal=True), ref(q, k, v, causal=True), rtol=1e-9, atol=1e-10)
        assert m.last_path == "flex" and m.last_flex_build == "from_kv_blocks"
        _, sel = m._compressed(q, k, v, None)
    nsel = -(-T // 8)
    chosen = m.chosen_mask(sel, nsel)  # [B, Hkv, T, nsel]
    kv = torch.arange(T)
    sel_mask = chosen[:, :, :, kv // 8].repeat_interleave(2, 1) & (kv.view(1, T) <= kv.view(T, 1))
    win_mask = ((kv.view(T, 1) - kv.view(1, T)) < 12) & (kv.view(1, T) <= kv.view(T, 1))
    mods = [lambda b, h, qi, ki: chosen[b, h // 2, qi, ki // 8] & (ki <= qi),
            lambda b, h, qi, ki: ((qi - ki) < 12) & (ki <= qi)]
    bms = m._flex_block_masks(chosen, mods, T, 2)
    nk = -(-T // BLK)
    for bm, mask in zip(bms, (sel_mask, win_mask.expand(2, 4, T, T))):
        el_any, el_all = element_blocks(mask, BLK)
        part = listed(bm.kv_num_blocks, bm.kv_indices, nk)
        full = listed(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
        assert torch.equal((part | full).expand_as(el_any), el_any)
        assert torch.equal(full.expand_as(el_all), el_all)


@pytest.mark.parametrize("word_bits,dtype", [(64, torch.int64), (8, torch.uint8)])
def test_packed_layout_is_the_layout(word_bits, dtype):
    """masks.pack_bits: 64-bit words (Routing Transformer's cluster sets) or bytes (HiP's layout,
    read per element by its mask function): every bit, the sign bit included, is the layout's."""
    from methods.masks import pack_bits

    g = torch.Generator().manual_seed(0)
    lay = torch.rand(2, 3, 5, 150, generator=g) < 0.5
    lay[..., word_bits - 1] = True  # the top bit of the first word
    words = pack_bits(lay, rows=4, word_bits=word_bits)
    j = torch.arange(150)
    unpacked = ((words[..., j // word_bits].to(torch.int64) >> (j % word_bits)) & 1) != 0
    assert words.dtype == dtype and words.shape == (2, 3, 5, -(-150 // word_bits)) and torch.equal(unpacked, lay)
    with pytest.raises(ValueError, match="word_bits"):
        pack_bits(lay, word_bits=32)
