"""Tensors left unquantized are saved in the precision the input had (16-bit for a GGUF), not in the
float32 the model computed in; `--save-dtype` overrides it, and the perplexity in report.json is the
saved checkpoint's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def stored_dtypes(folder: Path) -> dict[str, str]:
    """Checkpoint tensor name -> its dtype as the safetensors header records it."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama in bfloat16 with its lm_head tied to the embeddings, as SmolLM2's is."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-bf16")
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(model_dir: Path, text_file: Path, out: Path, *extra: str) -> int:
    return main(["run", str(ROOT / "recipes" / "gptq-w4g128.yaml"), "--model", str(model_dir), "--out", str(out),
                 "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32", "--set",
                 "steps.0.group_size=32", "--quiet", *extra,
                 *([] if "--stream" in extra else ["--eval-data", str(text_file), "--eval-seqlen", "64"])])


def test_a_bfloat16_model_keeps_bfloat16_where_it_is_not_quantized(bf16_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(bf16_dir, text_file, out) == 0
    dtypes = stored_dtypes(out)
    plain = {k: v for k, v in dtypes.items() if k.endswith(".weight")}  # embeddings, norms (lm_head is tied)
    assert "model.embed_tokens.weight" in plain and set(plain.values()) == {"BF16"}
    assert "lm_head.weight" not in dtypes  # still tied to the embeddings: cast once, saved once
    assert dtypes["model.layers.0.mlp.up_proj.weight_packed"] == "I32"  # the quantized Linears keep their format
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # report.json's perplexity is the saved checkpoint's, reloaded in float32 by `compress eval`
    ppl = json.loads((out / "report.json").read_text())["ppl"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(ppl, rel=1e-6)


def test_save_dtype_overrides_the_source_precision(bf16_dir, text_file, tmp_path):
    source, wide = tmp_path / "source", tmp_path / "wide"
    assert run(bf16_dir, text_file, source) == 0
    assert run(bf16_dir, text_file, wide, "--save-dtype", "float32") == 0
    assert stored_dtypes(wide)["model.embed_tokens.weight"] == "F32"
    assert json.loads((wide / "config.json").read_text())["dtype"] == "float32"
    a, b = tensors(source), tensors(wide)
    assert a.keys() == b.keys()
    # the bfloat16 source widened to float32 holds the same values, and the quantized tensors are identical
    assert all(torch.equal(a[k].float(), b[k].float()) if a[k].is_floating_point() else torch.equal(a[k], b[k])
               for k in a)


def test_a_float32_model_stays_float32(tiny_dir, text_file, tmp_path):
    assert run(tiny_dir, text_file, tmp_path / "out") == 0
    assert stored_dtypes(tmp_path / "out")["model.embed_tokens.weight"] == "F32"


def test_streamed_and_in_memory_runs_store_the_same_precision(bf16_dir, text_file, tmp_path):
    assert run(bf16_dir, text_file, tmp_path / "mem") == 0
    assert run(bf16_dir, text_file, tmp_path / "stream", "--stream") == 0
    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "stream")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["dtype"] == "bfloat16"


def test_convert_keeps_the_checkpoints_precision(bf16_dir, text_file, tmp_path):
    assert run(bf16_dir, text_file, tmp_path / "q") == 0
    assert main(["convert", str(tmp_path / "q"), "--out", str(tmp_path / "dense"), "--dense"]) == 0
    dtypes = stored_dtypes(tmp_path / "dense")
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16"


def test_a_gguf_model_is_saved_in_16_bits(smollm2):
    model, _ = smollm2
    assert model.source_dtype == torch.float16
