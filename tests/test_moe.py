"""Mixture-of-experts models: fused experts split into per-expert Linears (compress/moe.py), compressed
with the statistics of their routed tokens, saved per expert and read back by us and by stock transformers."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, batches
from safetensors import safe_open
from torch import nn

from compress import Gptq, Rtn, compress_, load, save
from compress.layers import QuantLinear
from compress.model import ARCHITECTURES, block_linears, decoder_blocks, unfuse_experts
from compress.moe import UnfusedExperts, calibrating
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("qwen3_moe", "mixtral", "qwen2_moe")
E = 4  # experts per block, 2 chosen per token


def moe_config(model_type: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
    if model_type == "mixtral":
        return tf.MixtralConfig(intermediate_size=32, num_local_experts=E, **common)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=E, head_dim=16, **common)
    return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                             num_experts=E, **common)


def moe_model(model_type: str, unfused: bool = True, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(model_type), dtype=torch.float32).eval()
    if unfused:
        unfuse_experts(model)
    return model


def expert_linears(model) -> dict[str, nn.Module]:
    """fqn -> each expert's gate, up and down module, whatever compression made of them."""
    names = ARCHITECTURES[model.config.model_type].experts.names
    return {f"{fqn}.{e}.{n}": getattr(m[e], n) for fqn, m in model.named_modules() if isinstance(m, UnfusedExperts)
            for e in range(m.num_experts) for n in names}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


IDS = batches(1, 48, seed=7)[0]


@pytest.mark.parametrize("model_type", TYPES)
def test_unfused_experts_compute_what_the_fused_ones_do(model_type):
    fused = moe_model(model_type, unfused=False)
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    names = ARCHITECTURES[model_type].experts.names
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, UnfusedExperts) and experts.num_experts == E
    assert all(isinstance(getattr(experts[e], n), nn.Linear) for e in range(E) for n in names)
    assert not any(p.dim() == 3 for p in model.parameters())  # the fused copies are gone
    with torch.no_grad():
        want = fused(IDS).logits
        assert rel(model(IDS).logits, want) < 1e-5
        with calibrating(model):  # unchosen experts called on empty inputs change nothing
            assert rel(model(IDS).logits, want) < 1e-5


def test_dense_layers_of_an_moe_model_stay_as_they_are():
    from transformers import AutoModelForCausalLM

    config = moe_config("qwen3_moe")
    config.mlp_only_layers = [0]  # block 0 has a plain MLP
    torch.manual_seed(0)
    fused = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    assert type(model.model.layers[0].mlp) is type(fused.model.layers[0].mlp)
    assert isinstance(model.model.layers[1].mlp.experts, UnfusedExperts)
    assert "model.layers.0.mlp.gate_proj" in block_linears(model, 0)
    with torch.no_grad():
        assert rel(model(IDS).logits, fused(IDS).logits) < 1e-5


def test_routers_are_never_compression_targets():
    model = moe_model("qwen2_moe")
    linears = block_linears(model, 0)
    assert "model.layers.0.mlp.shared_expert_gate" not in linears  # an nn.Linear, left out
    assert "model.layers.0.mlp.gate" not in linears and not isinstance(model.model.layers[0].mlp.gate, nn.Linear)
    assert {f"model.layers.0.mlp.experts.{e}.{n}" for e in range(E) for n in ("gate_proj", "up_proj", "down_proj")
            } | {"model.layers.0.mlp.shared_expert.down_proj"} <= linears.keys()


def routed_counts(model) -> tuple[dict[str, int], list]:
    """fqn of each expert Linear -> tokens its router sends it, summed over the forwards that follow."""
    counts: dict[str, int] = {}
    prefix, names = ARCHITECTURES[model.config.model_type].blocks, ARCHITECTURES[model.config.model_type].experts.names

    def hook(i, module, args, out):
        for e, n in enumerate(torch.bincount(out[2].flatten(), minlength=E).tolist()):
            for name in names:
                key = f"{prefix}.{i}.mlp.experts.{e}.{name}"
                counts[key] = counts.get(key, 0) + n

    handles = [b.mlp.gate.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o))
               for i, b in enumerate(decoder_blocks(model))]
    return counts, handles


@pytest.mark.parametrize("model_type", TYPES)
def test_gptq_quantizes_every_expert_with_its_routed_tokens_only(model_type):
    model = moe_model(model_type)
    router = model.model.layers[0].mlp.gate.weight.clone()
    recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["steps.0.group_size=16"])
    counts, handles = routed_counts(model)  # the routing during calibration (after the compressed attention)
    report = compress_(model, recipe, batches(4, 32), progress=False)
    for h in handles:
        h.remove()
    experts = expert_linears(model)
    assert len(experts) == 2 * E * 3 and all(type(m) is QuantLinear for m in experts.values())
    assert not block_linears(model, 0) and not block_linears(model, 1)  # no nn.Linear left, routers aside
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    rows = {r["module"]: r for r in report.layers}
    assert {f: rows[f]["tokens"] for f in experts} == counts  # one row per expert Linear, its routed tokens
    assert all(0 < n < 4 * 32 for n in counts.values())  # each a share of the 128 tokens of each block


def test_sparsegpt_prunes_every_expert_and_the_two_calibration_paths_agree():
    from compress.calibrate import capture_block_inputs, compress_block

    model = moe_model("mixtral")
    recipe = load_recipe(ROOT / "recipes" / "sparsegpt-50.yaml")
    seen = {}
    for low_memory in (False, True):  # one pass of paused samples, or stages (compress run --stream)
        inputs = capture_block_inputs(model, batches(3, 16), "cpu")
        got = []
        compress_block(decoder_blocks(model)[0], inputs, block_linears(model, 0), {"xtx"},
                       lambda fqn, s, got=got: got.append((fqn, s.n_tokens, s.xtx)), low_memory=low_memory)
        seen[low_memory] = got
    assert [g[:2] for g in seen[False]] == [g[:2] for g in seen[True]]
    assert all(torch.allclose(a[2], b[2]) for a, b in zip(seen[False], seen[True]))
    compress_(model, recipe, batches(4, 32), progress=False)
    for fqn, m in expert_linears(model).items():
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5), fqn


def starve_expert(model, e: int):
    """Route every token that chose expert e nowhere (transformers' index num_experts)."""
    def hook(module, args, out):
        logits, weights, index = out
        return logits, weights, torch.where(index == e, torch.full_like(index, E), index)

    return [b.mlp.gate.register_forward_hook(hook) for b in decoder_blocks(model)]


def test_an_expert_without_calibration_tokens_is_refused_not_left_dense():
    model = moe_model("qwen3_moe")
    starve_expert(model, 3)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.3\.gate_proj \(quantize gptq\) received "
                                         r"no calibration token.*ignore"):
        compress_(model, Gptq(bits=4, group_size=16), batches(2, 16), progress=False)
    model = moe_model("qwen3_moe")
    starve_expert(model, 3)
    compress_(model, Gptq(bits=4, group_size=16, ignore=("*.experts.3.*",)), batches(2, 16), progress=False)
    kinds = {f: type(m) for f, m in expert_linears(model).items()}
    assert all((k is nn.Linear) == (".experts.3." in f) for f, k in kinds.items())  # only as the recipe asked
    model = moe_model("qwen3_moe")
    starve_expert(model, 3)
    compress_(model, Rtn(bits=4, group_size=16), batches(2, 16), progress=False)  # reads no statistics
    assert all(type(m) is QuantLinear for m in expert_linears(model).values())


def test_a_streamed_run_writes_what_the_in_memory_run_writes(tmp_path, tokenizer, text_file):
    from compress.cli import main

    src = tmp_path / "model"  # as stock transformers saves it: per-expert tensors
    moe_model("qwen3_moe", unfused=False).save_pretrained(src)
    tokenizer.save_pretrained(src)
    run = ["run", str(ROOT / "recipes" / "gptq-w4g128.yaml"), "--model", str(src), "--calib", str(text_file),
           "--calib-samples", "4", "--calib-seqlen", "32", "--quiet", "--set", "steps.0.group_size=16"]
    assert main([*run, "--out", str(tmp_path / "a"), "--eval-data", str(text_file), "--eval-seqlen", "64",
                 "--no-dense-eval"]) == 0
    assert main([*run, "--out", str(tmp_path / "b"), "--stream"]) == 0
    (a, _), (b, _) = load(tmp_path / "a"), load(tmp_path / "b")
    assert all(type(m) is QuantLinear for m in expert_linears(b).values())
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


STOCK = """
import sys, json, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/stock.pt")
assert not any(name.split(".")[0] == "compress" for name in sys.modules)
"""


def test_save_load_convert_and_stock_reload(tmp_path, tokenizer):
    from compress.cli import main
    from compress.io import stock_notes

    cases = [(t, "wanda-50", []) for t in TYPES] + [(t, "gptq-w4g128", ["steps.0.group_size=16"]) for t in TYPES]
    cases.append(("mixtral", "rtn-w4g128", ["steps.0.group_size=16"]))
    expected, folders = {}, []
    for model_type, recipe, overrides in cases:
        model = moe_model(model_type)
        compress_(model, load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides), batches(4, 32), progress=False)
        out = save(model, tokenizer, tmp_path / f"{model_type}-{recipe}")
        reloaded, _ = load(out)
        with torch.no_grad():
            expected[out] = model(IDS).logits
            assert torch.equal(reloaded(IDS).logits, expected[out])
        quantized = "gptq" in recipe or "rtn" in recipe
        assert all(type(m) is (QuantLinear if quantized else nn.Linear) for m in expert_linears(reloaded).values())
        names = ARCHITECTURES[model_type].experts.names
        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        suffix = "weight_packed" if quantized else "weight"
        assert {f"model.layers.1.mlp.experts.{e}.{n}.{suffix}" for e in range(E) for n in names} <= keys
        folders.append(out)
    dense = tmp_path / "mixtral-gptq-dense"
    assert main(["convert", str(tmp_path / "mixtral-gptq-w4g128"), "--dense", "--out", str(dense), "--quiet"]) == 0
    expected[dense.resolve()] = expected[(tmp_path / "mixtral-gptq-w4g128").resolve()]
    folders.append(dense.resolve())
    proc = subprocess.run([sys.executable, "-c", STOCK, json.dumps(IDS.tolist()), *map(str, folders)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for folder in folders:
        assert rel(torch.load(folder / "stock.pt"), expected[folder]) < 1e-4, folder

    mixed = moe_model("qwen3_moe")  # group 32: gate/up in groups, down (32 inputs) one per row
    compress_(mixed, Rtn(bits=4, group_size=32), progress=False)
    assert any("MoE experts quantized with 2 schemes" in n for n in stock_notes(mixed))


def block_pass(model, coverage, low_memory: bool, samples: int = 3):
    """compress_block on block 0 with a compression that changes nothing: (its outputs, what each Linear's
    statistics were, in the order they came)."""
    from compress.calibrate import capture_block_inputs, compress_block

    inputs = capture_block_inputs(model, batches(samples, 16), "cpu")
    got = []
    out = compress_block(decoder_blocks(model)[0], inputs, block_linears(model, 0), {"xtx"},
                         lambda fqn, s: got.append((fqn, s.n_tokens, s.xtx)), low_memory=low_memory,
                         coverage=coverage)
    return out, got


def moe_inputs(model, samples: int = 3) -> torch.Tensor:
    """What block 0's experts module receives in a plain forward of the block_pass samples: every token."""
    seen = []
    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for ids in batches(samples, 16):
            model(ids)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])  # with a shared expert, and without
def test_all_experts_observe_every_token_and_pass_the_routed_outputs_on(model_type):
    from compress.moe import Coverage

    model = moe_model(model_type)
    routed, _ = block_pass(model, None, False)
    passes = {}
    for low_memory in (False, True):  # the greenlet pass and the stages of --stream
        coverage = Coverage(all_experts=True)
        out, passes[low_memory] = block_pass(model, coverage, low_memory)
        assert all(torch.equal(a, b) for a, b in zip(out, routed))  # the next block receives the routed outputs
        experts = {fqn: n for fqn, n, _ in passes[low_memory] if ".experts." in fqn}
        assert len(experts) == E * 3 and set(experts.values()) == {3 * 16}  # every expert saw every token
        assert set(coverage.widened) == {f"model.layers.0.mlp.experts.{e}" for e in range(E)}
        assert sum(coverage.widened.values()) == 2 * 3 * 16  # what the router gave them, top-2
    a, b = passes.values()
    assert [g[:2] for g in a] == [g[:2] for g in b] and all(torch.allclose(x[2], y[2]) for x, y in zip(a, b))
    moe = model.model.layers[0].mlp.experts
    assert moe.widen is None and not moe.calibrating  # the model's forward is the routed one again
    x = moe_inputs(model)
    names = ARCHITECTURES[model_type].experts.names
    gate, up, _ = (getattr(moe[1], n) for n in names)
    h = moe.act_fn(gate(x)) * up(x)  # down_proj's input: its own expert's gate and up, on every token
    xtx = {fqn: xtx for fqn, _, xtx in a}
    assert rel(xtx[f"model.layers.0.mlp.experts.1.{names[0]}"], x.t() @ x) < 1e-5
    assert rel(xtx[f"model.layers.0.mlp.experts.1.{names[2]}"], h.t() @ h) < 1e-5


def test_an_expert_below_min_expert_tokens_takes_all_tokens_in_both_passes(caplog):
    from compress.moe import Coverage

    model = moe_model("qwen3_moe")
    starve_expert(model, 3)
    routed, _ = block_pass(model, None, False)
    passes = {}
    for low_memory in (False, True):
        coverage = Coverage(min_tokens=1)
        with caplog.at_level("WARNING", logger="compress.moe"):
            out, passes[low_memory] = block_pass(model, coverage, low_memory)
        assert all(torch.equal(a, b) for a, b in zip(out, routed))
        assert coverage.widened == {"model.layers.0.mlp.experts.3": 0}
        tokens = {fqn.rsplit(".", 1)[0]: n for fqn, n, _ in passes[low_memory] if ".experts." in fqn}
        assert tokens.pop("model.layers.0.mlp.experts.3") == 3 * 16 and all(0 < n < 3 * 16 for n in tokens.values())
    assert caplog.text.count("model.layers.0.mlp.experts.3: 0 routed calibration tokens, below "
                             "calib.min_expert_tokens 1") == 2
    a, b = passes.values()
    assert [g[:2] for g in a] == [g[:2] for g in b] and all(torch.allclose(x[2], y[2]) for x, y in zip(a, b))


def test_gptq_quantizes_a_starved_expert_on_all_tokens_when_asked(caplog):
    recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml",
                         ["steps.0.group_size=16", "calib.min_expert_tokens=1", "calib.batch_size=1"])
    model = moe_model("qwen3_moe")
    starve_expert(model, 3)
    with caplog.at_level("WARNING", logger="compress.moe"):
        report = compress_(model, recipe, batches(2, 16), progress=False)  # without the key: refused (above)
    assert all(type(m) is QuantLinear for m in expert_linears(model).values())
    rows = {r["module"]: r for r in report.layers}
    for block in (0, 1):
        assert f"model.layers.{block}.mlp.experts.3: 0 routed" in caplog.text
        for name in ("gate_proj", "up_proj", "down_proj"):
            row = rows[f"model.layers.{block}.mlp.experts.3.{name}"]
            assert (row["tokens"], row["coverage"], row["routed_tokens"]) == (2 * 16, "all tokens", 0)
            assert "coverage" not in rows[f"model.layers.{block}.mlp.experts.0.{name}"]
    from compress.commands import expert_tokens, summary_table

    summary = {"recipe": "gptq.yaml", "sparsity": 0.0, "compress_seconds": 1.0, "peak_rss_mb": 1.0,
               "calib": {"min_expert_tokens": 1}, "layers": report.layers}
    assert "MoE block       expert tokens min  median  max  below 1" in summary_table(summary)
    table = expert_tokens(summary)
    assert [r[0] for r in table[1:]] == ["model.layers.0", "model.layers.1"]
    assert all(r[1] == "0" and r[-1] == "1" for r in table[1:])  # min 0 tokens, one expert below 1


def test_gptq_with_all_experts_reports_every_token_and_the_routed_share():
    model = moe_model("qwen3_moe")
    counts, handles = routed_counts(model)
    recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["steps.0.group_size=16", "calib.all_experts=true"])
    report = compress_(model, recipe, batches(4, 32), progress=False)
    for h in handles:
        h.remove()
    rows = {r["module"]: r for r in report.layers}
    experts = expert_linears(model)
    assert all(type(m) is QuantLinear for m in experts.values())
    assert {(rows[f]["tokens"], rows[f]["coverage"]) for f in experts} == {(4 * 32, "all tokens")}
    assert {f: rows[f]["routed_tokens"] for f in experts} == counts


def test_coverage_options_off_or_unused_leave_the_model_bit_identical():
    logits = []
    for overrides in ([], ["calib.all_experts=false", "calib.min_expert_tokens=0"], ["calib.min_expert_tokens=1"]):
        model = moe_model("mixtral")  # min 1: no expert is below it here, so only the routing pause differs
        recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["steps.0.group_size=16", *overrides])
        report = compress_(model, recipe, batches(4, 32), progress=False)
        assert not any("coverage" in r for r in report.layers)
        with torch.no_grad():
            logits.append(model(IDS).logits)
    assert all(torch.equal(logits[0], x) for x in logits[1:])
    with pytest.raises(ValueError, match="calib.min_expert_tokens must be >= 0, got -1"):
        load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["calib.min_expert_tokens=-1"])
