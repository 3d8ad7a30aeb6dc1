"""Structured removal: the smaller model computes what the masked original computes, saves as a
stock checkpoint, and compensation is the least-squares optimum."""

import json

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compress.apply import compress_
from compress.calibrate import capture_block_inputs
from compress.recipe import recipe_from_dict
from compress.saving import save
from compress.structured import compensate, keep_count, output_error, shrink_block_


def _batches(n=4, seed=0, T=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 300, (1, T), generator=g) for _ in range(n)]


def _recipe(**structured):
    return recipe_from_dict({"steps": [{"structured": structured}],
                             "calib": {"samples": 4, "seqlen": 48, "score_samples": 4}})


def test_compensation_is_the_least_squares_refit():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 20, generator=g)
    X = torch.randn(300, 20, generator=g) @ torch.randn(20, 20, generator=g)  # correlated inputs
    keep = torch.tensor([0, 2, 3, 5, 7, 11, 12, 13, 17, 19])
    H = X.t() @ X
    W_keep = compensate(W, H, keep, damp=1e-10)
    lstsq = torch.linalg.lstsq(X[:, keep].double(), (X @ W.t()).double()).solution.t().float()
    assert torch.allclose(W_keep, lstsq, atol=1e-3)
    refit, dropped = torch.zeros_like(W), torch.zeros_like(W)
    refit[:, keep], dropped[:, keep] = W_keep, W[:, keep]
    assert output_error(W, refit, H) < 0.5 * output_error(W, dropped, H)


def test_keep_count_rounds_to_multiples():
    assert keep_count(1536, 0.2) == 1229
    assert keep_count(1536, 0.2, 64) == 1216
    assert keep_count(100, 0.99, 8) == 8


@pytest.mark.parametrize("unit, kv_groups", [("channels", False), ("heads", False), ("heads", True)])
def test_shrunk_block_equals_the_masked_block(unit, kv_groups):
    """Without compensation, removing units gives exactly the outputs of zeroing them in place."""
    model = tiny_model()
    masked = tiny_model()
    step = _recipe(unit=unit, fraction=0.5, score="magnitude", compensate=False, kv_groups=kv_groups).steps[0]
    inputs = capture_block_inputs(model, _batches())
    prefix = "model.layers.0"
    metrics = shrink_block_(model, prefix, step, inputs, {})
    block, ref = model.model.layers[0], masked.model.layers[0]
    with torch.no_grad():
        if unit == "channels":
            kept = {tuple(r) for r in block.mlp.gate_proj.weight.tolist()}
            drop = [j for j, r in enumerate(ref.mlp.gate_proj.weight.tolist()) if tuple(r) not in kept]
            ref.mlp.down_proj.weight[:, drop] = 0
            assert block.mlp.down_proj.in_features == 64 and len(drop) == 64
        else:
            kept = {tuple(r) for r in block.self_attn.q_proj.weight.view(-1, 16, 64)[:, 0].tolist()}
            drop = [h for h, r in enumerate(ref.self_attn.q_proj.weight.view(-1, 16, 64)[:, 0].tolist())
                    if tuple(r) not in kept]
            for h in drop:
                ref.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
            groups = block.self_attn.k_proj.out_features // 16
            assert groups == (1 if kv_groups else 2)
            assert block.self_attn.num_key_value_groups * groups == block.self_attn.q_proj.out_features // 16 == 2
            if not kv_groups:  # one query head from each KV group
                assert sorted(h // 2 for h in drop) == [0, 1]
    assert metrics["removed"] == (64 if unit == "channels" else 2)
    ids = _batches(1, 5)[0]
    assert torch.allclose(model(ids).logits, masked(ids).logits, atol=1e-5)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "fisher"])
def test_a_dead_channel_goes_first(score):
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[7] = 0  # channel 7 outputs nothing: silu(g)·0
            layer.mlp.gate_proj.weight[7] *= 1e-3
    recipe = _recipe(unit="channels", fraction=1 / 128, score=score, compensate=False)
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    compress_(model, recipe, _batches(), progress=False)
    after = model.model.layers[0].mlp.down_proj.weight
    assert after.shape[1] == 127
    assert torch.equal(after, torch.cat([before[:, :7], before[:, 8:]], dim=1))


def test_compensation_lowers_the_layer_error():
    errors = {}
    for comp in (False, True):
        model = tiny_model()
        report = compress_(model, _recipe(unit="channels", fraction=0.5, compensate=comp), _batches(), progress=False)
        errors[comp] = sum(r["error"] for r in report.layers)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("unit", ["channels", "heads", "layers"])
def test_stock_from_pretrained_loads_the_smaller_model(model_type, unit, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(model_type), make_tokenizer()
    score = "influence" if unit == "layers" else "wanda"
    before = sum(p.numel() for p in model.parameters())
    compress_(model, _recipe(unit=unit, fraction=0.5, score=score), _batches(), progress=False)
    ids = _batches(1, 5)[0]
    logits = model(ids).logits
    save(model, tok, tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert "compression_config" not in config and "quantization_config" not in config
    key, value = {"channels": ("intermediate_size", 64), "heads": ("num_attention_heads", 2),
                  "layers": ("num_hidden_layers", 1)}[unit]
    assert config[key] == value
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert sum(p.numel() for p in stock.parameters()) < before
    assert torch.allclose(stock(ids).logits, logits, atol=1e-5)
    out = stock.generate(ids[:, :8], max_new_tokens=6, do_sample=False)  # the KV cache indexes the kept layers
    assert torch.equal(out, model.generate(ids[:, :8], max_new_tokens=6, do_sample=False))


def test_layers_removes_the_least_influential_block():
    model = tiny_model()
    with torch.no_grad():  # block 1 becomes a near identity: its residual branches add almost nothing
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    kept = model.model.layers[0]
    report = compress_(model, _recipe(unit="layers", fraction=0.5, score="influence"), _batches(), progress=False)
    assert report.layers[0]["module"] == "model.layers.1"
    assert len(model.model.layers) == 1 and model.model.layers[0] is kept


def test_structured_then_gptq_in_one_pass(tmp_path):
    model = tiny_model()
    recipe = recipe_from_dict({"steps": [{"structured": {"unit": "channels", "fraction": 0.25}},
                                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
                               "calib": {"samples": 4, "seqlen": 48}})
    report = compress_(model, recipe, _batches(), progress=False)
    down = [r for r in report.layers if r["module"] == "model.layers.0.mlp.down_proj"]
    assert down[0]["params"] == 64 * 96  # quantized at its new width
    assert model.config.intermediate_size == 96


@pytest.mark.parametrize("model_type, structured, message", [
    ("gpt2", {"unit": "channels"}, "does not support model_type"),
    ("llama", {"unit": "heads", "fraction": 0.1}, "at least one"),
    ("llama", {"unit": "layers", "fraction": 0.1, "score": "influence"}, "at least one"),
])
def test_impossible_removals_are_refused(model_type, structured, message):
    with pytest.raises(ValueError, match=message):
        compress_(tiny_model(model_type), _recipe(**structured), _batches(), progress=False)


@pytest.mark.parametrize("structured, message", [
    ({"unit": "layers", "score": "wanda"}, "does not apply"),
    ({"unit": "channels", "score": "influence"}, "does not apply"),
    ({"unit": "channels", "fraction": 0}, "fraction"),
    ({"unit": "channels", "kv_groups": True}, "kv_groups"),
    ({"unit": "neurons"}, "unit"),
])
def test_bad_structured_recipes(structured, message):
    with pytest.raises(ValueError, match=message):
        _recipe(**structured)


def test_fisher_allocation_moves_removal_to_the_blocks_the_loss_ignores(tmp_path):
    from compress.loading import load

    model, tok = tiny_model(), make_tokenizer()
    with torch.no_grad():  # block 1's MLP barely reaches the output: its channels cost little to remove
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    recipe = _recipe(unit="channels", fraction=0.25, allocation="fisher", allocation_range=0.2)
    report = compress_(model, recipe, _batches(), progress=False)
    removed = {r["module"]: r["removed"] for r in report.layers}
    assert sum(removed.values()) == 2 * 32  # the uniform total
    assert removed["model.layers.1.mlp"] > removed["model.layers.0.mlp"]
    ids = _batches(1, 5)[0]
    logits = model(ids).logits
    save(model, tok, tmp_path / "ragged")
    modules = json.loads((tmp_path / "ragged" / "config.json").read_text())["compression_config"]["modules"]
    width = model.model.layers[1].mlp.down_proj.in_features
    assert modules["model.layers.1.mlp.down_proj"] == {"type": "shape", "shape": [64, width]}
    loaded, _ = load(tmp_path / "ragged")
    assert torch.equal(loaded(ids).logits, logits)


def test_per_layer_heads_load_through_compress(tmp_path):
    from compress.loading import load
    from compress.saving import stock_notes

    model, tok = tiny_model(), make_tokenizer()
    inputs = capture_block_inputs(model, _batches())
    step = _recipe(unit="heads", fraction=0.5, kv_groups=True).steps[0]
    shrink_block_(model, "model.layers.0", step, inputs, {})  # block 1 keeps its heads: per-layer shapes
    ids = _batches(1, 5)[0]
    logits = model(ids).logits
    assert any("per-layer shapes" in n for n in stock_notes(model))
    save(model, tok, tmp_path / "ragged")
    loaded, _ = load(tmp_path / "ragged")
    assert loaded.model.layers[0].self_attn.num_key_value_groups == 2
    assert torch.equal(loaded(ids).logits, logits)
