"""Bad input, numerical fallbacks, determinism and safety.

ROWS is the error table of README.md ("Errors and safety"): each row builds one bad input, runs the
CLI in-process and checks that the user gets one line `error: ...` naming the problem, exit code 2,
and that no file under the test folder was written, changed or removed (the input model, a previous
output, the calibration text). Inputs that make a Hessian singular are not errors: the damping is
raised and the run succeeds; they are tested after the table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, tiny_model

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]
WANDA = "steps:\n  - prune: {method: wanda, sparsity: 0.5}\n"


def _step(body: str) -> str:
    return f"steps:\n  - {body}\n"


def _edit_weights(ctx, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = ctx.model / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(ctx) -> None:
    path = ctx.model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(ctx) -> None:
    (ctx.model / "model.safetensors").write_bytes(bytes(range(256)) * 64)


def _nan_weights(ctx) -> None:
    def edit(t):
        t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        t["model.layers.1.mlp.down_proj.weight"][1, 1] = float("inf")

    _edit_weights(ctx, edit)


def _overflow(ctx) -> None:
    def edit(t):  # block 0's attention inputs ~1e20: their XᵀX overflows float32
        t["model.layers.0.input_layernorm.weight"] *= 1e20

    _edit_weights(ctx, edit)


def _phi(ctx) -> None:
    from transformers import AutoModelForCausalLM, PhiConfig

    shutil.rmtree(ctx.model)
    phi = PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(phi).save_pretrained(ctx.model)


def _pickle_only(ctx) -> None:
    from safetensors.torch import load_file

    path = ctx.model / "model.safetensors"
    torch.save(load_file(path), ctx.model / "pytorch_model.bin")
    path.unlink()


def _custom_code(ctx) -> None:
    """A model whose config maps to code in its folder; the code would leave a file if it ran."""
    config = json.loads((ctx.model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (ctx.model / "config.json").write_text(json.dumps(config))
    ran = f"open({str(ctx.tmp / 'code-ran')!r}, 'w').close()\n"
    (ctx.model / "configuration_evil.py").write_text(ran + "from transformers import LlamaConfig\n"
                                                     "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (ctx.model / "modeling_evil.py").write_text(ran)


def _short_calib(ctx) -> None:
    ctx.calib = ctx.tmp / "short.txt"
    ctx.calib.write_text("too short")  # 9 tokens with the test tokenizer


def _empty_calib(ctx) -> None:
    ctx.calib = ctx.tmp / "empty.txt"
    ctx.calib.write_text("\n")


def _no_config(ctx) -> None:
    (ctx.model / "config.json").unlink()


def _bad_config(ctx) -> None:
    (ctx.model / "config.json").write_text("{ not json")


def _out_file(ctx) -> None:
    ctx.out.write_text("a file the user keeps")


def _out_not_empty(ctx) -> None:
    ctx.out.mkdir()
    (ctx.out / "precious.bin").write_bytes(b"keep me")


def _disk_full(ctx) -> None:
    """The safetensors writer runs out of space half way through the model file."""
    import transformers.modeling_utils as mu
    from safetensors.torch import save

    def save_file(tensors, filename, metadata=None):
        data = save(tensors, metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(mu, "safe_save_file", save_file)


def _disk_full_overwrite(ctx) -> None:
    _out_not_empty(ctx)
    ctx.args.append("--overwrite")
    _disk_full(ctx)


def _out_at(where: Callable) -> Callable:
    """--out at where(ctx), with --overwrite: refused all the same, the input model is never replaced."""
    def setup(ctx) -> None:
        ctx.out = where(ctx)
        ctx.args.append("--overwrite")
    return setup


def _parent_is_file(ctx) -> None:
    (ctx.tmp / "notes.txt").write_text("a file where a folder would go")
    ctx.out = ctx.tmp / "notes.txt" / "out"


def _parent_read_only(ctx) -> None:
    locked = ctx.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    ctx.out = locked / "out"
    if os.geteuid() == 0:  # root may write anyway, and os.access says so: answer as for any other user
        access = os.access
        as_a_user = lambda p, mode, **kw: Path(p).resolve() != locked.resolve() and access(p, mode, **kw)  # noqa: E731
        ctx.monkeypatch.setattr(os, "access", as_a_user)


def tiny_gguf(path: Path) -> Path:
    """A small valid GGUF: the llama architecture and one float32 tensor of 300 x 64."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf(cut: Callable[[bytes], bytes]) -> Callable:
    def setup(ctx) -> None:
        ctx.model = tiny_gguf(ctx.tmp / "model.gguf")
        ctx.model.write_bytes(cut(ctx.model.read_bytes()))
    return setup


def _calib_bytes(data: bytes) -> Callable:
    def setup(ctx) -> None:
        ctx.calib.write_bytes(data)
    return setup


@dataclass(frozen=True)
class Row:
    id: str
    expect: str  # an excerpt of the message; {out}, {model}, {calib}, {recipe} and {parent} (of out) stand for paths
    recipe: str | bytes = WANDA
    setup: Callable | None = None
    args: tuple[str, ...] = ()


ROWS = [
    Row("step-typo", "steps[0]: unknown step kind 'prnue' (did you mean 'prune'?)", _step("prnue: {method: wanda}")),
    Row("key-typo", "steps[0].prune: unknown key 'sparsty' (did you mean 'sparsity'?)",
        _step("prune: {method: wanda, sparsty: 0.5}")),
    Row("value-typo", "got 'wandda' (did you mean 'wanda'?)", _step("prune: {method: wandda}")),
    Row("set-typo", "calib: unknown key 'sead' (did you mean 'seed'?)", args=("--set", "calib.sead=1")),
    Row("string-for-number", "steps[0].prune.sparsity must be float, got 'half'",
        _step("prune: {method: wanda, sparsity: half}")),
    Row("list-for-string", "steps[0].prune.pattern must be str, got [2, 4]", _step("prune: {pattern: [2, 4]}")),
    Row("yaml-syntax", "is not valid YAML", "steps: [\n"),
    Row("sparsity-range", "prune.sparsity must be in [0, 1), got 1.2", _step("prune: {sparsity: 1.2}")),
    Row("n-ge-m", "N:M needs 0 < N < M", _step("prune: {pattern: '4:4', sparsity: 0.0}")),
    Row("bits-range", "quantize.bits must be in [2, 8], got 9", _step("quantize: {method: rtn, bits: 9}")),
    Row("group-range", "quantize.group_size must be >= 1, or -1 for one group per row; got 0",
        _step("quantize: {method: rtn, group_size: 0}")),
    Row("keep-range", "lowrank.keep must be in (0, 1), got 1.5", _step("lowrank: {keep: 1.5}")),
    Row("fraction-range", "structured.fraction must be in (0, 1), got 1.0", _step("structured: {fraction: 1.0}")),
    Row("not-finite", "steps[0].quantize.damp must be a finite number, got inf", _step("quantize: {damp: .inf}")),
    Row("calib-samples", "calib.samples must be >= 1, got 0", args=("--calib-samples", "0")),
    Row("group-wider-than-layer", "quantize.group_size 128 is larger than the 64 inputs of "
        "model.layers.0.self_attn.q_proj", _step("quantize: {method: gptq, group_size: 128}")),
    Row("multiple-removes-none", "structured.multiple 64 rounds 20% of the 128 MLP channels of model.layers.0.mlp "
        "to none removed", _step("structured: {unit: channels, fraction: 0.2, multiple: 64}")),
    Row("n-m-does-not-divide", "prune.pattern 2:3 needs a multiple of 3 inputs, but model.layers.0.self_attn.q_proj "
        "has 64", _step("prune: {method: sparsegpt, pattern: '2:3', sparsity: 0.3333333333333333, block_size: 120}")),
    Row("maskllm-pattern", "prune method maskllm learns 2:4 masks: set pattern '2:4', got 'unstructured'",
        _step("prune: {method: maskllm, pattern: unstructured}")),
    Row("maskllm-stream", "--stream cannot run steps[0]: prune method maskllm (masks trained end to end through the "
        "whole model) needs the whole model at once", _step("prune: {method: maskllm, pattern: '2:4'}"),
        args=("--stream",)),
    Row("truncated-safetensors", "{model}/model.safetensors is truncated or not a safetensors file", setup=_truncate),
    Row("garbage-safetensors", "{model}/model.safetensors is truncated or not a safetensors file", setup=_garbage),
    Row("nan-weights", "{model}: model.layers.1.mlp.down_proj.weight has 2 NaN or inf values", setup=_nan_weights),
    Row("short-calib", "calibration text {calib} has 9 tokens; one sample needs 33", setup=_short_calib),
    Row("empty-calib", "text file is empty: {calib}", setup=_empty_calib),
    Row("hessian-not-finite", "model.layers.0.self_attn.q_proj (quantize gptq): the calibration Hessian has NaN or inf "
        "entries", _step("quantize: {method: gptq, group_size: 32}"), _overflow),
    Row("unsupported-arch", "unsupported model_type 'phi'; supported: ", setup=_phi),
    Row("pickle-weights", "{model} has only pickle weights (pytorch_model.bin)", setup=_pickle_only),
    Row("custom-code", "contains custom code which must be executed", setup=_custom_code),
    Row("missing-model", "model not found: {model}", setup=lambda ctx: shutil.rmtree(ctx.model)),
    Row("no-config", "{model} is a folder without config.json", setup=_no_config),
    Row("bad-config", "cannot load a model config from {model}", setup=_bad_config),
    Row("missing-recipe", "recipe not found", setup=lambda ctx: ctx.recipe.unlink()),
    Row("out-is-file", "--out {out} exists and is not a folder", setup=_out_file),
    Row("out-not-empty", "--out {out} is not empty (pass --overwrite to replace it)", setup=_out_not_empty),
    Row("disk-full", "no space left on device while writing {out} (nothing was written: {out} is not created)",
        setup=_disk_full),
    Row("disk-full-overwrite", "no space left on device while writing {out} (nothing was written: {out} is as it was)",
        setup=_disk_full_overwrite),
    Row("out-is-model", "--out {out} is the model {model}; the input is never replaced: write the output elsewhere",
        setup=_out_at(lambda ctx: ctx.model)),
    Row("out-inside-model", "--out {out} is inside the model {model}; the input is never replaced",
        setup=_out_at(lambda ctx: ctx.model / "pruned")),
    Row("out-contains-model", "--out {out} contains the model {model}; the input is never replaced",
        setup=_out_at(lambda ctx: ctx.tmp)),
    Row("out-parent-is-file", "--out {out} cannot be written: {parent} is a file, not a folder",
        setup=_parent_is_file),
    Row("out-parent-read-only", "--out {out} cannot be written: no write permission in {parent}",
        setup=_parent_read_only),
    Row("truncated-gguf", "{model} is truncated or not a GGUF file (gguf's reader: cannot reshape array of size 9584 "
        "into shape (300,64))",
        setup=_gguf(lambda data: data[: len(data) // 2])),
    Row("gguf-cut-in-header", "{model} is truncated or not a GGUF file (gguf's reader: When changing to a larger "
        "dtype, its size must be a divisor of the total size in bytes of the last axis of the array.)",
        setup=_gguf(lambda data: data[:100])),
    Row("garbage-gguf", "{model} is truncated or not a GGUF file (it does not start with the GGUF magic)",
        setup=_gguf(lambda data: bytes(range(256)) * 64)),
    Row("calib-seqlen-past-positions", "calib.seqlen 512 is longer than the 256 positions {model} takes; "
        "lower calib.seqlen", args=("--calib-seqlen", "512")),
    Row("calib-not-utf8", "{calib} is not UTF-8 text: invalid byte 0xe9 at offset 7",
        setup=_calib_bytes("The café menu, the café bill. ".encode("latin-1") * 100)),
    Row("calib-binary", "{calib} is not UTF-8 text: invalid byte 0x80 at offset 128",
        setup=_calib_bytes(bytes(range(256)) * 16)),
    Row("recipe-not-utf8", "recipe {recipe} is not UTF-8 text: invalid byte 0xe9 at offset 5",
        ("# caf\u00e9: a latin-1 comment\n" + WANDA).encode("latin-1")),
]


def _files(folder: Path) -> dict[str, str]:
    """Every file below folder (hidden ones too) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_gives_one_line_exit_2_and_loses_nothing(row, tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    ctx = SimpleNamespace(tmp=tmp_path, model=tmp_path / "model", out=tmp_path / "out", calib=tmp_path / "calib.txt",
                          recipe=tmp_path / "recipe.yaml", args=list(row.args), monkeypatch=monkeypatch)
    shutil.copytree(tiny_dir, ctx.model)
    shutil.copy(text_file, ctx.calib)
    if isinstance(row.recipe, bytes):
        ctx.recipe.write_bytes(row.recipe)
    else:
        ctx.recipe.write_text(row.recipe)
    if row.setup is not None:
        row.setup(ctx)
    before = _files(tmp_path)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # drop what the set-up printed
    code = main(["run", str(ctx.recipe), "--model", str(ctx.model), "--out", str(ctx.out), "--calib", str(ctx.calib),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--quiet", *ctx.args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert row.expect.format(out=ctx.out, model=ctx.model, calib=ctx.calib, recipe=ctx.recipe,
                             parent=ctx.out.parent) in err[0]
    assert _files(tmp_path) == before  # nothing written, changed or removed: input model, old output, data
    assert sorted(p.name for p in tmp_path.rglob("*")) == names  # and no folder left behind either


def test_readme_lists_every_row_of_the_table():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Errors and safety"):]
    section = section[: section.find("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    for row in ROWS:
        placeholders = dict(out="OUT", model="MODEL", calib="CALIB", recipe="RECIPE", parent="PARENT")
        assert row.expect.format(**placeholders) in section, row.id
    # and the rows of inputs that are not errors: a singular Hessian, an evaluation window past the positions
    assert len(rows) == len(ROWS) + 2


# --- the input model is never replaced, whatever the command; each refusal comes before any work


def _overlap_case(case: str, tmp_path: Path, tiny_dir: Path, text_file: Path) -> tuple[list[str], str]:
    """(CLI arguments, expected message) for --out over the model, for a command other than plain `run`."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(WANDA)
    calib = ["--calib", str(text_file)]
    if case.startswith("gguf"):
        (tmp_path / "g").mkdir()
        gguf = tiny_gguf(tmp_path / "g" / "model.gguf")
        out = gguf.parent if case == "gguf-folder" else gguf
        return ["convert", str(gguf), "--out", str(out), "--overwrite"], \
            f"--out {out} {'contains' if case == 'gguf-folder' else 'is'} the model {gguf};"
    args = {"run-stream": ["run", str(recipe), "--model", str(model), *calib, "--stream"],
            "convert": ["convert", str(model)],
            "convert-inside": ["convert", str(model)],
            "score": ["score", str(model), *calib]}[case]
    out = model / "sub" if case == "convert-inside" else model
    where = "is inside" if case == "convert-inside" else "is"
    return [*args, "--out", str(out), "--overwrite", "--quiet"], f"--out {out} {where} the model {model};"


@pytest.mark.parametrize("case", ["run-stream", "convert", "convert-inside", "score", "gguf-folder", "gguf-file"])
def test_out_over_the_model_is_refused_by_every_command(case, tiny_dir, text_file, tmp_path, capsys):
    args, expect = _overlap_case(case, tmp_path, tiny_dir, text_file)
    before = _files(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert _files(tmp_path) == before


def test_out_next_to_a_gguf_is_fine(tmp_path):
    """A .gguf is the model, not its folder: an output beside it cannot touch it."""
    from compress.outdir import check_output_dir

    gguf = tiny_gguf(tmp_path / "model.gguf")
    assert check_output_dir(tmp_path / "pruned", model=gguf) == tmp_path / "pruned"
    assert check_output_dir(tmp_path / "new" / "deeper" / "pruned", model=gguf)  # missing folders are made


# --- windows past the model's positions: calibration is refused (a row above), evaluation is capped


def test_evaluation_windows_are_capped_at_the_positions_with_a_note(tiny_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(WANDA)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--model", str(tiny_dir), "--out", str(out), "--calib", str(text_file),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--eval-data", str(text_file),
                 "--eval-seqlen", "512", "--quiet"]) == 0
    note = f"note: eval.seqlen 512 is longer than the 256 positions {tiny_dir} takes; evaluating in windows of 256"
    assert capsys.readouterr().err.strip().splitlines() == [note]  # once, for the dense and the compressed model
    assert json.loads((out / "report.json").read_text())["eval"]["seqlen"] == 256
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "512", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["seqlen"] == 256
    assert captured.err.strip().splitlines() == [
        f"note: --seqlen 512 is longer than the 256 positions {out} takes; evaluating in windows of 256"]
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["seqlen"] == 64 and "note" not in captured.err


def test_score_windows_past_the_positions_are_refused(tiny_dir, text_file, capsys):
    assert main(["score", str(tiny_dir), "--calib", str(text_file), "--seqlen", "512", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --seqlen 512 is longer than the 256 positions {tiny_dir} takes; lower --seqlen"]


def test_evaluation_text_that_is_not_utf8_is_refused(tiny_dir, tmp_path, capsys):
    data = tmp_path / "eval.bin"
    data.write_bytes(b"plain text, then \xff\xfe binary")
    assert main(["eval", str(tiny_dir), "--data", str(data), "--json"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {data} is not UTF-8 text: invalid byte 0xff at offset 17"]


# --- the command line itself: global flags anywhere, a closed pipe


SUBCOMMANDS = {
    "run": ["run", "r.yaml", "--model", "m", "--out", "o"],
    "eval": ["eval", "m", "--data", "d"],
    "convert": ["convert", "m", "--out", "o"],
    "inspect": ["inspect", "m"],
    "score": ["score", "m", "--calib", "c"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_verbose_and_quiet_go_before_or_after_the_subcommand(command):
    from compress.cli import build_parser

    parser, args = build_parser(), SUBCOMMANDS[command]
    for argv in (["-v", "--quiet", *args], [*args, "-v", "--quiet"], ["--verbose", *args, "--quiet"],
                 ["--quiet", *args, "--verbose"]):
        ns = parser.parse_args(argv)
        assert (ns.verbose, ns.quiet) == (True, True), argv
    ns = parser.parse_args(args)
    assert not hasattr(ns, "verbose") and not hasattr(ns, "quiet")  # main fills in False


def test_global_flags_reach_the_command(tiny_dir, capsys):
    for argv in (["-v", "inspect", str(tiny_dir)], ["inspect", str(tiny_dir), "-v", "--quiet"],
                 ["--quiet", "inspect", str(tiny_dir), "--json"]):
        assert main(argv) == 0, argv
        assert capsys.readouterr().err == ""


def test_a_closed_stdout_ends_the_output_quietly(tiny_dir):
    """`compress inspect DIR | head -1`: the reader is gone before the table is written (its end of the
    pipe is closed at once, so the write always fails): no message, the exit status of a SIGPIPE."""
    for extra in ([], ["--json"]):
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([sys.executable, "-m", "compress", "inspect", str(tiny_dir), *extra], cwd=ROOT,
                                  stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
        finally:
            os.close(write)
        assert proc.returncode == 141 and proc.stderr == "", proc.stderr


# --- group size and N:M are checked against every targeted Linear before any block is compressed


def test_a_layer_too_narrow_for_the_group_is_refused_before_any_block_is_compressed(monkeypatch):
    import compress.apply as apply
    from compress.recipe import recipe_from_dict

    model = tiny_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(apply, "apply_step", lambda *a, **k: calls.append(a))
    # block 0's down_proj (128 inputs) takes groups of 128; block 1's q_proj (64) cannot, and is reached last
    recipe = recipe_from_dict({"steps": [{"quantize": {"method": "rtn", "group_size": 128,
                                                       "targets": ["*.0.mlp.down_proj", "*.1.self_attn.q_proj"]}}]})
    with pytest.raises(ValueError, match="larger than the 64 inputs of model.layers.1.self_attn.q_proj"):
        apply.compress_(model, recipe, progress=False)
    assert calls == []
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


# --- singular Hessians: more damping, a warning, a finite result


def _rank_deficient_hessian(n: int = 64, tokens: int = 16) -> torch.Tensor:
    """XᵀX of fewer tokens than inputs, with input scales over three decades: singular."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, n, generator=g) * torch.logspace(0, 3, n)
    return X.t() @ X


def test_damped_inverse_cholesky_raises_the_damping_until_it_factors():
    from compress.obs import damped_inverse_cholesky

    H = _rank_deficient_hessian()
    eye = torch.eye(64)
    mean = H.diagonal().mean()
    assert torch.linalg.cholesky_ex(H + 1e-9 * mean * eye).info != 0  # the damping asked for is too small
    U, dead, used = damped_inverse_cholesky(H, 1e-9)
    assert used in {1e-9 * 10**k for k in (1, 2, 3)}
    assert not dead.any() and torch.isfinite(U).all()
    # UᵀU is (H + λI)⁻¹ for the damping reported: to float32's accuracy at a condition number of ~1e7
    # (a tenth of the damping, or ten times it, misses by more than 90%)
    inverse = torch.linalg.inv(H.double() + used * mean.double() * eye.double())
    assert ((U.t() @ U).double() - inverse).norm() / inverse.norm() < 0.1
    _, _, same = damped_inverse_cholesky(H, 0.01)
    assert same == 0.01  # enough damping: used as asked


def test_damping_retries_are_bounded_and_the_error_says_so():
    from compress.lowrank import damped_cholesky
    from compress.obs import damped_inverse_cholesky

    with pytest.raises(ValueError, match=r"not positive definite even with damp 10 \(1000x the recipe's 0.01\)"):
        damped_inverse_cholesky(-torch.eye(8), 0.01)  # no damping of this size makes -I positive definite
    with pytest.raises(ValueError, match="NaN or inf"):
        damped_inverse_cholesky(torch.full((4, 4), float("nan")), 0.01)
    with pytest.raises(ValueError, match="NaN or inf"):
        damped_cholesky(torch.full((4, 4), float("inf")), 0.01)


def test_lowrank_damped_cholesky_raises_the_damping_for_a_slightly_indefinite_matrix():
    from compress.lowrank import damped_cholesky

    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eig = torch.linspace(1, 2, 32, dtype=torch.float64)
    eig[-1] = -5e-8  # roundoff in an accumulated XᵀX can leave such a negative eigenvalue
    A = Q @ torch.diag(eig) @ Q.t()
    L, used = damped_cholesky(A, 1e-9)
    assert used == pytest.approx(1e-7)  # 1e-9 and 1e-8 of mean(diag) ≈ 1.45 are below 5e-8; 1e-7 is not
    torch.testing.assert_close(L @ L.t(), A + used * A.diagonal().mean() * torch.eye(32, dtype=torch.float64))


def test_gptq_and_sparsegpt_report_the_raised_damping():
    from compress import Gptq, SparseGpt
    from compress.prune import prune_linear
    from compress.quantize import quantize_linear
    from compress.stats import LinearStats

    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 64, generator=g) * torch.logspace(0, 3, 64)
    stats = LinearStats()
    stats.update(X, {"xtx", "x_sq"})
    quantize = lambda linear, step: quantize_linear(linear, step, stats)[0]  # noqa: E731
    prune = lambda linear, step: prune_linear(linear, step, stats)  # noqa: E731
    for step, run in [(Gptq(group_size=32, damp=1e-9), quantize),
                      (SparseGpt(damp=1e-9), prune)]:
        linear = torch.nn.Linear(64, 32, bias=False)
        metrics = run(linear, step)
        assert metrics["damp"] > 1e-9 and torch.isfinite(linear.weight).all()
        assert "damp" not in run(torch.nn.Linear(64, 32, bias=False), replace(step, damp=0.01))


def test_singular_hessians_do_not_stop_a_run(tmp_path, tokenizer, text_file, caplog):
    """Dead attention inputs (a zero norm), dead MLP input columns, and 16 calibration tokens for
    Linears of 64 and 128 inputs, with a damping too small for that: the run succeeds, warns, and
    writes finite weights."""
    from safetensors.torch import load_file

    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()
        model.model.layers[1].post_attention_layernorm.weight[:8] = 0
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n"
                      "  - prune: {method: sparsegpt, sparsity: 0.5, damp: 1.0e-6, targets: ['*.self_attn.*']}\n"
                      "  - lowrank: {method: whitened, keep: 0.5, damp: 1.0e-9, targets: ['*.mlp.*']}\n"
                      "  - quantize: {method: gptq, group_size: 32, damp: 1.0e-6}\n")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--model", str(tmp_path / "model"), "--out", str(out), "--calib", str(text_file),
                 "--calib-samples", "1", "--calib-seqlen", "16", "--quiet"]) == 0
    layers = json.loads((out / "report.json").read_text())["layers"]
    raised = [r for r in layers if "damp" in r]
    assert {r["step"] for r in raised} == {"prune", "lowrank", "quantize"}  # sparsegpt, whitened svd, gptq
    assert any("raised the damping" in m for m in caplog.messages)
    tensors = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


# --- determinism: the same recipe and seed give the same bytes


TIMINGS = {"compress_seconds", "peak_rss_mb", "seconds"}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_same_recipe_and_seed_give_byte_identical_files(tiny_dir, text_file, tmp_path):
    """Two runs, the second in a fresh process with another string-hash seed (set and dict orders
    of strings change with it), write the same bytes; report.json differs only in its timings."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calib: {seed: 3}\nsteps:\n  - prune: {method: wanda, sparsity: 0.5}\n"
                      "  - quantize: {method: gptq, bits: 4, group_size: 32, act_order: true}\n")
    args = ["run", str(recipe), "--model", str(tiny_dir), "--calib", str(text_file), "--calib-samples", "4",
            "--calib-seqlen", "32", "--eval-data", str(text_file), "--eval-seqlen", "64", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(a)]) == 0
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "compress", *args, "--out", str(b)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "model.safetensors" in files
    for name in files:
        if name != "report.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["peak_rss_mb"] > 0 and ra["layers"][0]["seconds"] >= 0  # the timings removed below exist
    assert _without_timings(ra) == _without_timings(rb)


# --- safety: safetensors only, no remote code, nothing unpickled


def test_load_model_asks_for_safetensors_and_no_remote_code(monkeypatch, tokenizer):
    """For a hub id (no network needed: transformers' loaders are replaced by recorders)."""
    import transformers

    from compress.model import load_model

    calls = []

    def recorder(result):
        def from_pretrained(source, **kwargs):
            calls.append((source, kwargs))
            return result
        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder(tiny_config()))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder(tiny_model()))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder(tokenizer))
    load_model("some-org/some-model")
    assert [c[0] for c in calls] == ["some-org/some-model"] * 3
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in calls)
    assert calls[1][1]["use_safetensors"] is True  # the weights


def test_the_package_never_unpickles():
    sources = sorted((ROOT / "compress").glob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        for needle in ("torch.load(", "import pickle", "pickle.load", "weights_only=False", "trust_remote_code=True"):
            assert needle not in text, f"{path.name}: {needle}"
