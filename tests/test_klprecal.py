"""KL pre-calibration (grid.kl_qparams, `grid: kl` on rtn and gptq): each group's grid is the shrunk
min-max range whose quantized weights' histogram is closest to the original weights' in KL."""

import pytest
import torch

from compress.gptq import gptq
from compress.grid import KL_SHRINKS, QuantSpec, choose_qparams, grid_kl, kl_qparams, quantize, rtn

SPECS = [QuantSpec(4, 64, True), QuantSpec(3, 64, False), QuantSpec(2, 32, False), QuantSpec(4, -1, True)]


def heavy_tailed(out=64, cols=200, seed=0):  # 200 = 3 x 64 + 8, 6 x 32 + 8: a ragged last group
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(3.0)).sample((out, cols)) * 0.02


@pytest.mark.parametrize("spec", SPECS)
def test_the_kl_grid_is_the_least_kl_candidate_and_beats_minmax_on_heavy_tails(spec):
    W = heavy_tailed()
    scale, zero = kl_qparams(W, spec)
    kl = grid_kl(W, scale, zero, spec)
    # every candidate is the min-max grid of the group shrunk by a; a = 1 is min-max itself
    candidates = [grid_kl(W, *choose_qparams(W * a, spec), spec) for a in KL_SHRINKS]
    assert (kl <= torch.stack(candidates).amin(0)).all()
    minmax = candidates[0]
    assert torch.equal(minmax, grid_kl(W, *choose_qparams(W, spec), spec))
    assert (kl <= minmax).all() and kl.sum() < 0.97 * minmax.sum() and (kl < minmax).float().mean() > 0.5


@pytest.mark.parametrize("spec", SPECS)
def test_the_kl_grid_is_a_valid_stored_grid_never_wider_than_minmax(spec):
    W = heavy_tailed()
    scale, zero = kl_qparams(W, spec)
    s0, _ = choose_qparams(W, spec)
    assert scale.shape == zero.shape == s0.shape
    assert (scale <= s0).all() and (scale < s0).any()
    assert torch.equal(scale, scale.half().float()) and (scale > 0).all()  # stored as float16 unchanged
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= spec.maxq
    if spec.sym:
        assert (zero == 2 ** (spec.bits - 1)).all()
    q = rtn(W, spec, "kl")  # RTN rounds on that grid
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert torch.equal(q.codes, quantize(W, scale, zero, spec))


def test_gptq_sweeps_on_the_kl_grids_of_the_original_weights():
    W = heavy_tailed(out=32, cols=128)
    spec = QuantSpec(4, 32, True)
    scale, zero = kl_qparams(W, spec)
    X = torch.randn(256, 128) * torch.linspace(0.1, 3.0, 128)
    q = gptq(W, X.T @ X, spec, grid="kl", block_size=16)  # static groups: a block need not hold a group
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    # with H = I nothing is fed forward: GPTQ is RTN on the same grid
    i = gptq(W, torch.eye(128), spec, grid="kl")
    assert torch.equal(i.codes, rtn(W, spec, "kl").codes)


def test_zero_weights_stay_zero_and_an_all_zero_group_keeps_minmaxs_grid():
    W = heavy_tailed(out=8, cols=128)
    W[:, ::3] = 0.0
    W[0, :64] = 0.0
    for sym in (True, False):
        spec = QuantSpec(3, 64, sym)
        q = rtn(W, spec, "kl")
        assert (q.weight[:, ::3] == 0).all() and (q.weight[0, :64] == 0).all()
        assert torch.isfinite(grid_kl(W, q.scale, q.zero, spec)).all()
        assert q.scale[0, 0] == choose_qparams(W, spec)[0][0, 0]


def test_the_search_is_sliced_by_rows_without_changing_it(monkeypatch):
    import compress.grid as grid

    W, spec = heavy_tailed(out=10, cols=128), QuantSpec(4, 32, False)
    whole = kl_qparams(W, spec)
    monkeypatch.setattr(grid, "_KL_CHUNK", 3 * 128)  # slices of 3 rows: 3, 3, 3, 1
    sliced = kl_qparams(W, spec)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_recipe_step_stores_the_kl_grids_and_round_trips_through_save_and_load(method, tmp_path, tokenizer):
    from conftest import assert_reloaded_equal, batches, tiny_model

    from compress import compress_
    from compress.layers import QuantLinear
    from compress.loading import load
    from compress.model import block_linears, weight_matrix
    from compress.recipe import recipe_from_dict
    from compress.saving import save

    model = tiny_model()
    before = {f: weight_matrix(m).detach().float().clone() for b in (0, 1) for f, m in block_linears(model, b).items()}
    step = {"method": method, "bits": 4, "group_size": 32, "sym": False, "grid": "kl"}
    recipe = recipe_from_dict({"steps": [{"quantize": step}], "calib": {"samples": 4, "seqlen": 32}})
    assert recipe.steps[0].grid == "kl" and recipe.needs_data == (method == "gptq")
    compress_(model, recipe, batches(4, 32), progress=False)
    spec = QuantSpec(4, 32, False)
    for fqn, W in before.items():
        m = model.get_submodule(fqn)
        assert isinstance(m, QuantLinear)
        scale, zero = kl_qparams(W, spec)
        assert torch.equal(m.weight_scale.float(), scale) and torch.equal(m.weight_zero_point.float(), zero)
        if method == "rtn":
            assert torch.equal(m.codes, rtn(W, spec, "kl").codes)
    out = save(model, tokenizer, tmp_path / "out", recipe=recipe)
    reloaded, _ = load(out)
    assert_reloaded_equal(model, reloaded, torch.randint(0, 300, (2, 20)))


def test_bad_values_and_combinations_are_refused_with_the_same_line_in_python_and_yaml():
    from compress import Gptq, Rtn
    from compress.config import Outliers
    from compress.recipe import recipe_from_dict

    bad = [(Rtn, {"grid": "mse"}, "quantize.grid must be minmax or kl, got 'mse'"),
           (Gptq, {"grid": "KL"}, "quantize.grid must be minmax or kl, got 'KL'"),
           (Rtn, {"grid": "kl", "format": "nvfp4"}, "quantize.grid kl chooses integer grids, not format nvfp4's"),
           (Gptq, {"grid": "kl", "outliers": Outliers()}, "quantize.grid kl does not combine with outlier_fraction")]
    for cls, kwargs, message in bad:
        with pytest.raises(ValueError) as python:
            cls(**kwargs)
        assert str(python.value) == message
        yaml = {k: v for k, v in kwargs.items() if k != "outliers"}
        yaml |= {"outlier_fraction": 0.01} if "outliers" in kwargs else {}
        with pytest.raises(ValueError) as parsed:
            recipe_from_dict({"steps": [{"quantize": {"method": cls.method, **yaml}}]})
        assert str(parsed.value) == message
    with pytest.raises(ValueError, match=r"quantize.grid applies to method gptq or rtn, not hqq"):
        recipe_from_dict({"steps": [{"quantize": {"method": "hqq", "grid": "kl"}}]})
    with pytest.raises(ValueError, match="grid must be minmax or kl, got 'mse'"):
        choose_qparams(heavy_tailed(), QuantSpec(), "mse")
    # static groups are implied, so a block need not be a multiple of the group
    assert Gptq(grid="kl", group_size=128, block_size=64).grid == "kl"
