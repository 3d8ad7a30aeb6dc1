"""OBSPA (structured score obspa): structured removal with no calibration data at all, the least
OBS cost first under the weights-only proxy, and the OBS update is the optimum under that proxy."""

import json

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compress.apply import compress_
from compress.obspa import mlp_xtx, remove_columns
from compress.recipe import recipe_from_dict
from compress.saving import save
from compress.structured import output_error


def _recipe(**structured):
    return recipe_from_dict({"steps": [{"structured": {"score": "obspa", "obspa_samples": 2048, **structured}}]})


@pytest.mark.parametrize("unit, compensate", [("channels", True), ("channels", False), ("heads", True)])
def test_runs_without_calibration_data_and_removes_the_asked_count(unit, compensate):
    model = tiny_model()
    recipe = _recipe(unit=unit, fraction=0.2 if unit == "channels" else 0.5, compensate=compensate)
    assert not recipe.needs_data  # so the CLI reads no calibration text
    report = compress_(model, recipe, None, progress=False)  # no batches at all
    assert [r["removed"] for r in report.layers] == ([26, 26] if unit == "channels" else [2, 2])
    for layer in model.model.layers:
        if unit == "channels":  # 128 − round(0.2 · 128) in gate, up and down alike
            assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 102
            assert layer.mlp.down_proj.in_features == 102
        else:  # one query head of each KV group; the KV heads stay
            assert layer.self_attn.q_proj.out_features == layer.self_attn.o_proj.in_features == 32
            assert layer.self_attn.k_proj.out_features == 32
    assert model.config.intermediate_size == (102 if unit == "channels" else 128)
    assert model.config.num_attention_heads == (4 if unit == "channels" else 2)


@pytest.mark.parametrize("compensate", [True, False])
def test_the_lowest_saliency_channel_goes(compensate):
    model = tiny_model()
    with torch.no_grad():  # channel 7 of every MLP: its rows and column a thousandth of the others'
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[7] *= 1e-3
            layer.mlp.up_proj.weight[7] *= 1e-3
            layer.mlp.down_proj.weight[:, 7] *= 1e-3
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    compress_(model, _recipe(unit="channels", fraction=1 / 128, compensate=compensate), None, progress=False)
    after = model.model.layers[0].mlp.up_proj.weight
    assert after.shape[0] == 127 and torch.equal(after, torch.cat([before[:7], before[8:]]))


def test_the_head_with_the_weakest_ov_circuit_goes():
    model = tiny_model()
    with torch.no_grad():  # query head 1 (KV group 0) writes almost nothing through o_proj
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 16:32] *= 1e-3
    q = model.model.layers[0].self_attn.q_proj.weight.clone()
    compress_(model, _recipe(unit="heads", fraction=0.5), None, progress=False)
    kept = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(kept[:16], q[:16])  # group 0 keeps head 0 and loses head 1
    assert kept.shape[0] == 32


def test_a_redundant_channel_is_folded_into_its_twin():
    """Channel 9 repeats channel 3's gate and up rows, so its activation is channel 3's: the proxy sees
    it from the weights alone, and the OBS update moves its down column onto channel 3. Magnitude would
    not remove it (its down column is the largest), nor could dropping it keep the output."""
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[9] = mlp.gate_proj.weight[3]
        mlp.up_proj.weight[9] = mlp.up_proj.weight[3]
        mlp.down_proj.weight[:, 9] *= 5
    x = model.model.layers[0].post_attention_layernorm(torch.randn(256, 64))
    dense = mlp(x)
    compress_(model, _recipe(unit="channels", fraction=1 / 128, compensate=True), None, progress=False)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.out_features == 127
    assert not any(torch.equal(r, mlp.up_proj.weight[3]) for r in torch.cat([mlp.up_proj.weight[:3],
                                                                             mlp.up_proj.weight[4:]]))
    assert (mlp(x) - dense).norm() < 0.05 * dense.norm()


def test_the_obs_update_is_the_least_squares_optimum_under_the_proxy():
    model = tiny_model()
    layer = model.model.layers[0]
    H = mlp_xtx(layer.mlp, layer.post_attention_layernorm, layer.mlp.down_proj, 4096)
    assert torch.allclose(H, H.t()) and torch.linalg.eigvalsh(H).min() > -1e-9
    W = layer.mlp.down_proj.weight.detach().float()
    keep, W_keep = remove_columns(W, H, 40, damp=0.01, update=True)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(128, dtype=H.dtype)
    gone = torch.ones(128, dtype=torch.bool)
    gone[keep] = False
    optimum = W.double()[:, keep] + W.double()[:, gone] @ torch.linalg.solve(Hd[keep][:, keep], Hd[keep][:, gone]).t()
    assert torch.allclose(W_keep.double(), optimum, atol=1e-6)
    refit, dropped = torch.zeros_like(W), torch.zeros_like(W)
    refit[:, keep], dropped[:, keep] = W_keep, W[:, keep]
    assert output_error(W, refit, H) < output_error(W, dropped, H)
    # the OBD order without the update: the least output energy ‖W[:, j]‖² H_jj goes
    keep_obd, _ = remove_columns(W, H, 40, damp=0.01, update=False)
    energy = W.double().square().sum(0) * H.diagonal()
    assert set(keep_obd.tolist()) == set(energy.topk(88).indices.tolist())


@pytest.mark.parametrize("unit", ["channels", "heads"])
def test_stock_from_pretrained_loads_the_smaller_model(unit, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(), make_tokenizer()
    compress_(model, _recipe(unit=unit, fraction=0.5), None, progress=False)
    ids = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    logits = model(ids).logits
    save(model, tok, tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    key, value = ("intermediate_size", 64) if unit == "channels" else ("num_attention_heads", 2)
    assert config[key] == value and "compression_config" not in config
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert torch.allclose(stock(ids).logits, logits, atol=1e-5)


@pytest.mark.parametrize("structured, message", [
    ({"unit": "layers"}, "does not apply to unit layers"),
    ({"unit": "experts"}, "does not apply to unit experts"),
    ({"unit": "channels", "obspa_samples": 0}, "obspa_samples must be >= 1, got 0"),
    ({"unit": "channels", "obspa_samples": 1.5}, "obspa_samples must be int"),
])
def test_bad_obspa_recipes(structured, message):
    with pytest.raises(ValueError, match=message):
        _recipe(**structured)
