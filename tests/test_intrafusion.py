"""Intra-Fusion (structured fusion: ot): removed MLP channels are merged into the kept ones by an
optimal-transport plan; an exact duplicate lands whole on its twin, so the dense output survives."""

import itertools
import json

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from compress.apply import compress_
from compress.fusion import fusion_plan, sinkhorn
from compress.recipe import recipe_from_dict
from compress.saving import save


def _recipe(**structured):
    return recipe_from_dict({"steps": [{"structured": {"unit": "channels", "compensate": False, **structured}}]})


def _with_duplicates():
    """The tiny model with MLP channels 96..127 copies of channels 0..31 (gate and up rows), whose own
    down columns are a tenth of the others': magnitude removes exactly the copies at fraction 0.25."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight[96:] = mlp.gate_proj.weight[:32]
            mlp.up_proj.weight[96:] = mlp.up_proj.weight[:32]
            mlp.down_proj.weight[:, :96] *= 10
    return model


def test_fusing_exact_duplicates_reproduces_the_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    dense = _with_duplicates()(ids).logits
    fused, dropped = _with_duplicates(), _with_duplicates()
    report = compress_(fused, _recipe(fraction=0.25, score="magnitude", fusion="ot"), None, progress=False)
    compress_(dropped, _recipe(fraction=0.25, score="magnitude"), None, progress=False)
    assert fused.config.intermediate_size == dropped.config.intermediate_size == 96
    assert [r["fused"] for r in report.layers] == [32, 32]
    assert torch.allclose(fused(ids).logits, dense, atol=1e-5)
    assert (dropped(ids).logits - dense).abs().max() > 1e-3  # the copies' outputs are lost
    save(fused, make_tokenizer(), tmp_path / "fused")  # a stock checkpoint of the smaller width
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["intermediate_size"] == 96
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert torch.allclose(stock(ids).logits, dense, atol=1e-5)


@pytest.mark.parametrize("R, K", [(20, 50), (60, 40), (30, 30)])
def test_the_plan_has_the_asked_marginals(R, K):
    C = torch.rand(R, K, generator=torch.Generator().manual_seed(R)) * 4
    P = fusion_plan(C, reg=0.05)
    assert P.shape == (R, K) and (P >= 0).all()
    assert torch.allclose(P.sum(1), torch.ones(R, dtype=P.dtype), atol=1e-6)  # each removed channel goes whole
    cap = max(1.0, R / K)
    assert (P.sum(0) <= cap + 1e-6).all()  # no kept channel takes more than its capacity
    if R >= K:  # no spare capacity: every kept channel is full
        assert torch.allclose(P.sum(0), torch.full((K,), cap, dtype=P.dtype), atol=1e-6)


def test_sinkhorn_reaches_the_optimal_assignment_as_reg_shrinks():
    g = torch.Generator().manual_seed(0)
    C = torch.rand(6, 6, generator=g) * 4
    best = min(sum(C[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
    a = torch.rand(6, generator=g) + 0.5
    b = torch.rand(6, generator=g) + 0.5
    b = b * a.sum() / b.sum()
    P = sinkhorn(C, a, b, reg=0.1)
    assert torch.allclose(P.sum(1), a.double(), atol=1e-6) and torch.allclose(P.sum(0), b.double(), atol=1e-9)
    ones = torch.ones(6)
    gaps = [float((sinkhorn(C, ones, ones, reg) * C).sum() - best) for reg in (0.5, 0.1, 0.01)]
    assert gaps[0] >= gaps[1] >= gaps[2] >= -1e-9 and gaps[2] < 1e-3
    # capacities (3 removed channels, 6 kept ones taking one each): the best injective assignment
    C = C[:3]
    best = min(sum(C[i, p[i]] for i in range(3)) for p in itertools.permutations(range(6), 3))
    P = fusion_plan(C, reg=0.01)
    assert float((P * C).sum() - best) < 1e-3


def test_fusion_with_a_data_free_score_reads_no_data():
    assert not _recipe(score="magnitude", fusion="ot").needs_data
    assert not _recipe(score="obspa", fusion="ot").needs_data
    assert _recipe(score="wanda", fusion="ot").needs_data


@pytest.mark.parametrize("structured, message", [
    ({"fusion": "ot", "compensate": True}, "fusion ot replaces compensation"),
    ({"fusion": "ot", "unit": "heads"}, "applies to unit channels only, not heads"),
    ({"fusion": "ot", "fusion_reg": 0.0}, r"fusion_reg must be in \(0, 1\], got 0.0"),
    ({"fusion": "ot", "fusion_reg": 2}, r"fusion_reg must be in \(0, 1\], got 2.0"),
    ({"fusion": "sinkhorn"}, "fusion must be one of none, ot"),
    ({"fusion_reg": 0.1}, "fusion_reg needs fusion ot"),
])
def test_bad_fusion_recipes(structured, message):
    with pytest.raises(ValueError, match=message):
        _recipe(**structured)
