"""SeerAttention (methods/seer_attention.py): the AttnGate's pooling and scores, the distillation
target and loss, the block selection and the attention over it, each against a computation
written here; the gate's file format; the training script at tiny size on SmolLM2."""
from __future__ import annotations

import math

import pytest
import torch

import methods
from methods.seer_attention import SeerAttention, distill_target
from tests.conftest import seeded_qkv

H, HKV, D, BS, HID = 4, 2, 16, 16, 16  # blocks of 16: the smallest tile of the block-sparse kernel


def build(**kw):
    kw = {"block_size": BS, "hidden_size": HID, "gate": "untrained", "impl": "reference", **kw}
    return methods.load("seer_attention", num_heads=H, num_kv_heads=HKV, head_dim=D, **kw)


def gate_by_loops(m, q, k, causal):
    """G [B, H, nq, nk] from the definition: q blocks by avg, k blocks by max | min | avg over
    the block's tokens (positions p // bs, queries the last Tq of Tk), per-head linear maps,
    scores / sqrt(hidden), softmax over the visible key blocks."""
    B, _, tq, _ = q.shape
    tk = k.shape[2]
    off = tk - tq
    qb = sorted({(i + off) // BS for i in range(tq)})
    nk = math.ceil(tk / BS)
    Wq, Wk = m.linear_q.weight.detach().double(), m.linear_k.weight.detach().double()
    G = torch.zeros(B, H, len(qb), nk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for r, blk in enumerate(qb):
                rows = [i for i in range(tq) if (i + off) // BS == blk]
                pq = q[b, h, rows].double().mean(0) @ Wq[h]
                scores = []
                for j in range(nk):
                    kj = k[b, h // (H // HKV), j * BS:min((j + 1) * BS, tk)].double()
                    pk = torch.cat([kj.max(0).values, kj.min(0).values, kj.mean(0)]) @ Wk[h // (H // HKV)]
                    ok = (j <= blk) if causal else True
                    scores.append(float(pq @ pk) / math.sqrt(HID) if ok else -math.inf)
                G[b, h, r] = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
    return G


@pytest.mark.parametrize("tq,tk,causal", [(37, 37, True), (13, 37, True), (29, 29, False)])
def test_gate_pooling_and_scores_against_loops(tq, tk, causal):
    torch.manual_seed(0)
    m = build()
    q, k, _ = seeded_qkv(B=2, H=H, Hkv=HKV, T=tq, D=D, tk=tk, dtype=torch.float32)
    got = m.gate_scores(q, k, causal).double()
    want = gate_by_loops(m, q, k, causal)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def target_by_loops(q, k, causal):
    """The dense map (fp64, causal), max over each (query block, key block) tile, rows / sum."""
    B, _, T, _ = q.shape
    kk = k.double().repeat_interleave(H // HKV, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1)
    n = math.ceil(T / BS)
    gt = torch.zeros(B, H, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            gt[:, :, i, j] = p[:, :, i * BS:(i + 1) * BS, j * BS:(j + 1) * BS].amax((-1, -2))
    return gt / gt.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
def test_distillation_target_is_the_block_max_pooled_dense_map(causal):
    q, k, _ = seeded_qkv(B=2, H=H, Hkv=HKV, T=35, D=D, dtype=torch.float32)
    got = distill_target(q, k, BS, causal).double()
    assert torch.allclose(got, target_by_loops(q, k, causal), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, H, 3, dtype=torch.float64), atol=1e-6)


def test_distill_loss_is_kl_and_training_reduces_it_with_only_the_gate_learning():
    torch.manual_seed(0)
    m = build()
    q, k, _ = seeded_qkv(B=1, H=H, Hkv=HKV, T=96, D=D, dtype=torch.float32, seed=5)
    q = q * 3  # peaked attention: a target far from uniform
    gt = target_by_loops(q, k, True)
    g = gate_by_loops(m, q, k, True)
    kl = torch.where(gt > 0, gt * (gt.clamp_min(1e-300).log() - g.clamp_min(1e-300).log()), 0.0).sum(-1).mean()
    assert m.distill_loss(q, k).item() == pytest.approx(float(kl), rel=1e-4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = m.distill_loss(q, k)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.distill_loss(q, k).item() < 0.6 * first
    assert {n for n, p in m.named_parameters()} == {"linear_q.weight", "linear_k.weight"}


def selected_by_definition(m, q, k, causal, selection):
    G = gate_by_loops(m, q, k, causal)
    nq, nk = G.shape[-2:]
    vis = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        vis = torch.ones(nq, nk, dtype=torch.bool).tril()
    if selection == "threshold":
        keep = G >= m.threshold
    else:
        keep = torch.zeros_like(G, dtype=torch.bool)
        for r in range(nq):
            n = max(1, math.ceil(m.nz_ratio * int(vis[r].sum())))
            top = torch.topk(G[..., r, :], n, dim=-1).indices
            keep[..., r, :].scatter_(-1, top, True)
    keep = keep | torch.eye(nq, nk, dtype=torch.bool)
    keep[..., -1, :] = True  # last_block_dense
    return keep & vis


@pytest.mark.parametrize("selection,kw", [("threshold", dict(threshold=0.2)), ("topk", dict(nz_ratio=0.3))])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_attention_is_exact_attention_over_the_selected_blocks(selection, kw, impl):
    torch.manual_seed(1)
    m = build(selection=selection, impl=impl, **kw)
    T = 96
    q, k, v = seeded_qkv(B=1, H=H, Hkv=HKV, T=T, D=D, dtype=torch.float32, seed=2)
    lay = selected_by_definition(m, q, k, True, selection)
    assert (~lay).any(), "the selection must leave some blocks out for this test to mean anything"
    allowed = lay.repeat_interleave(BS, -2).repeat_interleave(BS, -1)[..., :T, :T] & torch.ones(T, T).tril().bool()
    kk, vv = (x.double().repeat_interleave(H // HKV, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, -math.inf)
    want = torch.softmax(s, -1) @ vv
    with torch.no_grad():
        out = m(q, k, v, causal=True)
    assert m.last_path == impl
    assert torch.allclose(out.double(), want, atol=2e-5)
    pairs = H * T * (T + 1) / 2
    if impl == "reference":  # the pairs computed
        assert m.last_density == pytest.approx(float(allowed.sum()) / pairs)
    else:  # the kernel's visited tiles (diagonal tiles whole)
        assert m.last_density == pytest.approx(min(1.0, float(lay.sum()) * BS * BS / pairs))


def test_padded_key_blocks_are_never_chosen():
    m = build(selection="topk", nz_ratio=1.0)
    q, k, v = seeded_qkv(B=2, H=H, Hkv=HKV, T=64, D=D, dtype=torch.float32)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[1, 32:] = False  # blocks 2 and 3 of the second sequence are padding
    lay = m.block_layout(q, k, True, kpm)
    assert not lay[1, :, :, 2:].any() and lay[0, :, 3, 2:].all()


def test_gate_file_round_trip_and_errors(tmp_path):
    with pytest.raises(ValueError, match="gate=trained needs gate_path"):
        build(gate="trained")
    with pytest.raises(ValueError, match="does not exist"):
        build(gate="trained", gate_path=str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="k_pooling"):
        build(k_pooling="maxmaxi")
    torch.manual_seed(3)
    trained = {3: build().state_dict(), 5: build().state_dict()}
    path = tmp_path / "gate.pt"
    torch.save({"meta": {"block_size": BS, "hidden_size": HID, "head_dim": D}, "layers": trained}, path)
    m = build(gate="trained", gate_path=str(path), layer=5)
    assert all(torch.equal(m.state_dict()[n], trained[5][n]) for n in trained[5])
    m.bind_layer(3)  # what models.hf does with the attention module's layer index
    assert all(torch.equal(m.state_dict()[n], trained[3][n]) for n in trained[3])
    with pytest.raises(ValueError, match="no gate for layer 4"):
        m.bind_layer(4)
    with pytest.raises(ValueError, match="hidden_size=16"):
        build(gate="trained", gate_path=str(path), layer=3, hidden_size=32)
    assert m.describe(None, None, None, True)["gate"].startswith("trained")
    assert build().describe(None, None, None, True)["gate"] == "untrained"


def test_training_script_on_smollm2_at_tiny_size(tmp_path):
    pytest.importorskip("transformers")
    from models.pretrained import ModelAssetError, model_file

    try:
        model_file("smollm2_135m")
    except ModelAssetError as e:
        pytest.skip(str(e))
    from scripts.train_seer_gate import main

    out = tmp_path / "gate.pt"
    assert main(["--device", "cpu", "--seq-len", "64", "--windows", "2", "--steps", "8", "--layers", "1", "--skip", "2000",
                 "--block-size", "16", "--hidden-size", "16", "--lr", "1e-2", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert set(saved["layers"]) == {1} and saved["meta"]["block_size"] == 16
    assert saved["loss"][1]["train_last"] < saved["loss"][1]["train_first"]
    m = SeerAttention(block_size=16, hidden_size=16, gate="trained", gate_path=str(out), layer=1,
                      num_heads=saved["meta"]["num_heads"], num_kv_heads=saved["meta"]["num_kv_heads"],
                      head_dim=saved["meta"]["head_dim"], impl="reference")
    assert torch.equal(m.linear_k.weight, saved["layers"][1]["linear_k.weight"])


def test_real_model_fidelity_uses_each_layers_gate(tmp_path):
    """tasks.real_text.attention_fidelity binds the gate of each captured layer: its per-layer
    error equals that of a method loaded with that layer's gate."""
    from tasks.real_text import attention_fidelity

    torch.manual_seed(4)
    gates = {0: build().state_dict(), 7: build().state_dict()}
    path = tmp_path / "gate.pt"
    torch.save({"meta": {"block_size": BS, "hidden_size": HID}, "layers": gates}, path)
    kw = dict(gate="trained", gate_path=str(path), selection="topk", nz_ratio=0.3)
    captured = {i: seeded_qkv(B=1, H=H, Hkv=HKV, T=96, D=D, dtype=torch.float32, seed=10 + i) for i in (0, 7)}
    got = attention_fidelity(build(**kw), captured)["real_layers"]
    for i in (0, 7):
        alone = attention_fidelity(build(layer=i, **kw), {i: captured[i]})["real_layers"][str(i)]
        assert got[str(i)]["rel_err"] == pytest.approx(alone["rel_err"])
    other = attention_fidelity(build(layer=0, **kw), {7: captured[7]})  # binds layer 7 all the same
    assert other["real_layers"]["7"]["rel_err"] == pytest.approx(got["7"]["rel_err"])
    unbound = build(layer=0, **kw)
    unbound.bind_layer = lambda i: None  # layer 0's gate on layer 7: a different selection
    assert attention_fidelity(unbound, {7: captured[7]})["real_layers"]["7"]["rel_err"] != pytest.approx(
        got["7"]["rel_err"])
