"""The float and 8-bit formats (fpquant.py, fplinear.py): their grids, RTN's nearest rounding, GPTQ on
them, the activation formats against compressed-tensors' own definition, and checkpoints that stock
transformers loads with our logits."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import STOCK, batches, make_tokenizer, tiny_model
from safetensors.torch import load_file

from compress import BitBudget, Gptq, Rtn, compress_, load, save
from compress.fplinear import FloatLinear, fp4_codes
from compress.fpquant import (
    E2M1,
    FORMATS,
    act_static_scale,
    effective_scale,
    expand_scale,
    fake_quant_act,
    gptq_float,
    group_absmax,
    round_e4m3,
    round_element,
    rtn_float,
    stored_scale,
)
from compress.pack import e2m1_values, pack_fp4, unpack_fp4

E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_VALUES = E4M3_VALUES[torch.isfinite(E4M3_VALUES)].unique()
TABLES = {"e4m3": E4M3_VALUES, "e2m1": torch.cat([-E2M1, E2M1]).unique(), "int8": torch.arange(-127.0, 128.0)}


def rtn_with(W, stored, fmt, g):
    """W rounded to nearest on given stored scales."""
    s = expand_scale(effective_scale(stored, fmt, g), fmt, *W.shape)
    return round_element(W / s, fmt.element) * s


def weights(out=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g) * 0.1


@pytest.mark.parametrize("name", list(FORMATS))
def test_rtn_picks_the_nearest_value_of_the_element_type_on_stored_scales(name):
    """Every value is one the element type holds, and the nearest of them to w / s (no value of the
    type is closer); the scales are what their stored type holds; nothing exceeds the type's range."""
    fmt, W = FORMATS[name], weights(out=200 if name == "fp8-block" else 48)
    qw = rtn_float(W, fmt)
    table = TABLES[fmt.element]
    assert torch.isin(qw.values, table).all()
    s = expand_scale(qw.scale, fmt, *W.shape)
    target = W / s
    best = (target[..., None] - table).abs().min(-1).values
    assert torch.allclose((target - qw.values).abs(), best, atol=1e-6)
    if fmt.scale == "e4m3":
        assert torch.equal(qw.stored, round_e4m3(qw.stored))
        assert torch.allclose(qw.global_scale, 448 * 6 / W.abs().max())
    if fmt.scale == "e8m0":
        assert torch.equal(qw.stored, torch.exp2(torch.log2(qw.stored).round()))
    if fmt.element == "e2m1":  # each group's scale rounds it no worse than the min-max scale would
        minmax = stored_scale(group_absmax(W, fmt), fmt, qw.global_scale)
        def group_err(stored):
            return (W - rtn_with(W, stored, fmt, qw.global_scale)).square().reshape(48, -1, fmt.group).sum(-1)

        assert (group_err(qw.stored) <= group_err(minmax) + 1e-12).all()
        assert fmt.scale != "e4m3" or (qw.stored != minmax).any()  # and NVFP4's search moved some
    assert qw.scale.shape == fmt.groups(*W.shape)
    assert torch.equal(qw.weight, qw.values * s)


def test_avg_bits_count_elements_scales_and_global():
    assert FORMATS["nvfp4"].avg_bits(576, 576) == 4 + 8 / 16 + 32 / 576**2
    assert FORMATS["mxfp4"].avg_bits(64, 64) == 4 + 8 / 32
    assert FORMATS["fp8"].avg_bits(10, 64) == 8 + 32 / 64
    assert FORMATS["fp8-block"].avg_bits(256, 256) == 8 + 4 * 32 / 256**2


@pytest.mark.parametrize("name", ["fp8", "nvfp4", "mxfp4", "int8"])
def test_gptq_on_a_format_lowers_the_output_error_of_rtn(name):
    """GPTQ exists to make ‖(W − Ŵ)X‖ smaller than rounding each weight alone does: on correlated
    inputs it must, while staying on the format (representable values, zeros kept)."""
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 64, generator=g) @ torch.randn(64, 256, generator=g)  # correlated inputs
    W = weights() * (torch.rand(48, 256, generator=g) > 0.3)
    H = 2 * X.t() @ X / X.shape[0]
    rtn, gq = rtn_float(W, fmt), gptq_float(W, H, fmt, keep=W != 0)
    err = lambda q: ((W - q.weight) @ X.t()).norm()  # noqa: E731
    assert err(gq) < 0.9 * err(rtn)
    assert torch.isin(gq.values, TABLES[fmt.element]).all()
    assert (gq.weight[W == 0] == 0).all()


def test_fp4_codes_pack_and_unpack_exactly():
    values = torch.cat([E2M1, -E2M1[1:]]).repeat(4, 2)[:, :30]
    codes = fp4_codes(values)
    assert torch.equal(e2m1_values()[codes.long()], values)
    packed = pack_fp4(codes)
    assert packed.shape == (4, 15) and packed.dtype == torch.uint8
    assert torch.equal(packed[0, 0], codes[0, 0] | (codes[0, 1] << 4))  # the even input in the low nibble
    assert torch.equal(unpack_fp4(packed, 30), codes)


def _ct_fake_quant(x, act):
    """compressed-tensors' own fake quantization of an input activation, for its preset scheme."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK, FP8_DYNAMIC, INT8_W8A8, NVFP4
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    args = {"fp8-token": FP8_DYNAMIC, "fp8-group": FP8_BLOCK, "nvfp4": NVFP4, "int8-token": INT8_W8A8}[act]
    args = args["input_activations"]
    module = torch.nn.Module()
    g = act_static_scale(x.abs().amax(0), act) if act == "nvfp4" else None
    x = x[None]  # [batch, tokens, in], as a Linear sees it: "token" keeps dims 0 and 1
    scale, zp = compute_dynamic_scales_and_zp(x, args, module, global_scale=g)
    return fake_quantize(x, scale, zp, args, global_scale=g)[0], g


@pytest.mark.parametrize("act", ["fp8-token", "fp8-group", "nvfp4", "int8-token"])
def test_activation_formats_are_compressed_tensors_own(act):
    """Our simulation of each activation format is compressed-tensors' (what stock transformers and
    llm-compressor compute), value for value, in float32."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 256, generator=g) * torch.rand(256, generator=g) * 4
    ct, static = _ct_fake_quant(x, act)
    assert torch.equal(fake_quant_act(x, act, static), ct)


def _stock_logits(folder, ids, dtype):
    script = STOCK.replace("torch.float32", f"torch.{dtype}").replace(".logits, folder", ".logits.float(), folder")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(ids.tolist()), str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(folder / "stock.pt")


# (format, activations, method, dtype stock transformers evaluates it in: compressed-tensors decompresses
# FP4 weights to bfloat16 whatever dtype is asked for)
CASES = [("fp8", "fp8-token", Rtn, "float32"), ("fp8", "fp8-tensor", Gptq, "float32"),
         ("int8", "int8-token", Gptq, "float32"), ("nvfp4", None, Gptq, "bfloat16"), ("mxfp4", None, Rtn, "bfloat16")]


@pytest.mark.parametrize("fmt,act,method,dtype", CASES)
def test_checkpoint_reloads_in_compress_and_stock_transformers(fmt, act, method, dtype, tmp_path):
    """Saved in compressed-tensors' layout of the format: compress.load gives the same logits bit for bit,
    stock transformers (compress not imported) the same logits too."""
    model, ids = tiny_model("llama"), batches(1, 32, 5)[0]
    compress_(model, method(format=fmt, act_format=act), batches(4, 32), progress=False)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.down_proj"), FloatLinear) for i in range(2))
    out = save(model, make_tokenizer(), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert len(config["config_groups"]) == 1 and len(group["targets"]) == 14
    with torch.no_grad():
        assert torch.equal(load(out)[0](ids).logits, model(ids).logits)
        ours = load(out, dtype)[0](ids).logits.float()
    stock = _stock_logits(out, ids, dtype)
    assert ((stock - ours).norm() / ours.norm()) < 1e-5


def test_nvfp4_fused_siblings_share_one_global_scale(tmp_path):
    """vLLM loads q/k/v (and gate/up) into one GEMM with one NVFP4 global scale: the checkpoint stores the
    smallest of theirs for each, so every member's scales stay in E4M3's range; o/down keep their own."""
    model = tiny_model("llama")
    weights = {f"model.layers.{i}.{n}": m.weight.detach().clone() for i, layer in enumerate(model.model.layers)
               for n, m in layer.named_modules() if n.endswith("proj")}
    compress_(model, Rtn(format="nvfp4"), progress=False)
    stored = load_file(save(model, make_tokenizer(), tmp_path / "out") / "model.safetensors")
    own = {f: 448 * 6 / W.abs().max() for f, W in weights.items()}
    for i in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)):
            names = [f"model.layers.{i}.{n}" for n in group]
            expected = min(own[f] for f in names)
            for f in names:
                assert torch.allclose(stored[f"{f}.weight_global_scale"], expected.reshape(1))
                assert torch.equal(model.get_submodule(f).weight_global_scale, stored[f"{f}.weight_global_scale"])
    assert len({float(own[f"model.layers.0.self_attn.{n}_proj"]) for n in "qkv"}) == 3  # the test means something


def test_recipes_refuse_what_a_format_cannot_take():
    with pytest.raises(ValueError, match="format must be int or one of"):
        Rtn(format="fp6")
    with pytest.raises(ValueError, match="act_format nvfp4 goes with format nvfp4, not fp8"):
        Rtn(format="fp8", act_format="nvfp4")
    with pytest.raises(ValueError, match="format int8 is W8A8"):
        Rtn(format="int8")
    with pytest.raises(ValueError, match="takes method rtn or gptq"):
        from compress import Awq
        Awq(format="nvfp4")
    with pytest.raises(ValueError, match="act_format fp8-group needs a multiple of 128 inputs"):
        compress_(tiny_model("llama"), Rtn(format="fp8-block", act_format="fp8-group"), progress=False)
    with pytest.raises(ValueError, match="needs a multiple of 32 inputs"):
        model = tiny_model("llama")
        model.model.layers[0].mlp.down_proj = torch.nn.Linear(120, 64, bias=False)
        compress_(model, Rtn(format="mxfp4"), progress=False)


def test_mixed_formats_meet_the_budget_and_load_in_stock_transformers(tmp_path):
    """format_choices gives each Linear one format within avg_bits (stored bits, scales counted, a left-out
    Linear at 16); the checkpoint is compressed-tensors' mixed-precision, one config group per format,
    and stock transformers loads it with our logits. Stock computes in bfloat16 there (FP4) and rounds
    FP8's fp32 scales to bfloat16 first, so ours are compared with the same rounding."""
    model, ids = tiny_model("llama"), batches(1, 32, 5)[0]
    report = compress_(model, Gptq(budget=BitBudget(formats=("nvfp4", "fp8", "bf16"), avg_bits=7.0)),
                       batches(4, 32), progress=False)
    linears = {f"model.layers.{i}.{n}": m for i, layer in enumerate(model.model.layers)
               for n, m in layer.named_modules() if n.endswith("proj")}
    kinds = {fqn: m.fmt if isinstance(m, FloatLinear) else "bf16" for fqn, m in linears.items()}
    assert set(kinds.values()) == {"nvfp4", "fp8", "bf16"}
    for i in range(2):  # vLLM runs q/k/v and gate/up as one GEMM each: one format per fused group
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            assert len({kinds[f"model.layers.{i}.{n}"] for n in group}) == 1
    stored = sum((16 if k == "bf16" else FORMATS[k].avg_bits(m.out_features, m.in_features))
                 * m.in_features * m.out_features for (fqn, k), m in zip(kinds.items(), linears.values()))
    assert stored / sum(m.in_features * m.out_features for m in linears.values()) <= 7.0
    assert {r["module"]: r["format"] for r in report.layers} == {f: k for f, k in kinds.items() if k != "bf16"}
    out = save(model, make_tokenizer(), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["float-quantized", "nvfp4-pack-quantized"]
    ours = load(out, "bfloat16")[0]
    for m in ours.modules():
        if isinstance(m, FloatLinear) and m.fmt == "fp8":
            m.weight_scale.copy_(m.weight_scale.bfloat16().float())
    with torch.no_grad():
        logits = ours(ids).logits.float()
    assert ((_stock_logits(out, ids, "bfloat16") - logits).norm() / logits.norm()) < 1e-5
