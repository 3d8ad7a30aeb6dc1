from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress import Gptq, Guided
from compress.gptq import gptq
from compress.grid import QuantSpec
from compress.guided import guided_objective, solve
from compress.nonuniform import leanquant
from compress.stats import collect_fisher, output_groups


class Probe(nn.Module):
    """A 'model' around one Linear whose loss is Σ_t Σ_j c_tj z_tj, so that ∂ℓ/∂z_tj = c_tj exactly.
    Sequence s (ids = [[s]]) feeds the input rows X[s] [T, in]."""

    def __init__(self, X: torch.Tensor, c: torch.Tensor, out: int):
        super().__init__()
        self.X, self.c = X, c  # [S, T, in], [S, T, out]
        self.linear = nn.Linear(X.shape[-1], out, bias=False)

    def forward(self, ids, labels=None, use_cache=False):
        s = int(ids[0, 0])
        return SimpleNamespace(loss=(self.c[s] * self.linear(self.X[s])).sum())


def inputs(S=4, T=512, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.3
    return torch.randn(S, T, d, generator=g) @ mix + torch.randn(S, T, d, generator=g)


def guided_hessians(X, c, out, groups):
    probe = Probe(X, c, out)
    ids = [torch.tensor([[s]]) for s in range(X.shape[0])]
    fisher = collect_fisher(probe, ids, {"linear": probe.linear}, diagonal=False, guided={"linear"}, groups=groups)
    return probe, fisher["linear"].guided



@pytest.mark.parametrize("method", ["gptq", "leanquant"])
def test_with_equal_output_gradients_guidedquant_equals_the_layer_wise_method(method):
    X = inputs()
    _, Hg = guided_hessians(X, torch.ones(4, 512, 48), 48, groups=4)
    XtX = sum(x.t() @ x for x in X) / 4
    assert Hg.shape == (4, 96, 96)
    for H in Hg:  # every group's Hessian is the plain XᵀX (gradient 1 everywhere)
        assert torch.equal(H, XtX)
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    if method == "gptq":
        spec = QuantSpec(3, 32, False)
        ours = solve(W, XtX, lambda W, H, keep: gptq(W, H, spec, keep=keep, block_size=32), guided=Hg)
        plain = gptq(W, XtX, spec, block_size=32)
    else:
        ours, plain = solve(W, XtX, lambda W, H, keep: leanquant(W, H, 3, keep=keep), guided=Hg), leanquant(W, XtX, 3)
    assert torch.equal(ours.codes, plain.codes) and torch.equal(ours.weight, plain.weight)


def test_guided_hessians_weight_tokens_by_their_groups_squared_gradients():
    X = inputs(S=2, T=64, d=16)
    c = torch.randn(2, 64, 6, generator=torch.Generator().manual_seed(2))
    _, Hg = guided_hessians(X, c, 6, groups=3)
    for i, rows in enumerate(output_groups(6, 3)):
        s = c[..., rows].square().mean(-1)  # [S, T]
        expected = sum((x * w[:, None]).t() @ x for x, w in zip(X, s)) / 2
        torch.testing.assert_close(Hg[i], expected, rtol=1e-5, atol=1e-5)


def test_guidedquant_lowers_the_gradient_weighted_objective_with_uneven_channel_importance():
    # two kinds of tokens with different input statistics; the first half of the output channels
    # matters (large gradients) on kind A, the second half on kind B
    g = torch.Generator().manual_seed(3)
    d, T = 96, 1024
    A = torch.randn(T, d, generator=g) @ (torch.randn(d, d, generator=g) * 0.4)
    B = torch.randn(T, d, generator=g) * torch.linspace(0.1, 3.0, d)
    X = torch.cat([A, B])[None]  # [1, 2T, d]
    c = torch.full((1, 2 * T, 64), 0.05)
    c[0, :T, :32], c[0, T:, 32:] = 1.0, 1.0
    _, Hg = guided_hessians(X, c, 64, groups=2)
    H = X[0].t() @ X[0]
    W = torch.randn(64, d, generator=g) * 0.05
    spec = QuantSpec(3, 32, False)
    plain = gptq(W, H, spec, block_size=32)
    ours = solve(W, H, lambda W, H, keep: gptq(W, H, spec, keep=keep, block_size=32), guided=Hg)
    assert guided_objective(W, ours.weight, Hg) < 0.9 * guided_objective(W, plain.weight, Hg)
    lean = solve(W, H, lambda W, H, keep: leanquant(W, H, 3, keep=keep), guided=Hg)
    assert guided_objective(W, lean.weight, Hg) < guided_objective(W, leanquant(W, H, 3).weight, Hg)


def test_guided_step_collects_hessians_for_its_targets_only():
    from conftest import batches, tiny_model

    from compress.apply import Report
    from compress.phases import Run, before_blocks
    from compress.recipe import Recipe

    model = tiny_model()
    step = Gptq(bits=4, group_size=32, guided=Guided(2), targets=("*mlp*",))
    samples = [row.unsqueeze(0) for ids in batches(2, 16) for row in ids]
    run = Run(model, Recipe(steps=(step,)), Report(), samples, samples, None, torch.device("cpu"), progress=False)
    before_blocks(run)  # its one whole-model work: the Fisher pass
    fisher = run.fisher
    assert sorted(fisher) == sorted(f"model.layers.{b}.mlp.{n}_proj" for b in (0, 1) for n in ("gate", "up", "down"))
    H = fisher["model.layers.0.mlp.down_proj"].guided
    assert H.shape == (2, 128, 128) and torch.allclose(H, H.transpose(1, 2)) and (H.diagonal(0, 1, 2) > 0).all()
