from pathlib import Path

import pytest
import torch

from compress import LeanQuant, Magnitude, SparseGpt, Wanda
from compress.recipe import dump_recipe, load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_folder_has_the_foundation_recipes():
    names = {p.stem for p in RECIPES}
    assert {"magnitude-50", "wanda-50", "wanda-2of4", "sparsegpt-50", "sparsegpt-2of4"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.steps
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again) == recipe


def test_unknown_key_names_the_key_a_close_match_and_the_valid_keys():
    with pytest.raises(ValueError) as e:
        recipe_from_dict({"steps": [{"prune": {"method": "wanda", "sparsty": 0.5}}]})
    msg = str(e.value)
    assert "'sparsty'" in msg and "did you mean 'sparsity'" in msg and "valid keys:" in msg and "pattern" in msg


def test_unknown_top_level_key_and_step_kind():
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        recipe_from_dict({"stepz": []})
    with pytest.raises(ValueError, match="unknown step kind 'prnue'.*did you mean 'prune'"):
        recipe_from_dict({"steps": [{"prnue": {}}]})


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        recipe_from_dict({"steps": [{"prune": {"sparsity": sparsity}}]})


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_n_m_patterns_are_rejected(pattern):
    with pytest.raises(ValueError, match="pattern"):
        recipe_from_dict({"steps": [{"prune": {"pattern": pattern}}]})


def test_n_m_sparsity_must_agree_with_the_pattern():
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        recipe_from_dict({"steps": [{"prune": {"pattern": "2:4", "sparsity": 0.6}}]})
    assert recipe_from_dict({"steps": [{"prune": {"pattern": "4:8", "sparsity": 0.5}}]}).steps[0].n_m == (4, 8)


def test_wrong_types_are_rejected():
    with pytest.raises(ValueError, match="calib.samples must be int"):
        recipe_from_dict({"steps": [{"prune": {}}], "calib": {"samples": "many"}})
    with pytest.raises(ValueError, match="method must be one of"):
        recipe_from_dict({"steps": [{"prune": {"method": "wandaa"}}]})


def test_overrides_apply_typed_values():
    raw = {"steps": [{"prune": {"method": "wanda", "sparsity": 0.5}}], "calib": {"samples": 8}}
    recipe = recipe_from_dict(raw, ["steps.0.sparsity=0.6", "calib.samples=64", "steps.0.prune.method=magnitude",
                                    "steps.0.ignore=['*.down_proj']"])
    assert recipe.steps[0] == Magnitude(sparsity=0.6, ignore=("*.down_proj",))
    assert recipe.calib.samples == 64


def test_bad_override_is_a_clear_error():
    with pytest.raises(ValueError, match="key=value"):
        recipe_from_dict({"steps": [{"prune": {}}]}, ["steps.0.sparsity"])
    with pytest.raises(ValueError, match="no index 3"):
        recipe_from_dict({"steps": [{"prune": {}}]}, ["steps.3.sparsity=0.1"])


def test_needs_follow_the_method():
    assert Magnitude().needs == set()
    assert Wanda().needs == {"x_sq"}
    assert SparseGpt().needs == {"xtx"}


@pytest.mark.parametrize("quantize, message", [
    ({"method": "leanquant", "group_size": 128}, "leanquant learns one grid per output row"),
    ({"method": "rtn", "outlier_fraction": 0.01}, "outlier_fraction applies to method gptq, not rtn"),
    ({"method": "gptq", "outlier_fraction": 0.6}, r"outlier_fraction must be in \[0, 0.5\)"),
    ({"method": "awq", "hessian": "guided"}, "hessian applies to method gptq or leanquant, not awq"),
    ({"method": "gptq", "hessian": "guided", "outlier_fraction": 0.01},
     r"outlier_fraction \(OWQ\) does not combine with hessian guided"),
    ({"method": "gptq", "hessian": "guided", "lm_head": True}, "hessian guided does not combine with lm_head"),
    ({"method": "gptq", "hessian": "guided", "guided_groups": 0}, "guided_groups must be >= 1"),
    ({"method": "leanquant", "group_size": -1, "lut_exponent": -1}, "lut_exponent must be >= 0"),
    ({"method": "leanquant", "group_size": -1, "allocation": "fisher", "bits_choices": [3, 4], "avg_bits": 3.5},
     "allocation fisher"),
])
def test_seed_method_options_are_validated(quantize, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict({"steps": [{"quantize": quantize}]})


def test_seed_methods_cannot_follow_lowrank():
    with pytest.raises(ValueError, match="cannot follow lowrank"):
        recipe_from_dict({"steps": [{"lowrank": {}}, {"quantize": {"method": "leanquant", "group_size": -1}}]})


def test_seed_methods_need_input_statistics():

    assert LeanQuant(group_size=-1).needs == {"xtx"}
    assert recipe_from_dict({"steps": [{"quantize": {"hessian": "guided"}}]}).needs_data


@pytest.mark.parametrize("kind, method, bad", [
    ("prune", "wanda", {"sparsity": 1.5}),
    ("prune", "sparsegpt", {"damp": 0.0}),
    ("prune", "maskllm", {"tau_end": 0.0}),
    ("quantize", "gptq", {"bits": 9}),
    ("quantize", "gptq", {"block_size": 100, "group_size": 64}),
    ("quantize", "leanquant", {"lut_exponent": -1.0}),
    ("quantize", "awq", {"awq_grid": 0}),
    ("lowrank", None, {"keep": 1.5}),
    ("structured", None, {"fraction": 0.0}),
    ("distill", None, {"steps": 0}),
])
def test_a_config_built_in_python_fails_with_the_yamls_line(kind, method, bad):
    from compress.recipe import STEPS

    cls = STEPS[kind] if method is None else STEPS[kind][method]
    with pytest.raises(ValueError) as python:
        cls(**bad)
    body = bad if method is None else {"method": method, **bad}
    with pytest.raises(ValueError) as yaml_error:
        recipe_from_dict({"steps": [{kind: body}]})
    assert str(python.value) == str(yaml_error.value) and "\n" not in str(python.value)


def test_the_prune_base_validates_and_cannot_run_on_its_own():
    from compress import Prune, Recipe

    with pytest.raises(ValueError, match=r"^prune.sparsity must be in \[0, 1\), got 1.5$"):
        Prune(sparsity=1.5)
    with pytest.raises(ValueError, match="build one of its methods: Wanda, Magnitude, SparseGpt, MaskLlm"):
        Recipe(steps=(Prune(sparsity=0.5),))


def test_every_whole_model_phase_has_its_work_and_a_reason_for_not_streaming():
    from compress import Structured
    from compress.phases import BEFORE_BLOCKS, phases

    steps = [s for path in RECIPES for s in load_recipe(path).steps] + [Structured(allocation="fisher")]
    seen = set()
    for step in steps:
        for phase in phases(step):
            seen.add(phase.work)
            assert phase.where != "model" or phase.work in BEFORE_BLOCKS, (step, phase)
            assert phase.streams or phase.why, (step, phase)
    assert set(BEFORE_BLOCKS) <= seen  # no whole-model work is left without a step that asks for it


def test_one_step_runs_like_a_recipe_of_it():
    from conftest import tiny_model

    from compress import Recipe, Rtn, compress_

    a, b = tiny_model(), tiny_model()
    compress_(a, Rtn(bits=4, group_size=32), progress=False)
    compress_(b, Recipe(steps=(Rtn(bits=4, group_size=32),)), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
