"""Every recipe in recipes/ runs end to end on a tiny model and does what its name says."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_fit

from compress import Distill, LowRank, Prune, Quantize, Rotate, Structured
from compress.cli import main
from compress.fplinear import CT_FORMAT
from compress.fpquant import FORMATS
from compress.loading import load
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model(path, tiny_dir, text_file, tmp_path, tokenizer):
    out = tmp_path / "out"
    model_dir = tiny_dir
    if path.stem.startswith("experts-"):  # expert removal needs a mixture-of-experts model
        from test_moe import moe_model

        model_dir = tmp_path / "moe"
        moe_model("mixtral", unfused=False).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    # the tiny model has 2 decoder blocks: a fifth of them is none, so layer removal takes one of the two
    layers = ["--set", "steps.0.fraction=0.5"] if path.stem.startswith("layers-") else []
    # a few MaskLLM steps show the run works; the test of what training does is test_maskllm.py's
    short = ["--set", "steps.0.train_steps=5"] if path.stem.startswith("maskllm") else []
    # a distill step trains a few steps on a few short windows
    short += [a for i, s in enumerate(load_recipe(path).steps) if isinstance(s, Distill)
              for a in ("--set", f"steps.{i}.samples=4", "--set", f"steps.{i}.seqlen=32",
                        "--set", f"steps.{i}.steps=3")]
    code = main(["run", str(path), "--model", str(model_dir), "--out", str(out), "--calib", str(text_file),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--eval-data", str(text_file),
                 "--eval-seqlen", "64", "--no-dense-eval", "--quiet", *layers, *short, *tiny_fit(path)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    steps = load_recipe(path).steps
    prune = [s for s in steps if isinstance(s, Prune)]
    # each row drops round(sparsity · 64) weights (64 inputs: half a weight of rounding); a non-uniform
    # allocation reaches its mean on a 0.01 grid
    uniform = not prune or prune[0].allocation == "uniform"
    tolerance = 0.5 / 64 + (0 if uniform else 0.01)
    assert report["sparsity"] == pytest.approx(prune[0].sparsity if prune else 0.0, abs=tolerance)
    for q in [s for s in steps if isinstance(s, Quantize)]:
        rows = [r for r in report["layers"] if r["step"] == "quantize"]
        if q.budget is not None and q.budget.formats:  # mixed formats within the budget, 16-bit ones left out
            assert {r["format"] for r in rows} <= set(q.budget.formats) and 0 < len(rows) <= 14
            total = report["params"]["block_linears"]
            quantized = sum(r["params"] for r in rows)
            stored = sum(r["avg_bits"] * r["params"] for r in rows) + 16 * (total - quantized)
            assert stored / total <= q.budget.avg_bits + 1e-9
            continue
        assert len(rows) == 14
        if q.budget is not None:  # mixed precision within its budget
            assert {r["bits"] for r in rows} <= set(q.budget.choices)
            mean = sum(r["bits"] * r["params"] for r in rows) / sum(r["params"] for r in rows)
            assert q.budget.avg_bits is None or mean <= q.budget.avg_bits + 1e-9
        else:
            assert all(r["bits"] == (q.bits if q.format == "int" else FORMATS[q.format].element_bits) for r in rows)
        config = json.loads((out / "config.json").read_text())
        outliers, sparse = getattr(q, "outliers", None), getattr(q, "sparse", None)
        if q.method == "leanquant" or outliers or sparse:  # our own layouts
            kinds = {m["type"] for m in config["compression_config"]["modules"].values()}
            kind = "lut" if q.method == "leanquant" else "owq" if outliers else "densesparse"
            assert kinds == {kind} and "quantization_config" not in config
        else:
            assert config["quantization_config"]["format"] == CT_FORMAT.get(q.format, "pack-quantized")
        if prune:  # the zeros survive quantization
            assert all(r["sparsity"] >= prune[0].sparsity for r in rows)
        if q.act_format is not None:  # the format's activations, recorded for compress.load
            modules = config["compression_config"]["modules"].values()
            assert sum(m.get("act") == q.act_format for m in modules) == 14
        elif q.act is not None:  # simulated activation quantization is recorded for compress.load
            modules = config["compression_config"]["modules"].values()
            assert sum(m.get("act_bits") == q.act.bits for m in modules) == 14
    for step in steps:
        if isinstance(step, Rotate):
            assert [r["step"] for r in report["layers"]].count("rotate") == 1
        if isinstance(step, LowRank):  # every block Linear factored within its parameter share
            rows = [r for r in report["layers"] if r["step"] == "lowrank"]
            assert len(rows) == 14 and all(r["keep"] <= step.keep for r in rows)
        if isinstance(step, Distill):  # it trained, and the saved weights keep the earlier zeros
            assert report["distill"]["steps"] == 3 and report["distill"]["train"] == step.train
            model, _ = load(out)
            n, m = prune[0].n_m
            for fqn, mod in model.named_modules():
                if ".layers." in fqn and isinstance(mod, torch.nn.Linear):
                    assert ((mod.weight.reshape(-1, m) == 0).sum(-1) >= m - n).all(), fqn
        if isinstance(step, Structured | LowRank):  # the model really shrank
            assert report["params"]["block_linears"] < report["dense_params"]["block_linears"]
    assert report["ppl"] > 1
