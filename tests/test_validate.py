"""Score validation: rank correlation, the random band, exact restoration, the CLI."""

import copy
import json

import pytest
import torch
from conftest import batches, tiny_model

from compress.cli import main
from compress.evaluate import heldout_loss
from compress.fpquant import FORMATS, rtn_float
from compress.grid import QuantSpec, rtn
from compress.validate import FORMAT_KINDS, POOLED, Unit, null_band, perturbed, spearman, summarize, validate_scores


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
                                  Unit("quant", "model.layers.1.self_attn.q_proj"),
                                  Unit("nvfp4", "model.layers.1.mlp.gate_proj"),
                                  Unit("bf16", "model.layers.0.self_attn.k_proj")])
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


def test_validate_reports_every_score_and_kind_and_format_units_leave_the_others_alone():
    """Format units come on top: the other kinds keep their samples, measurements and scores exactly;
    every format rounds the same Linears, and the pooled row covers all of their units."""
    model = tiny_model("llama")
    data = (batches(4, 16), [torch.cat(batches(2, 16, seed=1))])
    without = validate_scores(model, *data, groups=5, quants=4, formats=0, progress=False)
    result = validate_scores(model, *data, groups=5, quants=4, formats=3, progress=False)
    assert {r["kind"] for r in without["units"]} == {"block", "group", "quant"}
    assert len(without["units"]) == 2 + 5 + 4 and POOLED not in without["spearman"]
    assert result["units"][:11] == without["units"]
    assert all(json.dumps(result[k][kind]) == json.dumps(without[k][kind])  # as text: NaN ratios compare equal
               for k in ("spearman", "null95", "ratio") for kind in without[k])
    fmt = result["units"][11:]
    assert len(fmt) == 3 * len(FORMAT_KINDS) and {"nvfp4", "mxfp4", "fp8"} <= set(FORMAT_KINDS)
    linears = {k: [r["target"] for r in fmt if r["kind"] == k] for k in FORMAT_KINDS}
    assert all(len(set(t)) == 3 and t == linears["nvfp4"] for t in linears.values())
    assert set(result["spearman"]) == {"block", "group", "quant", *FORMAT_KINDS, POOLED}
    assert set(result["spearman"][POOLED]) == {"magnitude", "wanda", "hessian", "fisher", "kfac", "random"}
    assert result["null95"][POOLED] == null_band(len(fmt)) and set(result["ratio"][POOLED]) == {"fisher", "kfac"}
    for t in linears["nvfp4"]:  # 4-bit floats err more than fp8, fp8 more than bfloat16
        err = {r["kind"]: r["magnitude"] for r in fmt if r["target"] == t}
        assert err["nvfp4"] > err["fp8"] > err["bf16"] > 0, err
    assert "block influence" in result["spearman"]["block"]
    assert all(-1 <= rho <= 1 for kind in result["spearman"].values() for rho in kind.values())


def test_pooled_format_row_ranks_across_formats():
    """A score that orders the units within each format but puts the formats in the wrong order has ρ = +1
    per format and a lower pooled ρ; one that orders them all has +1 pooled too."""
    rows = [{"kind": kind, "target": f"l{i}", "col": 0, "measured": m, "all": m, "within": m - off, "fisher": 2 * m}
            for kind, base, off in (("fp8", 0.01, 0.0), ("nvfp4", 1.0, 10.0)) for i, m in
            enumerate([base, 2 * base, 3 * base])]
    result = summarize(rows)
    assert result["spearman"]["fp8"]["within"] == result["spearman"]["nvfp4"]["within"] == pytest.approx(1.0)
    assert result["spearman"][POOLED]["within"] == pytest.approx(1 - 6 * 6 * 9 / (6 * 35))  # every rank off by 3
    assert result["spearman"][POOLED]["all"] == pytest.approx(1.0)
    assert result["ratio"][POOLED] == {"fisher": pytest.approx(2.0)}
    assert result["null95"][POOLED] == null_band(6)


def test_summary_correlates_each_kind_on_its_own_and_takes_the_median_ratio():
    """Hand-made rows: a score ordered as the measured increase has ρ = +1, one ordered against it −1,
    within each unit kind separately; Fisher's ratio is the median of predicted/measured over the units
    whose measured increase is positive."""
    measured = [0.5, 0.1, 0.3, -0.02, 0.2, 0.4]
    fisher = [1.5, 0.1, 3.0, 7.0, 0.2, 2.0]  # ratios 3, 1, 10, (skipped), 1, 5 -> median 3
    rows = [{"kind": "group", "target": f"l{i}", "col": 0, "measured": m, "agrees": 7 * m + 1, "against": -m,
             "fisher": f} for i, (m, f) in enumerate(zip(measured, fisher))]
    rows += [{"kind": "block", "target": str(i), "col": 0, "measured": m, "agrees": -m, "against": m, "fisher": 2 * m}
             for i, m in enumerate([0.3, 0.1, 0.2])]
    result = summarize(rows)
    assert result["spearman"]["group"]["agrees"] == pytest.approx(1.0)
    assert result["spearman"]["group"]["against"] == pytest.approx(-1.0)
    assert result["spearman"]["block"]["agrees"] == pytest.approx(-1.0)  # kinds are not pooled
    assert result["ratio"] == {"group": {"fisher": pytest.approx(3.0)}, "block": {"fisher": pytest.approx(2.0)}}
    assert result["null95"] == {"group": null_band(6), "block": null_band(3)}


def test_measured_increases_are_the_units_own_and_input_aware_scores_see_dead_inputs(monkeypatch):
    """Block 0's v_proj and up_proj are zeroed, so o_proj and down_proj there get all-zero inputs:
    removing or rounding their weights changes nothing, and every score that weighs by the inputs
    (wanda, hessian, fisher, kfac) predicts exactly 0 while magnitude does not. Every measured increase
    is the held-out loss with that unit perturbed by hand, minus the intact model's; the same for every
    format unit."""
    import compress.validate

    monkeypatch.setattr(compress.validate, "null_band", lambda n: (-1.0, 1.0))  # not looked at here; slow
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.zero_()
        model.model.layers[0].mlp.up_proj.weight.zero_()
    heldout = [torch.cat(batches(2, 16, seed=1))]
    result = validate_scores(model, batches(4, 16), heldout, groups=14, quants=14, formats=14, progress=False)
    base = heldout_loss(model, heldout)
    dead = {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    assert {(r["kind"], r["target"]) for r in result["units"] if r["target"] in dead} == {
        (k, t) for k in ("group", "quant", *FORMAT_KINDS) for t in dead}
    for r in result["units"]:
        by_hand = copy.deepcopy(model)
        if r["kind"] == "block":
            del by_hand.model.layers[int(r["target"])]
        else:
            W = by_hand.get_submodule(r["target"]).weight
            with torch.no_grad():
                if r["kind"] == "group":
                    W[:, r["col"] : r["col"] + 64] = 0
                elif r["kind"] == "quant":
                    W.copy_(rtn(W, QuantSpec(bits=3, group_size=128, sym=False)).weight)
                elif r["kind"] == "bf16":
                    W.copy_(W.to(torch.bfloat16))
                else:
                    W.copy_(rtn_float(W, FORMATS[r["kind"]]).weight)
        assert r["measured"] == pytest.approx(heldout_loss(by_hand, heldout) - base, rel=1e-5, abs=1e-7), r
        if r["target"] in dead:
            assert r["measured"] == 0.0
            assert r["wanda"] == r["hessian"] == r["fisher"] == r["kfac"] == 0.0 and r["magnitude"] > 0, r
        elif r["kind"] != "block":
            assert r["wanda"] > 0 or r["magnitude"] == 0, r  # the live inputs (or a zero weight) are seen


def test_score_cli_writes_table_json_and_plot(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "scores"
    rc = main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "4", "--heldout", "2",
               "--seqlen", "16", "--validate", "--groups", "4", "--quants", "3", "--formats", "2", "--out", str(out),
               "--quiet"])
    assert rc == 0
    assert "Spearman" in capsys.readouterr().out
    result = json.loads((out / "validation.json").read_text())
    assert sum(r["kind"] in FORMAT_KINDS for r in result["units"]) == 2 * len(FORMAT_KINDS)
    assert "all formats pooled" in (out / "validation.md").read_text() and POOLED in result["spearman"]
    assert (out / "validation.md").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_score_cli_layer_table_and_bad_input(tiny_dir, text_file, tmp_path, capsys):
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "2", "--seqlen", "16",
                 "--quiet"]) == 0
    assert "block influence" in capsys.readouterr().out
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--validate", "--formats", "-1"]) == 2
    assert "--formats must be >= 0" in capsys.readouterr().err
    assert main(["score", str(tiny_dir), "--calib", str(tmp_path / "missing.txt")]) == 2
