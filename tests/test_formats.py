"""Every compressed-Linear format in layers.FORMATS through the paths that store it: save -> load,
`convert --dense`, and a --stream run killed after block 0 and resumed. One case per class; the
recipe that makes it where one does (a new format without a case here fails the first test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_reloaded_equal, batches, tiny_fit, tiny_model

import compress.stream
from compress.cli import main
from compress.compressed import CompressedLinear
from compress.layers import FORMATS

ROOT = Path(__file__).resolve().parents[1]

# kind -> the recipe that makes that class (Sparse24Linear: 2:4 magnitude pruning, then packed by hand;
# BitmaskLinear: a pruning recipe saved with --sparse-format bitmask, FLAGS)
RECIPES = {"quant": "gptq-w4g128", "actquant": "rtn-w4a4", "owq": "owq-w3-3.1bit",
           "densesparse": "gptq-w3g128+sparse0.5", "lut": "leanquant-w4", "lowrank": "svd-80",
           "sparse24": "magnitude-2of4", "bitmask": "wanda-50", "fp": "gptq-nvfp4a16"}
FLAGS = {"bitmask": ["--sparse-format", "bitmask"]}  # kind -> what `compress run` needs besides the recipe
STREAMED = [k for k in RECIPES if k != "sparse24"]  # rrs-w4a4 rotates the whole model: rtn-w4a4 streams W4A4
SIGKILLED = {"lut", "actquant"}  # killed for real, in a process of their own; the others by an exception in place
CALIB = ["--calib-samples", "4", "--calib-seqlen", "32"]


def recipe_path(kind: str) -> Path:
    return ROOT / "recipes" / f"{RECIPES[kind]}.yaml"


def everything(cls: type) -> set[type]:
    return {cls} | {d for c in cls.__subclasses__() for d in everything(c)}


def test_the_table_holds_every_compressed_linear_and_each_has_a_case():
    import compress.layers
    import compress.quantlinear

    ours = {c for c in everything(CompressedLinear) if c.__module__.startswith("compress.")}
    assert ours - {CompressedLinear} == set(FORMATS.values())
    assert all(cls.kind == kind for kind, cls in FORMATS.items())
    for module in (compress.layers, compress.quantlinear):  # no nn.Module there outside the protocol
        classes = {v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__}
        assert all(issubclass(c, CompressedLinear) for c in classes if issubclass(c, torch.nn.Module))
    assert set(RECIPES) == set(FORMATS)


def compressed(kind: str):
    """A tiny Llama whose decoder-block Linears are of FORMATS[kind] (the low-rank ones' factors plain)."""
    from compress.apply import compress_
    from compress.layers import Sparse24Linear
    from compress.model import blocks_path, decoder_blocks, set_module
    from compress.recipe import load_recipe
    from compress.saving import store_sparse_

    model = tiny_model("llama")
    recipe = load_recipe(recipe_path(kind), tiny_fit(recipe_path(kind))[1::2])
    compress_(model, recipe, batches(4, 32) if recipe.needs_data else None, progress=False)
    if kind == "sparse24":
        for name, m in list(decoder_blocks(model).named_modules()):
            if isinstance(m, torch.nn.Linear):
                set_module(model, f"{blocks_path(model)}.{name}", Sparse24Linear.from_linear(m))
    if kind == "bitmask":
        store_sparse_(decoder_blocks(model), "bitmask", torch.float32)
    found = [m for m in model.modules() if type(m) is FORMATS[kind]]
    assert len(found) == 14, kind
    return model


def kinds_of(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    return tensors, json.loads((folder / "config.json").read_text())


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", list(FORMATS))
def test_save_load_and_convert_dense(kind, tmp_path, tokenizer, monkeypatch):
    """save -> load: the same classes, tensors and logits, bit for bit, and saved again the same
    checkpoint; `convert --dense`: a stock checkpoint with the compressed model's logits."""
    from transformers import AutoModelForCausalLM

    from compress.layers import ActQuantLinear, QuantLinear
    from compress.loading import load
    from compress.saving import save

    model = compressed(kind)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    out = save(model, tokenizer, tmp_path / "c")
    reloaded, _ = load(out)
    assert kinds_of(reloaded) == kinds_of(model)
    logits = assert_reloaded_equal(model, reloaded, ids)
    again = save(reloaded, tokenizer, tmp_path / "again")
    (t1, c1), (t2, c2) = checkpoint(out), checkpoint(again)
    assert same_tensors(t1, t2)
    assert c1.get("quantization_config") == c2.get("quantization_config")
    assert c1["compression_config"]["modules"] == c2["compression_config"]["modules"]

    assert main(["convert", str(out), "--out", str(tmp_path / "dense"), "--dense"]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and "compression_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    if kind == "actquant":  # convert --dense keeps the weights and drops the activation rounding
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(ActQuantLinear, "forward", QuantLinear.forward)
            logits = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-4)


class Killed(BaseException):
    """What the stream's kill hook raises here in place of SIGKILL (nothing catches it on the way up)."""


@pytest.mark.parametrize("kind", STREAMED)
def test_a_stream_killed_after_block_0_resumes_to_the_checkpoint_of_every_run(kind, tiny_dir, text_file, tmp_path,
                                                                              monkeypatch):
    """COMPRESS_TEST_KILL_AFTER_BLOCK=0 stops the run once block 0 is on disk; --resume rebuilds block
    0's modules from progress.json's layout and ends with the files of an uninterrupted --stream run,
    whose tensors and config.json are the in-memory run's."""
    recipe = recipe_path(kind)
    args = lambda out, *extra: ["run", str(recipe), "--model", str(tiny_dir), "--out", str(tmp_path / out),  # noqa: E731
                                "--calib", str(text_file), *CALIB, "--no-dense-eval", "--quiet",
                                "--set", "eval.data=null", *tiny_fit(recipe), *FLAGS.get(kind, []), *extra]
    assert main(args("mem")) == 0 and main(args("whole", "--stream")) == 0
    if kind in SIGKILLED:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_TEST_KILL_AFTER_BLOCK": "0"}
        proc = subprocess.run([sys.executable, "-m", "compress", *args("out", "--stream")], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    else:
        monkeypatch.setenv("COMPRESS_TEST_KILL_AFTER_BLOCK", "0")

        def kill(pid, sig):
            raise Killed

        monkeypatch.setattr(compress.stream.os, "kill", kill)
        with pytest.raises(Killed):
            main(args("out", "--stream"))
        monkeypatch.undo()
    partial = tmp_path / ".out.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["next"] == 1 and not (tmp_path / "out").exists()
    assert {fqn for fqn, e in progress["layout"].items() if e["type"] != "linear"} >= {
        f"model.layers.0.{n}" for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert main(args("out", "--stream", "--resume")) == 0 and not partial.exists()

    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in files:
        if name != "report.json":
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    assert same_tensors(checkpoint(tmp_path / "mem")[0], checkpoint(tmp_path / "out")[0])
    assert (tmp_path / "mem" / "config.json").read_bytes() == (tmp_path / "out" / "config.json").read_bytes()
    assert any(type(m) is FORMATS[kind] for m in compress.load(tmp_path / "out")[0].modules())
