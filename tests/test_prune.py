import pytest
import torch

from compress.model import weight_matrix
from compress.obs import obs_sweep
from compress.prune import prune_linear, select_mask
from compress.recipe import STEPS
from compress.scores import wanda
from compress.stats import LinearStats


def test_unstructured_row_masks_have_exact_sparsity_in_every_row():
    torch.manual_seed(0)
    score = torch.rand(37, 91)
    for s in (0.0, 0.3, 0.5, 0.77):
        keep = select_mask(score, s)
        assert ((~keep).sum(1) == round(s * 91)).all()
        # the dropped weights are the lowest of their row
        dropped_max = torch.where(~keep, score, -1.0).amax(1)
        kept_min = torch.where(keep, score, 2.0).amin(1)
        assert (dropped_max <= kept_min).all()


def test_unstructured_layer_masks_have_exact_total_sparsity():
    score = torch.rand(16, 50)
    keep = select_mask(score, 0.6, per_row=False)
    assert (~keep).sum() == round(0.6 * 800)
    assert (~keep).sum(1).unique().numel() > 1  # rows are free to differ


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_masks_keep_exactly_n_in_every_group(n, m):
    score = torch.rand(12, 64)
    keep = select_mask(score, 1 - n / m, (n, m))
    assert (keep.reshape(12, -1, m).sum(-1) == n).all()


def test_n_m_needs_divisible_columns():
    with pytest.raises(ValueError, match="divisible by 4"):
        select_mask(torch.rand(4, 10), 0.5, (2, 4))


def test_wanda_score_is_weight_times_input_norm():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = LinearStats()
    stats.update(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), {"x_sq"})  # column norms 5 and 1
    torch.testing.assert_close(wanda(W, stats), torch.tensor([[5.0, 2.0], [15.0, 0.5]]))


def _keep_by_row(sparsity):
    def choose(W1, d, b0):
        return select_mask(W1.square() / d, sparsity)
    return choose


def test_obs_sweep_with_identity_hessian_is_plain_magnitude_pruning():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    out = obs_sweep(W, torch.eye(32), choose_keep=_keep_by_row(0.5), block_size=32, damp=1e-9)
    torch.testing.assert_close(out.W, W * select_mask(W.abs(), 0.5), rtol=0, atol=1e-6)


def test_obs_sweep_with_nothing_pruned_is_the_identity():
    torch.manual_seed(0)
    X = torch.randn(100, 16)
    W = torch.randn(4, 16)
    out = obs_sweep(W, X.T @ X, choose_keep=lambda W1, d, b0: torch.ones_like(W1, dtype=torch.bool), block_size=8)
    torch.testing.assert_close(out.W, W, rtol=1e-5, atol=1e-5)


def test_obs_update_lowers_the_error_of_its_own_mask():
    torch.manual_seed(0)
    X = torch.randn(256, 24) @ torch.randn(24, 24)  # correlated inputs
    W = torch.randn(6, 24)
    H = X.T @ X
    out = obs_sweep(W, H, choose_keep=_keep_by_row(0.5), block_size=8)
    assert (out.W[~out.keep] == 0).all() and out.keep.sum() == 6 * 12
    err = lambda V: ((W - V) @ H * (W - V)).sum()  # noqa: E731
    assert err(out.W) < err(W * out.keep)


def _layer(real_block0, name):
    linear, X = real_block0[name]
    stats = LinearStats()
    stats.update(X, {"xtx", "x_sq"})
    return linear, X, stats


@pytest.mark.parametrize("name", ["self_attn.q_proj", "mlp.down_proj"])
def test_on_real_activations_sparsegpt_beats_wanda_beats_magnitude(real_block0, name):
    """‖(W − Ŵ)X‖ on SmolLM2's own block-0 inputs, at 50% and 2:4."""
    import copy

    linear, X, stats = _layer(real_block0, name)
    for pattern in ("unstructured", "2:4"):
        errors = {}
        for method in ("sparsegpt", "wanda", "magnitude"):
            lin = copy.deepcopy(linear)
            prune_linear(lin, STEPS["prune"][method](sparsity=0.5, pattern=pattern), stats)
            errors[method] = (X @ (weight_matrix(linear) - weight_matrix(lin)).T).norm().item()
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (pattern, errors)
