"""Fisher pass, layer scores and the budget allocator."""

import itertools

import pytest
import torch
from conftest import batches, tiny_model

from compress.allocate import allocate, plan_steps, pruning_curve, sparsity_grid, spread
from compress.apply import compress_
from compress.calibrate import dense_pass
from compress.model import block_linears, weight_matrix
from compress.recipe import recipe_from_dict
from compress.scores import block_influence, lamp, large_weight_fraction, outlier_count
from compress.stats import collect_fisher


def _plan(model, recipe, data):
    return plan_steps(model, recipe.steps, data, score_samples=recipe.calib.score_samples, progress=False)


def _all_linears(model):
    return {**block_linears(model, 0), **block_linears(model, 1)}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_fisher_diagonal_is_mean_squared_per_sequence_gradient(model_type):
    model = tiny_model(model_type)
    linears = _all_linears(model)
    data = batches(3, 16)
    fisher = collect_fisher(model, data, linears)
    # the same by plain autograd, one sequence at a time
    params = {f: m.weight for f, m in linears.items()}
    expect = {f: 0 for f in linears}
    for ids in data:
        grads = torch.autograd.grad(model(ids, labels=ids).loss, list(params.values()))
        for f, g in zip(params, grads):
            g = g.t() if model_type == "gpt2" else g
            expect[f] = expect[f] + g.square() / len(data)
    for f in linears:
        assert fisher[f].n_samples == 3
        torch.testing.assert_close(fisher[f].diagonal, expect[f], rtol=1e-4, atol=1e-12)
    # gradients freed and nothing left trainable that was not before
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_kfac_factors_reproduce_the_gradient_of_one_token():
    """With one sequence of one target token, ∂L/∂W = g xᵀ, so G ⊗ A's diagonal is the squared
    gradient: diag(G)_i · diag(A)_j = (g_i x_j)² exactly."""
    model = tiny_model("llama")
    fqn = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(fqn)
    ids = batches(1, 2)[0]  # two tokens, one prediction: the loss reads position 0 only
    fisher = collect_fisher(model, [ids], {fqn: linear}, kfac=[fqn])[fqn]
    A, G = fisher.kfac
    assert A.shape == (linear.in_features,) * 2 and G.shape == (linear.out_features,) * 2
    torch.testing.assert_close(A, A.t())
    # position 1's output gradient is zero (no label after it), position 0 carries the loss
    x0 = _input_of(model, linear, ids)[0]
    torch.testing.assert_close(A * 2, torch.outer(x0, x0) + torch.outer(*[_input_of(model, linear, ids)[1]] * 2))
    outer = torch.outer(G.diagonal(), x0.square())
    torch.testing.assert_close(outer, fisher.diagonal, rtol=1e-4, atol=1e-12)


def _input_of(model, linear, ids):
    seen = []
    h = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen[0][0]


def test_allocate_is_optimal_on_small_instances():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        units = [f"u{i}" for i in range(4)]
        cost = {u: torch.rand(4, generator=g).tolist() for u in units}
        size = {u: (torch.rand(4, generator=g) * 10).tolist() for u in units}
        budget = float(torch.rand(1, generator=g) * 20 + 5)
        feasible = [(sum(cost[u][k] for u, k in zip(units, ks)), ks)
                    for ks in itertools.product(range(4), repeat=4)
                    if sum(size[u][k] for u, k in zip(units, ks)) <= budget]
        if sum(min(size[u]) for u in units) > budget:
            with pytest.raises(ValueError, match="budget"):
                allocate(cost, size, budget)
            continue
        pick = allocate(cost, size, budget, bins=100_000)
        assert sum(size[u][pick[u]] for u in units) <= budget * (1 + 1e-9)
        best = min(feasible)[0]
        # optimal up to the bin rounding, which can only exclude choices within units/bins of the edge
        assert sum(cost[u][pick[u]] for u in units) <= best + 1e-9 or _near_edge(feasible, size, units, budget)


def _near_edge(feasible, size, units, budget):
    best_cost, ks = min(feasible)
    return sum(size[u][k] for u, k in zip(units, ks)) > budget * (1 - 4 / 100_000)


def test_allocate_spends_where_it_saves_most():
    # two layers of equal size; pruning "a" costs 10x more per step, so "b" takes the sparsity
    grid = [0.5, 0.6, 0.7, 0.8, 0.9]
    cost = {"a": [10 * s for s in grid], "b": [s for s in grid]}
    size = {u: [100 * (1 - s) for s in grid] for u in cost}
    pick = allocate(cost, size, budget=2 * 100 * 0.3)
    assert (grid[pick["a"]], grid[pick["b"]]) == (0.5, 0.9)


def test_spread_keeps_the_mean_and_orders_inversely():
    out = spread({"a": 3.0, "b": 1.0, "c": 2.0}, mean=0.7, width=0.08)
    assert sum(out.values()) / 3 == pytest.approx(0.7)
    assert out["a"] < out["c"] < out["b"]
    assert max(out.values()) - min(out.values()) == pytest.approx(0.16)


def test_pruning_curve_sums_the_lowest_saliencies():
    s = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
    assert pruning_curve(s, [0.0, 0.25, 0.5, 1.0]) == [0.0, 1.0, 3.0, 10.0]
    assert sparsity_grid(0.7, 0.1)[0] == pytest.approx(0.6) and sparsity_grid(0.7, 0.1)[-1] == pytest.approx(0.8)


def test_lamp_is_normalized_tail_energy():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    score = lamp(W)
    assert score[1, 0] == 1.0  # the largest weight: its own energy over itself
    assert score[1, 1] == pytest.approx(0.25 / (0.25 + 1 + 4 + 9))
    assert score[0, 1] == pytest.approx(4 / 13)


def test_layer_scores_on_hand_made_inputs():
    h = torch.randn(2, 5, 8)
    assert block_influence(h, h) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h) == pytest.approx(2.0)
    W = torch.ones(2, 4)
    x_norm = torch.tensor([1.0, 1.0, 1.0, 100.0])  # one outlier input column
    assert outlier_count(W, x_norm, m=3) == 2
    assert outlier_count(W, torch.ones(4), m=3) == 0
    assert large_weight_fraction(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])) == pytest.approx(0.2)


def test_dense_pass_changes_nothing_and_sees_every_linear():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = dense_pass(model, batches(2, 16))
    assert set(result.x_norm) == set(_all_linears(model))
    assert len(result.influence) == 2 and all(0 <= b <= 2 for b in result.influence)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _recipe(step: dict, **calib):
    return recipe_from_dict({"calib": {"samples": 4, "seqlen": 16, **calib}, "steps": [step]})


@pytest.mark.parametrize("allocation", ["owl", "dlp", "lamp", "fisher", "measured"])
def test_allocated_sparsity_meets_the_mean_and_varies(allocation):
    model = tiny_model("llama")
    recipe = _recipe({"prune": {"method": "wanda", "sparsity": 0.7, "allocation": allocation}})
    data = batches(4, 16)
    plan = _plan(model, recipe, data)
    linears = _all_linears(model)
    assert set(plan) == {(0, f) for f in linears}
    sizes = {f: weight_matrix(m).numel() for f, m in linears.items()}
    mean = sum(plan[(0, f)].sparsity * n for f, n in sizes.items()) / sum(sizes.values())
    if allocation in ("owl", "dlp"):  # one sparsity per block, averaging to the mean over blocks
        assert mean == pytest.approx(0.7, abs=1e-9)
    else:  # the knapsack keeps no more than the budget, and spends nearly all of it
        assert 0.7 - 1e-9 <= mean <= 0.705
    values = [plan[(0, f)].sparsity for f in linears]
    assert max(values) > min(values) and 0.6 - 1e-9 <= min(values) and max(values) <= 0.8 + 1e-9
    report = compress_(model, recipe, data, progress=False)
    assert report.sparsity == pytest.approx(mean, abs=0.01)


def test_mixed_bits_meet_the_average_and_use_both_widths():
    model = tiny_model("llama")
    recipe = _recipe({"quantize": {"method": "rtn", "group_size": 32, "allocation": "fisher",
                                   "bits_choices": [3, 4], "avg_bits": 3.5}})
    data = batches(4, 16)
    plan = _plan(model, recipe, data)
    sizes = {f: weight_matrix(m).numel() for f, m in _all_linears(model).items()}
    avg = sum(plan[(0, f)].bits * n for f, n in sizes.items()) / sum(sizes.values())
    assert 3.3 <= avg <= 3.5 and {s.bits for s in plan.values()} == {3, 4}
    report = compress_(model, recipe, data, progress=False)
    bits = {r["module"]: r["bits"] for r in report.layers}
    assert bits == {f: plan[(0, f)].bits for f in sizes}


def test_fisher_prunes_most_where_the_loss_does_not_look():
    """Zero block 1's attention output: its q/k/v no longer reach the loss, so their Fisher is
    zero and the allocation prunes them to the top of the range; the rest make up the mean."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    recipe = _recipe({"prune": {"method": "magnitude", "sparsity": 0.6, "allocation": "fisher",
                                "allocation_range": 0.3}})
    plan = _plan(model, recipe, batches(4, 16))
    sparsity = {f: s.sparsity for (_, f), s in plan.items()}
    for name in ("q_proj", "k_proj", "v_proj"):
        assert sparsity[f"model.layers.1.self_attn.{name}"] == pytest.approx(0.9)
    assert min(sparsity.values()) < 0.6


def test_fisher_allocation_ignores_a_rescaling_that_keeps_the_function():
    """up_proj × 8 and down_proj ÷ 8 compute the same function; ½FW² is unchanged by it."""
    model = tiny_model("llama")
    recipe = _recipe({"prune": {"method": "magnitude", "sparsity": 0.6, "allocation": "fisher"}})
    data = batches(4, 16)
    before = {f: s.sparsity for (_, f), s in _plan(model, recipe, data).items()}
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight.mul_(8)
        mlp.down_proj.weight.div_(8)
    after = {f: s.sparsity for (_, f), s in _plan(model, recipe, data).items()}
    assert after == before


@pytest.mark.parametrize("bad,match", [
    ({"prune": {"sparsity": 0.5, "pattern": "2:4", "allocation": "owl"}}, "unstructured"),
    ({"prune": {"allocation": "owl", "allocation_range": 0.0}}, "allocation_range"),
    ({"quantize": {"bits_choices": [3, 4], "avg_bits": 3.5}}, "needs allocation fisher"),
    ({"quantize": {"allocation": "fisher", "bits_choices": [3, 4], "avg_bits": 4.5}}, "avg_bits"),
    ({"quantize": {"allocation": "fisher", "bits_choices": [4]}}, "two or more"),
    ({"quantize": {"allocation": "fisher", "bits_choices": [3, 4], "avg_bits": 3.5, "target_bytes": 10}}, "one budget"),
    ({"quantize": {"allocation": "fisher", "bits_choices": [3, 4], "target_bytes": 0}}, "target_bytes"),
    ({"quantize": {"allocation": "fisher", "bits_choices": [1, 4], "avg_bits": 3}}, "bits_choices"),
])
def test_bad_allocation_recipes_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        _recipe(bad)


def test_target_bytes_bounds_the_saved_checkpoint(tmp_path, tokenizer):
    from safetensors import safe_open

    from compress.saving import save

    def payload(folder):
        total = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                total += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
        return total

    data = batches(4, 16)
    sizes = {}
    for bits in (2, 8):  # the two uniform extremes of the checkpoint
        model = tiny_model("llama")
        compress_(model, _recipe({"quantize": {"method": "rtn", "bits": bits, "group_size": 32}}), progress=False)
        sizes[bits] = payload(save(model, tokenizer, tmp_path / f"w{bits}"))
    target = (sizes[2] + sizes[8]) // 2
    model = tiny_model("llama")
    recipe = _recipe({"quantize": {"method": "rtn", "group_size": 32, "allocation": "fisher",
                                   "bits_choices": [2, 3, 4, 8], "target_bytes": target}})
    report = compress_(model, recipe, data, progress=False)
    saved = payload(save(model, tokenizer, tmp_path / "budget"))
    assert target * 0.97 <= saved <= target
    assert len({r["bits"] for r in report.layers}) >= 2
    too_small = _recipe({"quantize": {"method": "rtn", "group_size": 32, "allocation": "fisher",
                                      "bits_choices": [2, 3], "target_bytes": sizes[2] - 1}})
    with pytest.raises(ValueError, match="below the smallest"):
        _plan(tiny_model("llama"), too_small, data)


def test_measured_allocation_prunes_a_block_that_does_not_matter():
    """Block 1 with its output projections zeroed adds nothing to the residual stream: pruning it
    costs no loss, so the measured curves send it to the top of the range."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    recipe = _recipe({"prune": {"method": "wanda", "sparsity": 0.6, "allocation": "measured",
                                "allocation_range": 0.3}})
    plan = _plan(model, recipe, batches(4, 16))
    assert all(s.sparsity == pytest.approx(0.9) for (_, f), s in plan.items() if ".layers.1." in f)
    assert all(s.sparsity == pytest.approx(0.3) for (_, f), s in plan.items() if ".layers.0." in f)
