"""Hand-written autograd nodes (fused cross-entropy, RoPE rotation) against PyTorch's own ops."""

import pytest
import torch
import torch.nn.functional as F

from roformer.model import cross_entropy
from roformer.positional import PosConfig, RopeLayout, build_positional


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_pytorch(reduction, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(300, 1000) * 3).to(dtype)  # more rows than one block at this vocabulary
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -100  # ignored rows
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = cross_entropy(a, targets, reduction)
    ref = F.cross_entropy(b.float(), targets, reduction=reduction)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert a.grad[::7].abs().max() == 0  # ignored rows get no gradient


def test_cross_entropy_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction='avg'"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "avg")


@pytest.mark.parametrize("layout", list(RopeLayout))
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fused_rotation_matches_the_autograd_composition(layout, fraction):
    torch.manual_seed(1)
    rope = build_positional(PosConfig(layout=layout, rotary_fraction=fraction), d_model=64, n_head=2, n_layer=1)
    pos = torch.arange(40)
    ctx = rope.context(pos, pos, 40, torch.float32)
    x = torch.randn(2, 2, 40, 32, requires_grad=True)
    y = torch.randn(2, 2, 40, 32, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    fused = rope.apply_rotary(x, ctx.cos, ctx.sin)
    ref = rope._apply_rotary_autograd(y, ctx.cos, ctx.sin)
    torch.testing.assert_close(fused, ref)
    g = torch.randn_like(fused)
    fused.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, y.grad)
