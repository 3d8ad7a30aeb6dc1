import pytest
import torch
from torch import nn

from compress.calibrate import observe
from compress.stats import LinearStats


def test_xtx_upper_blocks_equal_full_product():
    torch.manual_seed(0)
    for d in (5, 384, 1000):
        x = torch.randn(3, 7, d)
        s = LinearStats()
        s.update(x[:1], {"xtx", "x_sq", "x_absmax"})
        s.update(x[1:], {"xtx", "x_sq", "x_absmax"})
        X = x.reshape(-1, d)
        torch.testing.assert_close(s.xtx, X.T @ X, rtol=1e-5, atol=1e-4)
        assert s.n_tokens == 21
        torch.testing.assert_close(s.x_sq, X.square().sum(0))
        torch.testing.assert_close(s.x_absmax, X.abs().amax(0))
        torch.testing.assert_close(s.hessian, 2 * X.T @ X / 21, rtol=1e-5, atol=1e-5)
        only = LinearStats()
        only.update(x, {"xtx"})  # what a step does not need is not computed
        assert only.x_sq is None and only.x_absmax is None


class Pair(nn.Module):
    """Two Linears fed one tensor (like q/k) and a third fed a different one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_hooked_xtx_equals_direct_and_shared_inputs_share_stats():
    torch.manual_seed(0)
    m = Pair()
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    with torch.no_grad(), observe({"a": m.a, "b": m.b, "c": m.c}, {"xtx"}) as stats:
        for x in xs:
            m(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(stats["a"].xtx, X.T @ X, rtol=1e-5, atol=1e-5)
    assert stats["b"] is stats["a"] and stats["a"].n_tokens == 30
    with torch.no_grad():
        H = torch.cat([(m.a(x) + m.b(x)).reshape(-1, 8) for x in xs])
    torch.testing.assert_close(stats["c"].xtx, H.T @ H, rtol=1e-5, atol=1e-4)


def test_hooks_are_removed_even_when_the_forward_raises():
    m = Pair()
    with pytest.raises(RuntimeError, match="boom"):
        with observe({"a": m.a}, set()):
            raise RuntimeError("boom")
    assert not m.a._forward_pre_hooks
