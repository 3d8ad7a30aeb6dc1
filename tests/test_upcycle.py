"""evals/upcycle.py: a dense model upcycled into a Mixtral MoE computes the same function, also after
a round trip through disk and after removing experts, while its random routers spread the tokens unevenly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_config, tiny_model

# Loaded from its file, not by putting evals/ on sys.path, where its other scripts could shadow modules.
_spec = importlib.util.spec_from_file_location("upcycle", Path(__file__).resolve().parents[1] / "evals" / "upcycle.py")
upcycle_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upcycle_mod)
drop_experts, expert_counts, upcycle = upcycle_mod.drop_experts, upcycle_mod.expert_counts, upcycle_mod.upcycle


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(TEXT[:2000], return_tensors="pt").input_ids  # about 1,100 tokens


def dense_model(case: str):
    if case != "llama-tied":
        return tiny_model(case)
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True  # as SmolLM2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


def assert_same(got, want, tol=1e-5):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("case", ["llama", "llama-tied", "mistral"])
def test_upcycled_model_computes_the_dense_function(case, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = dense_model(case)
    want = logits(dense, ids)
    moe = upcycle(dense, experts=8, top_k=2, seed=0)
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 8
    assert moe.config.tie_word_embeddings == dense.config.tie_word_embeddings
    assert_same(logits(moe, ids), want)
    moe.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    assert torch.equal(back.model.layers[1].mlp.gate.weight, moe.model.layers[1].mlp.gate.weight)
    assert_same(logits(back, ids), want)


def test_removing_experts_is_lossless(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_model("llama")
    want = logits(dense, ids)
    moe = upcycle(dense, experts=8, top_k=2, seed=0)
    router = moe.model.layers[0].mlp.gate.weight.clone()
    drop_experts(moe, [6, 1, 5])
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 2
    assert torch.equal(moe.model.layers[0].mlp.gate.weight, router[[1, 5, 6]])
    assert moe.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 3
    assert_same(logits(moe, ids), want)
    counts = expert_counts(moe, ids)
    assert counts.shape == (2, 3) and (counts.sum(1) == 2 * ids.shape[1]).all()
    moe.save_pretrained(tmp_path)  # the pruned model is still a stock Mixtral checkpoint
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.config.num_local_experts == 3
    assert_same(logits(back, ids), want)
    drop_experts(moe, [2])  # one expert left: top-k must shrink to 1
    assert moe.config.num_experts_per_tok == 1
    assert_same(logits(moe, ids), want)
    with pytest.raises(ValueError, match="keep must name experts"):
        drop_experts(moe, [1])


def test_seeded_router_spreads_tokens_unevenly(ids):
    dense = tiny_model("llama")
    moe = upcycle(dense, experts=8, top_k=2, seed=0)
    counts = expert_counts(moe, ids)
    n = ids.shape[1]
    assert counts.shape == (2, 8) and (counts.sum(1) == 2 * n).all()
    for row in counts.float():
        assert row.max() < n  # no expert is picked by every token
        assert (row > 0).sum() >= 6  # most experts get tokens
        assert row.max() > 1.25 * row.mean() and row.min() < 0.75 * row.mean()  # but not evenly
    again = upcycle(dense, experts=8, top_k=2, seed=0)
    assert torch.equal(expert_counts(again, ids), counts)
    other = upcycle(dense, experts=8, top_k=2, seed=1)
    assert not torch.equal(other.model.layers[0].mlp.gate.weight, moe.model.layers[0].mlp.gate.weight)


def test_upcycle_refuses_what_mixtral_cannot_hold():
    with pytest.raises(ValueError, match="llama or mistral"):
        upcycle(tiny_model("qwen2"))  # attention biases, among others
    with pytest.raises(ValueError, match="top_k"):
        upcycle(tiny_model("llama"), experts=2, top_k=3)
