"""Every recipe in recipes/ runs end to end on a tiny model and does what its name says."""

import json
from pathlib import Path

import pytest

from compress.cli import main
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model(path, tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code = main(["run", str(path), "--model", str(tiny_dir), "--out", str(out), "--calib", str(text_file),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--eval-data", str(text_file),
                 "--eval-seqlen", "64", "--no-dense-eval", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    step = load_recipe(path).steps[0]
    assert report["sparsity"] == pytest.approx(step.sparsity, abs=1e-6)
    assert report["ppl"] > 1
