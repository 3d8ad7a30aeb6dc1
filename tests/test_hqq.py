import pytest
import torch

from compress.grid import QuantSpec, dequantize, quantize, rtn
from compress.hqq import hqq

P = 0.7


def heavy_tailed(out=64, cols=256, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(3.0)).sample((out, cols)) * 0.02


def smooth(out=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(0.5, 2.0, out)[:, None] * torch.sin(torch.linspace(0, 6, cols))[None]
    return rows + 0.01 * torch.randn(out, cols, generator=g)


def lp(W, W_hat):
    return (W - W_hat).abs().pow(P).sum().item()


def sq(W, W_hat):
    return (W - W_hat).square().sum().item()


def per_group_lp(W, W_hat, g):
    D = torch.nn.functional.pad((W - W_hat).abs().pow(P), (0, -W.shape[1] % g))
    return D.reshape(W.shape[0], -1, g).sum(-1)


SPECS = [QuantSpec(4, 64, False), QuantSpec(3, 64, False), QuantSpec(2, 32, False), QuantSpec(4, 64, True),
         QuantSpec(3, -1, False)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("make", [heavy_tailed, smooth])
def test_a_valid_quantized_on_the_same_grid(spec, make):
    W = make(cols=200)  # 200 = 3 x 64 + 8, 6 x 32 + 8: ragged last group
    q, r = hqq(W, spec), rtn(W, spec)
    assert q.spec == spec and q.codes.dtype == torch.uint8 and q.codes.shape == W.shape
    assert q.scale.shape == q.zero.shape == r.scale.shape
    assert int(q.codes.max()) <= spec.maxq
    assert torch.equal(q.zero, q.zero.round()) and q.zero.min() >= 0 and q.zero.max() <= spec.maxq
    if spec.sym:
        assert (q.zero == 2 ** (spec.bits - 1)).all()
    assert (q.scale > 0).all() and torch.equal(q.scale, q.scale.half().float())  # stored as float16 unchanged
    # the codes are W rounded to nearest on the returned grid, and Ŵ is made of its points
    assert torch.equal(q.codes, quantize(W, q.scale, q.zero, spec))
    assert torch.equal(q.weight, dequantize(q.codes, q.scale, q.zero, spec.group_size))
    step = dequantize(torch.ones_like(q.codes), q.scale, torch.zeros_like(q.zero), spec.group_size)
    inside = (q.codes > 0) & (q.codes < spec.maxq)  # not clipped: within half a step
    assert ((W - q.weight).abs()[inside] <= (step / 2 * (1 + 1e-5))[inside]).all()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("make", [heavy_tailed, smooth])
def test_no_group_worse_than_rtn_under_lp(spec, make):
    W = make(cols=200)
    g = spec.group(200)
    q, r = hqq(W, spec), rtn(W, spec)
    assert (per_group_lp(W, q.weight, g) <= per_group_lp(W, r.weight, g)).all()  # the ragged group included


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(3, 64, False), QuantSpec(4, 64, True)])
def test_heavy_tailed_weights_lower_lp_and_squared_error_than_rtn(spec):
    W = heavy_tailed()
    q, r = hqq(W, spec).weight, rtn(W, spec).weight
    assert lp(W, q) < 0.97 * lp(W, r)
    assert sq(W, q) < sq(W, r)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(3, 64, False), QuantSpec(4, 64, True)])
def test_smooth_weights_no_worse_than_rtn(spec):
    W = smooth()
    q, r = hqq(W, spec).weight, rtn(W, spec).weight
    assert lp(W, q) <= lp(W, r)
    assert sq(W, q) <= sq(W, r)


def test_zero_iterations_is_rtn():
    for spec in SPECS:
        W = heavy_tailed(cols=200)
        q, r = hqq(W, spec, iters=0), rtn(W, spec)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_more_iterations_do_not_undo_the_gain():
    W, spec = heavy_tailed(), QuantSpec(3, 64, False)
    errs = [lp(W, hqq(W, spec, iters=k).weight) for k in (0, 1, 5, 20)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0]


def test_deterministic():
    W, spec = heavy_tailed(cols=200), QuantSpec(3, 64, False)
    a, b = hqq(W, spec), hqq(W.clone(), spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


def test_zero_weights_stay_exactly_zero():
    W = heavy_tailed(cols=200)
    W[:, ::3] = 0.0
    for sym in (True, False):
        assert (hqq(W, QuantSpec(3, 64, sym)).weight[:, ::3] == 0).all()


def test_all_zero_rows_and_groups():
    W = heavy_tailed(out=4, cols=128)
    W[0] = 0.0
    W[1, :64] = 0.0
    q = hqq(W, QuantSpec(4, 64, False))
    assert torch.isfinite(q.scale).all() and (q.weight[0] == 0).all() and (q.weight[1, :64] == 0).all()


def test_the_recipe_step_stores_hqqs_codes_for_every_block_linear():
    from conftest import tiny_model

    from compress import Hqq, compress_
    from compress.layers import QuantLinear
    from compress.model import block_linears, weight_matrix
    from compress.recipe import recipe_from_dict

    model = tiny_model()
    before = {f: weight_matrix(m).detach().float().clone() for b in (0, 1) for f, m in block_linears(model, b).items()}
    recipe = recipe_from_dict({"steps": [{"quantize": {"method": "hqq", "bits": 4, "group_size": 32}}]})
    assert recipe.steps[0] == Hqq(bits=4, group_size=32) and not recipe.needs_data  # asymmetric by default
    compress_(model, recipe, progress=False)
    for fqn, W in before.items():
        m = model.get_submodule(fqn)
        assert isinstance(m, QuantLinear)
        expected = hqq(W, QuantSpec(4, 32, False))
        assert torch.equal(m.codes, expected.codes) and torch.equal(m.weight_zero_point, expected.zero.to(torch.uint8))


def test_bad_options_give_the_same_line_in_python_and_yaml():
    from compress import Hqq
    from compress.recipe import recipe_from_dict

    for bad in ({"lp": 1.5}, {"iters": -1}, {"kappa": 0.5}):
        with pytest.raises(ValueError) as python:
            Hqq(**bad)
        with pytest.raises(ValueError) as yaml:
            recipe_from_dict({"steps": [{"quantize": {"method": "hqq", **bad}}]})
        assert str(python.value) == str(yaml.value)
