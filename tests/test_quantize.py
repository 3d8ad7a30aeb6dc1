import pytest
import torch

from compress.gptq import gptq
from compress.grid import QuantSpec, choose_qparams, dequantize, rtn
from compress.layers import QuantLinear, to_linear
from compress.smooth import awq_scales


def h_error(W, W_hat, H):
    D = W - W_hat
    return ((D @ H) * D).sum().item()


def correlated_inputs(n=2048, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3  # correlated channels
    return X + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 32, False), QuantSpec(8, -1, True),
                                  QuantSpec(2, 40, False), QuantSpec(4, 128, True)])
def test_rtn_is_nearest_on_its_grid_with_ragged_groups(spec):
    W = torch.randn(16, 100)  # 100 = 3 x 32 + 4, 2 x 40 + 20: ragged last group
    qw = rtn(W, spec)
    g = spec.group(100)
    assert qw.scale.shape == (16, -(-100 // g))
    assert torch.equal(qw.scale, qw.scale.half().float())  # storable as float16 without change
    step = dequantize(torch.ones_like(qw.codes), qw.scale, torch.zeros_like(qw.zero), spec.group_size)
    assert ((W - qw.weight).abs() <= step / 2 * (1 + 1e-5)).all()  # within half a step: nothing clipped
    assert int(qw.codes.max()) <= spec.maxq


def test_zero_weights_stay_exactly_zero():
    W = torch.randn(8, 64)
    W[:, ::3] = 0.0
    for sym in (True, False):
        assert (rtn(W, QuantSpec(4, 16, sym)).weight[:, ::3] == 0).all()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 32, False), QuantSpec(4, -1, False),
                                  QuantSpec(4, 48, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_equals_rtn(spec, act_order):
    W = torch.randn(24, 96)
    block = 48 if spec.group_size == 48 else 32
    q = gptq(W, torch.eye(96), spec, act_order=act_order, block_size=block if spec.group_size != -1 else 32)
    r = rtn(W, spec)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_in_hessian_weighted_error(act_order):
    X = correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 96) * 0.05
    spec = QuantSpec(4, 32, True)
    q = gptq(W, H, spec, act_order=act_order, block_size=32)
    assert h_error(W, q.weight, H) < 0.8 * h_error(W, rtn(W, spec).weight, H)


def test_gptq_beats_rtn_on_real_activations(real_block0):
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        linear, X = real_block0[name]
        W = linear.weight.detach().float()
        H = 2 * X.T.double() @ X.double() / X.shape[0]
        spec = QuantSpec(4, 64, True)
        q = gptq(W, H.float(), spec)
        assert h_error(W.double(), q.weight.double(), H) < h_error(W.double(), rtn(W, spec).weight.double(), H)


def test_gptq_with_a_mask_keeps_every_pruned_weight_zero():
    X = correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 96)
    keep = torch.rand(32, 96, generator=torch.Generator().manual_seed(1)) > 0.5
    q = gptq(W, H, QuantSpec(4, 32, False), keep=keep, block_size=32)
    assert (q.weight[~keep] == 0).all()
    assert (q.weight[keep] != 0).float().mean() > 0.8


def test_gptq_rejects_groups_that_straddle_blocks():
    with pytest.raises(ValueError, match="multiple"):
        gptq(torch.randn(4, 64), torch.eye(64), QuantSpec(4, 48, True), block_size=32)


def test_awq_scales_lower_output_error_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 128, generator=g)
    X[:, :4] *= 40.0  # planted outlier input channels
    W = torch.randn(64, 128, generator=g) * 0.02
    xtx = X.T @ X / X.shape[0]
    spec = QuantSpec(4, 64, True)
    s, alpha = awq_scales([W], [xtx], X.abs().mean(0), spec)
    awq_hat = rtn(W * s, spec).weight / s
    assert alpha > 0
    assert h_error(W, awq_hat, xtx) < 0.7 * h_error(W, rtn(W, spec).weight, xtx)


def test_quant_linear_forward_is_linear_with_dequantized_weight():
    W, b = torch.randn(20, 70), torch.randn(20)
    qw = rtn(W, QuantSpec(4, 32, False))
    m = QuantLinear.from_quantized(qw, b)
    x = torch.randn(3, 5, 70)
    assert torch.equal(m.dequantized_weight(), qw.weight)
    assert torch.equal(m(x), torch.nn.functional.linear(x, qw.weight, b))
    assert torch.equal(to_linear(m)(x), m(x))


def test_choose_qparams_symmetric_zero_is_mid_grid():
    scale, zero = choose_qparams(torch.randn(4, 16), QuantSpec(3, 8, True))
    assert (zero == 4).all() and scale.shape == (4, 2)
