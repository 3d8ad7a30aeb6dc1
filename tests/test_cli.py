import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_args(tiny_dir, text_file, out, *extra, recipe="sparsegpt-50"):
    return ["run", str(ROOT / "recipes" / f"{recipe}.yaml"), "--model", str(tiny_dir), "--out", str(out),
            "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32",
            "--eval-data", str(text_file), "--eval-seqlen", "64", "--quiet", *extra]


def test_run_end_to_end_writes_a_loadable_model_and_a_report(tiny_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(run_args(tiny_dir, text_file, out)) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "sparsegpt-50" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("ppl", "dense_ppl", "compress_seconds", "peak_rss_mb", "layers"):
        assert key in report
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert {r["module"] for r in report["layers"]} and all(r["sparsity"] == 0.5 for r in report["layers"])
    assert "samples: 4" in (out / "recipe.yaml").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == 0.5


def test_eval_json(tiny_dir, text_file, capsys):
    assert main(["eval", str(tiny_dir), "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"ppl", "tokens", "seqlen", "seconds"} and result["ppl"] > 1 and result["tokens"] > 0
    assert result["seqlen"] == 64  # within the tiny model's positions: used as asked


def test_set_overrides_reach_the_run(tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(run_args(tiny_dir, text_file, out, "--set", "steps.0.sparsity=0.75", "--no-dense-eval")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.75, abs=1e-6) and "dense_ppl" not in report


def test_python_dash_m_runs_the_cli_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compress", "eval", str(tmp_path / "nope"), "--data", "x"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model not found") and "Traceback" not in proc.stderr


def test_quantize_then_eval_inspect_and_convert_dense(tiny_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out, dense = tmp_path / "q", tmp_path / "dense"
    assert main(run_args(tiny_dir, text_file, out, "--set", "steps.0.group_size=32", recipe="gptq-w4g128")) == 0
    ppl = json.loads((out / "report.json").read_text())["ppl"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(ppl, rel=1e-6)  # reloaded as QuantLinear

    assert main(["inspect", str(out), "--json"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q["type"], q["bits"], q["group"]) == ("quant", 4, 32)
    assert q["bytes"] / q["fp16_bytes"] < 0.29  # 4-bit codes + one float16 scale per 32 weights
    assert rows["lm_head"]["type"] == "dense"  # listed (the tiny model's head is untied) and left unquantized
    assert main(["inspect", str(out)]) == 0
    assert "quantized Linears" in capsys.readouterr().out

    assert main(["convert", str(out), "--dense", "--out", str(dense), "--quiet"]) == 0
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config and "compression_config" not in config
    capsys.readouterr()
    assert main(["eval", str(dense), "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(ppl, rel=1e-5)
    AutoModelForCausalLM.from_pretrained(dense)  # plain checkpoint


def test_inspect_and_convert_reject_bad_paths(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "o").exists()
