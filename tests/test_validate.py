"""Score validation: rank correlation, the random band, exact restoration, the CLI."""

import json

import pytest
import torch
from conftest import batches, tiny_model

from compress.cli import main
from compress.evaluate import heldout_loss
from compress.validate import Unit, null_band, perturbed, spearman, validate_scores


def test_spearman_on_hand_made_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1000, 2, 3]) == pytest.approx(0.4)  # ranks only, not values
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # ties share a rank


def test_null_band_is_centred_and_narrows_with_n():
    lo, hi = null_band(30)
    assert lo == pytest.approx(-hi, abs=0.1) and 0.2 < hi < 0.5
    assert null_band(200)[1] < hi


@pytest.mark.parametrize("unit", [Unit("block", "1"), Unit("group", "model.layers.0.mlp.down_proj", 3),
                                  Unit("quant", "model.layers.1.self_attn.q_proj")])
def test_perturbation_changes_the_loss_and_is_undone(unit):
    model = tiny_model("llama")
    from compress.model import block_linears

    linears = {**block_linears(model, 0), **block_linears(model, 1)}
    heldout = [torch.cat(batches(2, 16, seed=1))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = heldout_loss(model, heldout)
    with perturbed(model, unit, linears):
        changed = heldout_loss(model, heldout)
    assert changed != base
    assert heldout_loss(model, heldout) == base
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_validate_reports_every_score_and_kind():
    model = tiny_model("llama")
    result = validate_scores(model, batches(4, 16), [torch.cat(batches(2, 16, seed=1))], groups=5, quants=4,
                             progress=False)
    assert {r["kind"] for r in result["units"]} == {"block", "group", "quant"}
    assert len(result["units"]) == 2 + 5 + 4
    assert set(result["spearman"]["group"]) == {"magnitude", "wanda", "hessian", "fisher", "kfac", "random"}
    assert "block influence" in result["spearman"]["block"]
    assert all(-1 <= rho <= 1 for kind in result["spearman"].values() for rho in kind.values())


def test_score_cli_writes_table_json_and_plot(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "scores"
    rc = main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "4", "--heldout", "2",
               "--seqlen", "16", "--validate", "--groups", "4", "--quants", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "Spearman" in capsys.readouterr().out
    assert json.loads((out / "validation.json").read_text())["spearman"]
    assert (out / "validation.md").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_score_cli_layer_table_and_bad_input(tiny_dir, text_file, tmp_path, capsys):
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "2", "--seqlen", "16",
                 "--quiet"]) == 0
    assert "block influence" in capsys.readouterr().out
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["score", str(tiny_dir), "--calib", str(tmp_path / "missing.txt")]) == 2
