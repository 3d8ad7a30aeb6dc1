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
from conftest import STOCK, VOCAB, batches
from safetensors import safe_open
from torch import nn

from compress import Gptq, Rtn, compress_, load, save
from compress.layers import QuantLinear
from compress.model import ARCHITECTURES, block_linears, decoder_blocks, unfuse_experts
from compress.moe import UnfusedExperts, calibrating
from compress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3")
E = 4  # experts per block, 2 chosen per token


def moe_config(model_type: str, **overrides):
    """A tiny config with E experts in 2 MoE blocks (GLM-4-MoE and DeepSeek-V3: after 1 dense block)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)
    grouped = dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=E, n_shared_experts=1,
                   first_k_dense_replace=1, **{**common, "num_hidden_layers": 3})
    if model_type == "glm4_moe":  # n_group 1 as GLM-4.5 ships; partial rotary, qk norm
        return tf.Glm4MoeConfig(head_dim=16, use_qk_norm=True, **{**grouped, **overrides})
    if model_type == "deepseek_v3":  # MLA attention (low-rank q, latent kv); 2 groups of 2 experts, 1 per token.
        # Scaling 1, not 2.5: stock transformers dequantizes fused experts in the scales' float16 (other
        # Linears in float32), an error the routed scale multiplies (1.1e-4 of the logits here at 2.5).
        # kv_lora_rank 32: at 16, the group size, kv_b_proj would get a config group (channel) before the
        # experts' and stock would read the experts with it (saving.stock_notes says so)
        mla = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                   n_group=2, topk_group=1, num_key_value_heads=4, routed_scaling_factor=1.0)
        return tf.DeepseekV3Config(**{**grouped, **mla, **overrides})
    if model_type == "mixtral":
        return tf.MixtralConfig(intermediate_size=32, num_local_experts=E, **common)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=E, head_dim=16, **common)
    return tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                             num_experts=E, **common)


def moe_model(model_type: str, unfused: bool = True, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(model_type, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.modules():  # transformers starts the load-balancing bias at 0: make it count
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0, 0.02)
    if unfused:
        unfuse_experts(model)
    return model


def expert_linears(model) -> dict[str, nn.Module]:
    """fqn -> each expert's gate, up and down module, whatever compression made of them."""
    names = ARCHITECTURES[model.config.model_type].experts.names
    return {f"{fqn}.{e}.{n}": getattr(m[e], n) for fqn, m in model.named_modules() if isinstance(m, UnfusedExperts)
            for e in range(m.num_experts) for n in names}


def moe_blocks(model) -> dict[int, nn.Module]:
    """index -> each decoder block with routed experts (GLM-4-MoE's and DeepSeek-V3's first are dense)."""
    return {i: b for i, b in enumerate(decoder_blocks(model)) if hasattr(b.mlp, "experts")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


IDS = batches(1, 48, seed=7)[0]


@pytest.mark.parametrize("model_type", TYPES)
def test_unfused_experts_compute_what_the_fused_ones_do(model_type):
    fused = moe_model(model_type, unfused=False)
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    names = ARCHITECTURES[model_type].experts.names
    experts = next(iter(moe_blocks(model).values())).mlp.experts
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
    model = moe_model("deepseek_v3")  # a router that is no Linear, its MLA attention and shared experts
    mla = {f"model.layers.1.self_attn.{n}"
           for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    shared = {f"model.layers.1.mlp.shared_experts.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    linears = block_linears(model, 1)
    assert mla | shared <= linears.keys() and not any(".gate." in f or f.endswith(".gate") for f in linears)
    assert len(linears) == len(mla) + len(shared) + 3 * E


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
               for i, b in moe_blocks(model).items()]
    return counts, handles


@pytest.mark.parametrize("model_type", TYPES)
def test_gptq_quantizes_every_expert_with_its_routed_tokens_only(model_type):
    model = moe_model(model_type)
    router = next(iter(moe_blocks(model).values())).mlp.gate
    weights = {k: t.clone() for k, t in router.state_dict().items()}  # and DeepSeek's e_score_correction_bias
    recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["steps.0.group_size=16"])
    counts, handles = routed_counts(model)  # the routing during calibration (after the compressed attention)
    report = compress_(model, recipe, batches(4, 32), progress=False)
    for h in handles:
        h.remove()
    experts = expert_linears(model)
    assert len(experts) == 2 * E * 3 and all(type(m) is QuantLinear for m in experts.values())
    blocks = range(len(decoder_blocks(model)))
    assert not any(block_linears(model, i) for i in blocks)  # no nn.Linear left, routers aside
    assert all(torch.equal(t, weights[k]) for k, t in router.state_dict().items())
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
    assert len(seen[False]) == 4 + 3 * E and same_statistics(seen[False], seen[True])
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


def test_a_bfloat16_run_keeps_the_float32_router_tensors(tmp_path, tokenizer, text_file):
    """DeepSeek-V3's router weight and load-balancing bias are float32 in a bfloat16 model (transformers'
    _keep_in_fp32_modules_strict, as stock save_pretrained writes them): run and run --stream read and
    write them so, not rounded to the 16 bits of the rest (which would move routing choices)."""
    from transformers import AutoModelForCausalLM

    from compress.cli import main

    src = tmp_path / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("deepseek_v3"), dtype=torch.bfloat16)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(1, 0.02)  # where bfloat16 keeps 2-3 decimals
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    run = ["run", str(ROOT / "recipes" / "magnitude-50.yaml"), "--model", str(src), "--dtype", "bfloat16", "--quiet"]
    assert main([*run, "--out", str(tmp_path / "a"), "--eval-data", str(text_file), "--eval-seqlen", "32",
                 "--eval-max-tokens", "64", "--no-dense-eval"]) == 0  # evaluates after rounding to the stored dtypes
    assert main([*run, "--out", str(tmp_path / "b"), "--stream"]) == 0
    with safe_open(src / "model.safetensors", "pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys() if ".mlp.gate." in k}
    assert len(want) == 4 and all(t.dtype == torch.float32 for t in want.values())  # 2 MoE blocks
    for out in ("a", "b"):
        files = sorted((tmp_path / out).glob("*.safetensors"))
        got = {}
        for file in files:
            with safe_open(file, "pt") as f:
                got.update({k: f.get_tensor(k) for k in f.keys() if k in want})
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), out  # float32, intact
    (a, _), (b, _) = load(tmp_path / "a"), load(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)



def test_save_load_convert_and_stock_reload(tmp_path, tokenizer):
    from compress.cli import main
    from compress.saving import stock_notes

    cases = [(t, r, []) for r in ("wanda-50", "sparsegpt-50") for t in TYPES]
    cases += [(t, "gptq-w4g128", ["steps.0.group_size=16"]) for t in TYPES]
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


def same_statistics(a: list, b: list) -> bool:
    """Two block_pass records give every Linear the same statistics (the stages take every expert's
    gate, then every down: another order than the paused pass)."""
    x, y = ({fqn: (n, xtx) for fqn, n, xtx in got} for got in (a, b))
    return len(x) == len(a) == len(b) and x.keys() == y.keys() and all(
        x[f][0] == y[f][0] and torch.allclose(x[f][1], y[f][1]) for f in x)


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
    assert same_statistics(a, b)
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
    assert same_statistics(a, b)


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
    from compress.run_summary import expert_tokens, summary_table

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


def test_n_m_the_fisher_pass_and_the_allocators_work_per_expert():
    """2:4 holds in every expert's rows; the Fisher and OWL allocations give experts their own
    sparsities while the block Linears as a whole keep the target; mixed bits picks 3 or 4 bits
    per expert Linear and meets the average."""
    lin = expert_linears(compressed("sparsegpt-2of4"))
    assert len(lin) == 2 * E * 3
    assert all(((m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1) == 2).all() for m in lin.values())
    for recipe in ("fisher-70", "owl-70"):
        model = compressed(recipe)
        every = block_linears_of(model)
        zeros = sum((m.weight == 0).sum().item() for m in every.values())
        assert zeros / sum(m.weight.numel() for m in every.values()) == pytest.approx(0.7, abs=0.01), recipe
        sparsity = {round((m.weight == 0).float().mean().item(), 4) for m in expert_linears(model).values()}
        assert len(sparsity) > 1, recipe  # not one uniform value: each expert Linear was scored on its own
    model = compressed("mixed-bits-avg3.5", ["steps.0.group_size=16"])
    bits = {f: m.spec.bits for f, m in expert_linears(model).items()}
    assert set(bits.values()) == {3, 4}
    every = {f: m for f, m in model.named_modules() if type(m) is QuantLinear}
    assert len(every) == len(block_linears_of(moe_model("qwen3_moe")))
    size = {f: m.in_features * m.out_features for f, m in every.items()}
    assert sum(m.spec.bits * size[f] for f, m in every.items()) / sum(size.values()) <= 3.5 + 1e-9


def compressed(recipe: str, overrides: list[str] = ()):
    model = moe_model("qwen3_moe")
    compress_(model, load_recipe(ROOT / "recipes" / f"{recipe}.yaml", list(overrides)), batches(4, 32), progress=False)
    return model


def block_linears_of(model) -> dict[str, nn.Module]:
    return {f: m for i in range(model.config.num_hidden_layers) for f, m in block_linears(model, i).items()}


def test_awq_scales_all_experts_with_one_vector_searched_on_their_routed_tokens():
    """The norm before the experts takes one scale vector for every expert's gate and up, chosen
    by the least summed output error of each expert on its own routed tokens (recomputed here from
    the routed inputs themselves); each expert's up -> down pair takes its own; the router is scaled
    with them, so the model computes what it did."""
    from compress.calibrate import capture_block_inputs
    from compress.grid import QuantSpec, rtn
    from compress.smooth import awq_smooth_block_

    model = moe_model("qwen3_moe")
    block = model.model.layers[0]
    with torch.no_grad():
        block.post_attention_layernorm.weight[:4] *= 20  # outlier channels: something to migrate
        before = model(IDS).logits
    routed = {e: [] for e in range(E)}
    hooks = [block.mlp.experts[e].register_forward_pre_hook(lambda m, a, e=e: routed[e].append(a[0])) for e in range(E)]
    with torch.no_grad():
        for ids in batches(4, 32):
            model(ids)
    for h in hooks:
        h.remove()
    X = {e: torch.cat(x) for e, x in routed.items()}
    gate = {e: block.mlp.experts[e].gate_proj.weight.clone() for e in range(E)}
    up = {e: block.mlp.experts[e].up_proj.weight.clone() for e in range(E)}
    norm, router = block.post_attention_layernorm.weight.clone(), block.mlp.gate.weight.clone()
    step = load_recipe(ROOT / "recipes" / "awq-w4g128.yaml", ["steps.0.group_size=16"]).steps[0]
    inputs = capture_block_inputs(model, batches(4, 32), "cpu")
    pairs = ARCHITECTURES["qwen3_moe"].awq_pairs
    alphas = awq_smooth_block_(block, "model.layers.0", pairs, inputs, step, ("mlp.gate",))

    s = norm / block.post_attention_layernorm.weight
    for e in range(E):  # (up's rows are scaled again by the expert's own up -> down pair)
        assert torch.allclose(block.mlp.experts[e].gate_proj.weight, gate[e] * s, rtol=1e-5)
    assert torch.allclose(block.mlp.gate.weight, router * s, rtol=1e-5)
    mag = (torch.cat(list(X.values())).square().mean(0)).sqrt()
    spec = QuantSpec(4, 16, True)

    def error(alpha: float) -> float:
        t = mag.clamp(min=1e-8).pow(alpha)
        t = t / (t.max() * t.min()).sqrt()
        return sum((((W - rtn(W * t, spec).weight / t) @ X[e].T).square().sum()).item()
                   for e, W in ((e, torch.cat([gate[e], up[e]])) for e in range(E)))

    grid = [i / step.awq_grid for i in range(step.awq_grid)]
    chosen = alphas[",".join([f"mlp.experts.{e}.{n}" for n in ("gate_proj", "up_proj") for e in range(E)])]
    assert chosen == min(grid, key=error) and chosen > 0
    own = [(up[e] * s)[:, 0] / block.mlp.experts[e].up_proj.weight[:, 0] for e in range(E)]  # each expert's own s
    assert all(f"mlp.experts.{e}.down_proj" in alphas for e in range(E))
    assert not all(torch.allclose(own[0], x) for x in own[1:])
    with torch.no_grad():
        assert rel(model(IDS).logits, before) < 1e-5


@pytest.mark.parametrize("recipe", ["awq-w4g128", "smoothquant-w4a4"])
@pytest.mark.parametrize("model_type", [t for t in TYPES if ARCHITECTURES[t].awq_pairs is not None])
def test_awq_and_smoothquant_keep_the_function_before_rounding_and_quantize_every_expert(model_type, recipe):
    from compress.calibrate import capture_block_inputs, run_block
    from compress.layers import ActQuantLinear
    from compress.smooth import awq_smooth_block_, smoothquant_block_

    migrate = awq_smooth_block_ if recipe.startswith("awq") else smoothquant_block_
    model = moe_model(model_type)
    with torch.no_grad():
        before = model(IDS).logits
    step = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", ["steps.0.group_size=16"]).steps[0]
    routers = ARCHITECTURES[model_type].experts.routers
    inputs = capture_block_inputs(model, batches(4, 32), "cpu")
    for i, block in enumerate(model.model.layers):  # blocks one by one, as the pass runs them
        pairs = migrate(block, f"model.layers.{i}", ARCHITECTURES[model_type].awq_pairs, inputs, step, routers)
        if isinstance(getattr(block.mlp, "experts", None), UnfusedExperts):  # GLM-4-MoE's first block is dense
            assert any(pair.startswith("mlp.experts.0.") for pair in pairs)  # the norm's pair
            assert f"mlp.experts.{E - 1}.{ARCHITECTURES[model_type].experts.names[2]}" in pairs  # an expert's own
        else:
            assert "mlp.gate_proj,mlp.up_proj" in pairs
        inputs.hidden = run_block(block, inputs)
    with torch.no_grad():
        assert rel(model(IDS).logits, before) < 1e-5
    compress_(model, step, batches(4, 32), progress=False)
    kind = QuantLinear if recipe.startswith("awq") else ActQuantLinear
    assert all(type(m) is kind for m in expert_linears(model).values())


def test_the_staged_pass_runs_the_attention_as_often_whatever_the_number_of_experts():
    """--stream's stages take every expert's gate in one stage and every down in the next: a block
    of 16 experts runs its attention no more often than one of 2 (it ran once per expert Linear)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from compress.calibrate import capture_block_inputs, compress_block

    runs = {}
    for experts in (2, 16):
        torch.manual_seed(0)
        config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=32, num_local_experts=experts,
                               num_experts_per_tok=2)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        unfuse_experts(model)
        block = decoder_blocks(model)[0]
        calls = []
        block.self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        got = []
        compress_block(block, capture_block_inputs(model, batches(2, 16), "cpu"), block_linears(model, 0), {"xtx"},
                       lambda fqn, s, got=got: got.append(fqn), low_memory=True)
        assert len(got) == 4 + 3 * experts
        runs[experts] = len(calls)
    assert runs[16] == runs[2] <= 2 * 6  # 2 samples x (q, o, gates, downs, the outputs, ...)


def test_a_full_stage_leaves_the_other_experts_to_the_next_with_the_same_statistics(monkeypatch):
    import compress.calibrate as calibrate

    model = moe_model("mixtral")
    _, paused = block_pass(model, None, False)
    gate = 64 * 64 * 4  # one gate's XᵀX (hidden 64)
    monkeypatch.setattr(calibrate, "STAGE_STATS_BYTES", 2 * gate)  # two experts' gates a stage
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    _, staged = block_pass(model, None, True)
    assert same_statistics(paused, staged)
    monkeypatch.setattr(calibrate, "STAGE_STATS_BYTES", 2**40)
    capped, calls[:] = len(calls), []
    _, whole = block_pass(model, None, True)
    assert same_statistics(paused, whole)
    assert capped == len(calls) + 3  # E = 4 gates in 2 stages, not 1 (3 samples a stage)
