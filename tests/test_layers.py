"""Every method as a layer inside a small model: parameters register, gradients flow, it trains."""
import torch
import torch.nn as nn

import methods


class TinyBlock(nn.Module):
    """x -> q, k, v projections -> attention method -> output projection (one per layer)."""

    def __init__(self, name, dim=16, heads=2, layers=2, max_seq_len=64):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.attn = nn.ModuleList(methods.load(name, num_heads=heads, head_dim=self.dh,
                                               max_seq_len=max_seq_len) for _ in range(layers))
        for a in self.attn[1:]:
            if hasattr(a, "share_parameters_with"):
                a.share_parameters_with(self.attn[0])

    def forward(self, x, causal, key_padding_mask=None):
        B, T, _ = x.shape
        for qkv, attn, out in zip(self.qkv, self.attn, self.out):
            q, k, v = qkv(x).view(B, T, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            o = attn(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
            x = x + out(o.transpose(1, 2).reshape(B, T, -1))
        return x


def test_method_trains_as_a_layer(method_name):
    """In each setting the method supports, on padded batches as LRA's (the LM and LRA smoke runs
    train one method of each family end to end; this is every method's training)."""
    probe = methods.load(method_name)
    settings = [c for c in (False, True) if (probe.supports_causal if c else probe.supports_noncausal)]
    assert settings
    for causal in settings:
        torch.manual_seed(0)
        model = TinyBlock(method_name)
        own = {n for n, _ in model.attn.named_parameters()}
        assert bool(own) == any(p.requires_grad for p in model.attn.parameters())
        buffers = dict(model.attn.named_buffers())
        if method_name == "performer":
            assert any(n.endswith("projection") for n in buffers) and not own
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randn(4, 64, 16)  # NSA: several compressed blocks
        target = torch.randn(4, 64, 16)
        kpm = torch.ones(4, 64, dtype=torch.bool)
        kpm[2:, 48:] = False  # two sequences right-padded
        losses = []
        before = {n: p.detach().clone() for n, p in model.attn.named_parameters()}
        for _ in range(8):
            loss = ((model(x, causal, kpm) - target).pow(2) * kpm[..., None]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (causal, losses)
        apart = getattr(probe, "trained_apart", False)  # SeerAttention's gate: self-distillation only
        for n, p in model.attn.named_parameters():  # the method's own parameters train too
            assert torch.equal(p.detach(), before[n]) == apart, (causal, n)


def test_linformer_layerwise_sharing_ties_layers():
    from omegaconf import OmegaConf  # noqa: F401  (composed through methods.load)

    m = TinyBlock("linformer")
    assert m.attn[0].E is not m.attn[1].E  # headwise by default: one E per layer
    shared = nn.ModuleList(methods.load("linformer", num_heads=2, head_dim=8, max_seq_len=64,
                                        sharing="layerwise") for _ in range(3))
    for a in shared[1:]:
        a.share_parameters_with(shared[0])
    assert len({id(a.E) for a in shared}) == 1
    assert sum(p.numel() for p in shared.parameters()) == shared[0].E.numel()
