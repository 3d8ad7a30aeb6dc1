"""KL divergence from a reference model (llama.cpp's --kl-divergence): evaluate.kl_divergence, the
float16 reference kept on disk by a run, `compress eval --reference` and a run's `eval.kl`."""

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_config, tiny_model

from compress.cli import main
from compress.evaluate import (
    Eval,
    eval_windows,
    kl_divergence,
    log_probs_reader,
    log_probs_writer,
    perplexity,
    quantile,
)

ROOT = Path(__file__).resolve().parents[1]


def _perturbed(seed: int = 1, scale: float = 0.3):
    """The tiny Llama with every weight matrix moved by `scale` of its own spread: close, not equal."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return model


def _tokens(n: int = 700, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _direct(model, reference, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(P_ref || P_model) and top-1 agreement over all windows at once, through kl_div."""
    with torch.no_grad():
        lp = F.log_softmax(model(windows).logits[:, :-1].float(), -1)
        ref = F.log_softmax(reference(windows).logits[:, :-1].float(), -1)
    kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).flatten()
    return kl, (lp.argmax(-1) == ref.argmax(-1)).flatten()


def test_a_model_against_itself_has_zero_kl_and_full_top1_agreement():
    model, tokens = tiny_model("llama"), _tokens()
    windows = eval_windows(tokens, 64)
    stats = kl_divergence(model, model, windows, batch_size=3, progress=False)
    assert stats.mean == 0 and stats.p99 == 0 and stats.top1 == 1
    assert stats.tokens == (700 // 64) * 63
    ppl = perplexity(model, tokens, seqlen=64, progress=False)[0]
    assert stats.ppl == pytest.approx(ppl, rel=1e-6) and stats.reference_ppl == pytest.approx(ppl, rel=1e-6)


@pytest.mark.parametrize("bos", [None, 0])
def test_kl_top1_and_perplexities_match_a_direct_computation_over_all_positions(bos):
    model, reference, tokens = _perturbed(), tiny_model("llama"), _tokens()
    windows = eval_windows(tokens, 64, bos)
    stats = kl_divergence(model, reference, windows, batch_size=4, progress=False)
    kl, agree = _direct(model, reference, windows)
    assert kl.numel() == stats.tokens == windows.shape[0] * 63
    assert 1e-3 < stats.mean == pytest.approx(kl.mean().item(), rel=1e-5)  # the perturbation shows
    assert stats.p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-5)
    assert stats.p99 > stats.mean
    assert 0 < stats.top1 < 1 and stats.top1 == agree.sum().item() / agree.numel()
    assert stats.ppl == pytest.approx(perplexity(model, tokens, 64, 2, bos, progress=False)[0], rel=1e-6)
    assert stats.reference_ppl == pytest.approx(perplexity(reference, tokens, 64, 1, bos, progress=False)[0], rel=1e-6)
    swapped = kl_divergence(reference, model, windows, batch_size=4, progress=False)  # KL is not symmetric
    assert swapped.ppl == pytest.approx(stats.reference_ppl, rel=1e-6) and swapped.mean != pytest.approx(stats.mean)


def test_callables_giving_logits_are_references_too():
    model, reference, tokens = _perturbed(), tiny_model("llama"), _tokens()
    windows = eval_windows(tokens, 64)
    calls = []

    def logits(x):
        calls.append(x.shape[0])
        with torch.no_grad():
            return reference(x).logits

    via_callable = kl_divergence(model, logits, windows, batch_size=4, progress=False)
    assert calls == [4, 4, 2]  # one call per batch of windows: never the whole text
    assert via_callable == kl_divergence(model, reference, windows, batch_size=4, progress=False)


def test_quantile_is_torch_quantiles_linear_interpolation():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100, 1001):
        values = torch.rand(n, generator=g) ** 3
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert quantile(values, q) == pytest.approx(torch.quantile(values, q).item(), rel=1e-6, abs=1e-9)


def test_a_different_vocabulary_is_refused():
    model, windows = tiny_model("llama"), eval_windows(_tokens(), 64)
    with pytest.raises(ValueError, match="same vocabulary"):
        kl_divergence(model, lambda x: torch.zeros(*x.shape, VOCAB + 1), windows, progress=False)


def test_the_float16_reference_on_disk_gives_the_kl_of_the_model_itself():
    """A run records the input model's log-probabilities during its perplexity pass, in float16, and
    compares the compressed model with them: the same statistics as against the model, to float16 precision."""
    dense, compressed, tokens = tiny_model("llama"), _perturbed(), _tokens()
    windows = eval_windows(tokens, 64)
    with tempfile.TemporaryFile() as f:
        ppl = perplexity(dense, tokens, 64, 3, progress=False, sink=log_probs_writer(f))[0]
        assert f.tell() == windows.numel() * VOCAB * 2
        stored = kl_divergence(compressed, log_probs_reader(f, windows), windows, batch_size=2, progress=False)
    direct = kl_divergence(compressed, dense, windows, batch_size=2, progress=False)
    assert ppl == pytest.approx(direct.reference_ppl, rel=1e-6)
    assert stored.mean == pytest.approx(direct.mean, rel=2e-3) and stored.p99 == pytest.approx(direct.p99, rel=2e-3)
    assert stored.top1 == direct.top1 and stored.ppl == direct.ppl


def test_a_float16_tie_keeps_the_top_token():
    """Two log-probabilities 1e-5 apart round to the same float16; the larger (the later index here, which
    argmax would lose to the earlier one on a tie) stays on top, one float16 step up."""
    logits = torch.zeros(1, 2, 4)
    logits[0, :, 1], logits[0, :, 2] = 3.0, 3.0 + 1e-5
    with tempfile.TemporaryFile() as f:
        log_probs_writer(f)(logits)
        stored = log_probs_reader(f, torch.zeros(1, 2, dtype=torch.long))(torch.zeros(1, 2, dtype=torch.long))
    assert stored.dtype == torch.float16 and stored.shape == (1, 2, 4)
    assert stored.argmax(-1).tolist() == [[2, 2]]
    plain = F.log_softmax(logits, -1).half()
    assert plain[0, 0, 1] == plain[0, 0, 2]  # the tie that would have flipped the top token
    assert torch.equal(stored[..., [0, 1, 3]], plain[..., [0, 1, 3]])  # everything else as rounded


def test_eval_config_kl_needs_data_and_the_dense_pass():
    assert Eval(data="x", kl=True).kl
    with pytest.raises(ValueError, match="eval.kl needs eval.data"):
        Eval(kl=True)
    with pytest.raises(ValueError, match="eval.dense"):
        Eval(data="x", kl=True, dense=False)


# --- command line


@pytest.fixture(scope="module")
def perturbed_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("perturbed")
    _perturbed().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_reference_prints_the_three_statistics_and_both_perplexities(perturbed_dir, tiny_dir, text_file,
                                                                            tokenizer, capsys):
    base = ["eval", str(perturbed_dir), "--data", str(text_file), "--seqlen", "64", "--max-tokens", "640", "--quiet"]
    assert main([*base, "--reference", str(tiny_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokens = tokenizer(text_file.read_text(), return_tensors="pt").input_ids[:, :640]
    want = kl_divergence(_perturbed(), tiny_model("llama"), eval_windows(tokens, 64), progress=False)
    assert result["kl"] == pytest.approx(want.summary(), rel=1e-5) and result["tokens"] == want.tokens
    assert result["kl"]["mean"] > 0 and result["kl"]["top1"] < 1
    for model, key in ((perturbed_dir, "ppl"), (tiny_dir, "reference_ppl")):  # as `eval` gives each alone
        assert main(["eval", str(model), *base[2:], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(result[key], rel=1e-6)
    assert main([*base, "--reference", str(tiny_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"mean {want.mean:.5f}, p99 {want.p99:.5f} nats; top-1 agreement {100 * want.top1:.2f}%" in printed
    assert f"reference perplexity {want.reference_ppl:.3f}" in printed


def test_eval_reference_refuses_another_vocabulary_and_a_bad_path(tiny_dir, text_file, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    config = tiny_config("llama")
    config.vocab_size = VOCAB + 20
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    base = ["eval", str(tiny_dir), "--data", str(text_file), "--seqlen", "64", "--quiet", "--reference"]
    for ref, expect in ((other, f"has a vocabulary of {VOCAB + 20} tokens and {tiny_dir} {VOCAB}"),
                        (tmp_path / "nope", f"--reference: model not found: {tmp_path / 'nope'}")):
        assert main([*base, str(ref)]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
        assert captured.out == ""


def test_a_run_with_eval_kl_reports_the_kl_from_the_input_model(tiny_dir, text_file, tmp_path, capsys):
    from compress.loading import load

    out = tmp_path / "out"
    assert main(["run", str(ROOT / "recipes" / "rtn-w4g128.yaml"), "--model", str(tiny_dir), "--out", str(out),
                 "--set", "steps.0.group_size=32", "--set", "steps.0.bits=3", "--eval-data", str(text_file),
                 "--eval-seqlen", "64", "--eval-max-tokens", "1280", "--eval-kl", "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert set(report["kl"]) == {"mean", "p99", "top1"}
    compressed, tok = load(out)
    windows = eval_windows(tok(text_file.read_text(), return_tensors="pt").input_ids[:, :1280], 64)
    want = kl_divergence(compressed, tiny_model("llama"), windows, progress=False)  # the input model, afresh
    assert want.mean > 1e-4 and want.top1 < 1
    assert report["kl"]["mean"] == pytest.approx(want.mean, rel=5e-3)
    assert report["kl"]["p99"] == pytest.approx(want.p99, rel=5e-3)
    assert report["kl"]["top1"] == want.top1  # the stored top token is the computed one, float16 ties or not
    assert report["ppl"] == pytest.approx(want.ppl, rel=1e-5)
    assert report["dense_ppl"] == pytest.approx(want.reference_ppl, rel=1e-5)
    header, _, dense_row, row = printed.splitlines()[:4]
    assert re.split(r"\s{2,}", header.strip())[-3:] == ["KL mean", "KL p99", "top-1"]
    assert dense_row.split()[-3:] == ["-", "-", "-"]
    assert row.split()[-3:] == [f"{report['kl']['mean']:.4g}", f"{report['kl']['p99']:.4g}",
                                f"{100 * report['kl']['top1']:.2f}%"]


def test_a_run_without_eval_kl_reports_no_kl(tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(ROOT / "recipes" / "rtn-w4g128.yaml"), "--model", str(tiny_dir), "--out", str(out),
                 "--set", "steps.0.group_size=32", "--eval-data", str(text_file), "--eval-seqlen", "64",
                 "--eval-max-tokens", "640", "--quiet"]) == 0
    assert "kl" not in json.loads((out / "report.json").read_text())


def test_stream_refuses_eval_kl_and_names_the_eval_command_to_run(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - quantize: {{method: rtn, group_size: 32}}\neval: {{data: {text_file}, kl: true}}\n")
    args = ["run", str(recipe), "--model", str(tiny_dir), "--out", str(out), "--stream", "--quiet"]
    assert main([*args, "--eval-kl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --eval-kl" in err[0] and f"--reference {tiny_dir}" in err[0], err
    assert not out.exists()
    assert main(args) == 0  # the recipe's own evaluation is skipped, with a note saying how to get it
    assert f"compress eval {out} --data {text_file} --reference {tiny_dir}" in capsys.readouterr().err
