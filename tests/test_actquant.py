import numpy as np
import pytest
import torch
from conftest import batches, tiny_model

from compress import ActQuant, Recipe, Rotate, Rtn
from compress.actquant import fake_quant_input, fake_quant_tokens, runtime_scales
from compress.apply import compress_
from compress.calibrate import capture_block_inputs
from compress.grid import QuantSpec, rtn
from compress.layers import ActQuantLinear, QuantLinear
from compress.model import awq_pairs, decoder_blocks
from compress.recipe import recipe_from_dict
from compress.smooth import smoothquant_block_, smoothquant_scales


def test_tokens_are_rounded_each_on_its_own_symmetric_grid_by_hand():
    """4 bits: levels −8 … 7 times the row's scale absmax / 7.5 (exact in float16 here: 1, 1/8, 4);
    +7.5 steps clips to 7, −7.5 rounds to −8."""
    X = torch.tensor([[7.5, -7.5, 0.4, -2.6, 3.4],
                      [0.9375, 0.3, -0.05, 0.0, -0.9],
                      [-30.0, 10.4, 1.9, 29.0, 0.0]])
    expect = torch.tensor([[7.0, -8.0, 0.0, -3.0, 3.0],
                           [0.875, 0.25, 0.0, 0.0, -0.875],
                           [-32.0, 12.0, 0.0, 28.0, 0.0]])
    assert torch.equal(fake_quant_tokens(X, 4), expect)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_token_lands_on_the_nearest_level_of_its_own_grid(bits):
    """Row i's grid: integers −2^(b−1) … 2^(b−1) − 1 times s_i, the smallest float16 ≥ absmax_i / (2^(b−1) − ½);
    every value is within s_i / 2 of its rounded value."""
    X = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 16)[:, None]
    Xq = fake_quant_tokens(X, bits)
    half = 2 ** (bits - 1)
    for x, xq in zip(X.double(), Xq.double()):
        target = x.abs().max().item() / (half - 0.5)
        s = float(np.float16(target))
        if s < target:
            s = float(np.nextafter(np.float16(s), np.float16(np.inf)))
        levels = xq / s
        assert torch.equal(levels, levels.round()) and levels.min() >= -half and levels.max() <= half - 1
        assert ((xq - x).abs() <= s / 2 * (1 + 1e-6)).all()


def test_runtime_smoothing_cancels_any_channel_scaling():
    """Runtime Smooth divides out per-channel maxima, so channel-wise outliers cost nothing: scaling
    the channels by any positive c scales the simulated activations by exactly c."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 48, generator=g)
    c = torch.exp(3 * torch.randn(48, generator=g))  # channel ranges over ~4 orders of magnitude
    smooth = fake_quant_input(x * c, 4, "runtime")
    assert torch.allclose(smooth, fake_quant_input(x, 4, "runtime") * c, rtol=1e-5, atol=0)
    plain_err = (fake_quant_input(x * c, 4) - x * c).div(c).norm()
    smooth_err = (smooth - x * c).div(c).norm()
    assert smooth_err < plain_err / 3


def test_runtime_scales_are_maxima_over_token_groups():
    X = torch.randn(10, 6)
    X[7, 2] = 50.0
    s = runtime_scales(X, tokens=4)  # groups: rows 0-3, 4-7, 8-9
    for rows in (range(0, 4), range(4, 8), range(8, 10)):
        expect = X[list(rows)].abs().amax(0)
        assert all(torch.equal(s[r], expect) for r in rows)
    assert torch.equal(runtime_scales(X), X.abs().amax(0).expand(10, 6))


def test_act_quant_linear_is_a_linear_on_fake_quantized_inputs():
    W = torch.randn(24, 64)
    base = QuantLinear.from_quantized(rtn(W, QuantSpec(4, 32, True)), torch.randn(24))
    m = ActQuantLinear.from_quant_linear(base, 4, "runtime", 8)
    x = torch.randn(3, 10, 64)
    expect = torch.nn.functional.linear(fake_quant_input(x, 4, "runtime", 8), base.dequantized_weight(), base.bias)
    assert torch.allclose(m(x), expect, atol=1e-5)
    assert not torch.allclose(m(x), base(x), atol=1e-3)  # the inputs really are rounded
    assert m.state_dict().keys() == base.state_dict().keys()


def test_runtime_smoothing_cuts_down_proj_error_on_real_activations(real_block0):
    """SmolLM2's down_proj inputs carry channel-wise outliers (the SwiGLU products), the case Runtime
    Smooth is for: its output error at 4-bit activations is well below plain per-token rounding."""
    lin, X = real_block0["mlp.down_proj"]
    W = lin.weight.detach()
    Y = X @ W.T

    def err(smooth):
        return ((fake_quant_input(X, 4, smooth) @ W.T - Y).norm() / Y.norm()).item()

    assert err("runtime") < 0.7 * err("none")


def test_smoothquant_migration_keeps_the_block_function_and_flattens_inputs():
    model = tiny_model("llama")
    block = decoder_blocks(model)[0]
    with torch.no_grad():
        block.input_layernorm.weight[3] = 40.0  # an outlier channel at q/k/v's inputs
    inputs = capture_block_inputs(model, batches(2, 16))

    def run():
        """The block's outputs and the maxima of q_proj's inputs over all samples."""
        seen = []
        hook = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax((0, 1))))
        with torch.no_grad():
            out = [block(h, *a, **k) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]
        hook.remove()
        return [o[0] if isinstance(o, tuple) else o for o in out], torch.stack(seen).amax(0)

    before, x_max = run()
    W = torch.cat([block.self_attn.get_submodule(n).weight.detach() for n in ("q_proj", "k_proj", "v_proj")])
    s = smoothquant_scales(x_max, W, 0.5)
    largest = smoothquant_block_(block, "model.layers.0", awq_pairs(model), inputs,
                                 Rtn(act=ActQuant(4, smooth="smoothquant")))
    after, new_max = run()
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(after, before))
    assert largest["self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"] == pytest.approx(s.max().item(), rel=1e-5)
    assert torch.allclose(new_max, x_max / s, rtol=1e-4)  # max|X_j / s_j| = max|X_j|^(1−α) · max|W_j|^(1−α)
    ratio = lambda m: (m.max() / m.median()).item()  # noqa: E731
    assert ratio(new_max) < ratio(x_max) / 3  # the outlier channel was migrated into the weights


def _w4a4(**kw):
    return Rtn(bits=4, group_size=-1, act=ActQuant(4, **kw))


@pytest.mark.parametrize("steps", [
    (_w4a4(),),
    (Rotate(), _w4a4(smooth="runtime")),
    (_w4a4(smooth="smoothquant"),),
])
def test_w4a4_through_compress_then_save_and_load(steps, tmp_path, tokenizer):
    import json

    from compress.loading import load
    from compress.saving import save, stock_notes

    model = tiny_model("llama")
    x = batches(1, 24)[0]
    recipe = Recipe(steps=steps)
    compress_(model, recipe, batches(4, 32) if recipe.needs_data else None, progress=False)
    acts = [m for m in model.modules() if isinstance(m, ActQuantLinear)]
    assert len(acts) == 14  # every Linear of both blocks; lm_head keeps float inputs
    assert all(m.smooth == ("runtime" if steps[-1].act.smooth == "runtime" else "none") for m in acts)
    with torch.no_grad():
        logits = model(x).logits
    save(model, tokenizer, tmp_path / "m")
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["compression_config"]["modules"]
    assert entry["model.layers.0.mlp.down_proj"]["act_bits"] == 4
    assert any("simulation" in n for n in stock_notes(model))
    loaded, _ = load(tmp_path / "m")
    assert sum(isinstance(m, ActQuantLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)


def test_act_quant_fields_are_validated():
    with pytest.raises(ValueError, match="needs act_bits"):
        recipe_from_dict({"steps": [{"quantize": {"method": "rtn", "smooth": "runtime"}}]})
    with pytest.raises(ValueError, match="awq"):
        recipe_from_dict({"steps": [{"quantize": {"method": "awq", "act_bits": 4, "smooth": "smoothquant"}}]})
    with pytest.raises(ValueError, match="act_bits must be"):
        recipe_from_dict({"steps": [{"quantize": {"method": "rtn", "act_bits": 1}}]})
    with pytest.raises(ValueError, match="lowrank"):
        recipe_from_dict({"steps": [{"lowrank": {"method": "svd"}}, {"quantize": {"method": "rtn", "act_bits": 4}}]})
    r = recipe_from_dict({"steps": [{"quantize": {"method": "rtn", "act_bits": 4, "smooth": "smoothquant"}}]})
    assert r.needs_data  # the migration reads calibration maxima
