import json

import pytest
import torch
from conftest import batches, tiny_model

from compress.apply import compress_
from compress.recipe import recipe_from_dict
from compress.saving import save


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_save_then_stock_from_pretrained_gives_identical_logits(model_type, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    recipe = recipe_from_dict({"steps": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}]})
    report = compress_(model, recipe, batches(4, 16), progress=False)
    out = save(model, tokenizer, tmp_path / "out", recipe=recipe, report={"layers": report.layers})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert json.loads((out / "report.json").read_text())["layers"]
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()


def test_an_interrupted_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        save(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_non_empty_folder_without_overwrite(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save(tiny_model("llama"), tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"
    save(tiny_model("llama"), tokenizer, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def quantized_tiny(q: dict, model_type: str = "llama"):
    model = tiny_model(model_type)
    recipe = recipe_from_dict({"steps": [{"quantize": q}], "calib": {"samples": 8, "seqlen": 32}})
    compress_(model, recipe, batches(8, 32), progress=False)
    return model


QUANTS = [
    {"method": "gptq", "bits": 4, "group_size": 48, "static_groups": True},  # ragged: 64 = 48 + 16
    {"method": "gptq", "bits": 3, "group_size": 32, "sym": False},
    {"method": "rtn", "bits": 8, "group_size": -1},
    {"method": "rtn", "bits": 4, "group_size": -1, "sym": False},  # per-row zero points [out, 1]
]


@pytest.mark.parametrize("q", QUANTS)
def test_save_then_load_gives_identical_logits_and_packed_modules(q, tmp_path, tokenizer):
    from compress.layers import QuantLinear
    from compress.loading import load

    model = quantized_tiny(q)
    out = save(model, tokenizer, tmp_path / "out")
    reloaded, _ = load(out)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 14 and names == {n for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_saved_layout_is_compressed_tensors_pack_quantized(tmp_path, tokenizer):
    from safetensors import safe_open

    model = quantized_tiny(QUANTS[0])
    out = save(model, tokenizer, tmp_path / "out")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    groups = {g["weights"]["group_size"]: g["targets"] for g in qc["config_groups"].values()}
    assert set(groups) == {16}  # 48 divides neither 64 nor 128: written exactly at gcd(48, in) = 16
    with safe_open(out / "model.safetensors", "pt") as f:
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.weight_packed").shape == (64, 8)  # 64 4-bit codes in 8 int32
        assert f.get_tensor(f"{q}.weight_scale").shape == (64, 4)
        assert f"{q}.weight" not in f.keys() and f"{q}.weight_zero_point" not in f.keys()  # symmetric


def test_load_is_strict_about_unknown_tensors(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    from compress.loading import load

    out = save(quantized_tiny(QUANTS[2]), tokenizer, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.stray"] = torch.zeros(3)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected"):
        load(out)


def test_load_reads_class_and_regex_targets_as_other_tools_write_them(tmp_path, tokenizer):
    from compress.loading import load

    model = quantized_tiny({"method": "rtn", "bits": 4, "group_size": 32})
    out = save(model, tokenizer, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["compression_config"]  # as llm-compressor writes it: no record of ours
    (group,) = config["quantization_config"]["config_groups"].values()
    group["targets"] = ["Linear"]
    config["quantization_config"]["ignore"] = ["lm_head", "re:.*never_matches$"]
    (out / "config.json").write_text(json.dumps(config))
    reloaded, _ = load(out)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


STOCK_LOAD = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert "compress" not in sys.modules
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(m(ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("q", [QUANTS[0], {"method": "gptq", "bits": 4, "group_size": 32}, QUANTS[2]])
def test_stock_transformers_loads_our_checkpoint_without_compress(q, tmp_path, tokenizer):
    """A separate process imports only transformers and compressed-tensors, never compress."""
    import subprocess
    import sys

    pytest.importorskip("compressed_tensors")
    model = quantized_tiny(q)
    out = save(model, tokenizer, tmp_path / "out")
    ids = torch.randint(0, 300, (2, 20))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits, rtol=0, atol=1e-5)


def gptq_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing, written independently: 32/bits values of consecutive rows per int32, LSB first."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0] // per, per, values.shape[1])
    word = sum(v[:, i] << (bits * i) for i in range(per))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


@pytest.mark.parametrize("v1", [True, False])
def test_load_reads_gptq_format_checkpoints(v1, tmp_path, tokenizer):
    """AutoGPTQ / GPTQModel layout: qweight [in/8, out], qzeros [groups, out/8] (v1 stores zero - 1)."""
    from safetensors.torch import load_file, save_file

    from compress.layers import QuantLinear
    from compress.loading import load

    model = quantized_tiny({"method": "gptq", "bits": 4, "group_size": 32, "sym": False})
    out = save(model, tokenizer, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    for fqn, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            tensors.pop(f"{fqn}.{k}")
        zero = m.weight_zero_point.to(torch.int64) - (1 if v1 else 0)
        tensors[f"{fqn}.qweight"] = gptq_pack_rows(m.codes.t().contiguous(), 4)
        tensors[f"{fqn}.qzeros"] = gptq_pack_rows(zero % 16, 4).t().contiguous()  # packed along out
        tensors[f"{fqn}.scales"] = m.weight_scale.t().contiguous()
        tensors[f"{fqn}.g_idx"] = (torch.arange(m.in_features) // 32).to(torch.int32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["compression_config"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    (out / "config.json").write_text(json.dumps(config))
    reloaded, _ = load(out)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_lm_head_is_untied_saved_and_loaded(method, tmp_path, tokenizer):
    import subprocess
    import sys

    from compress.layers import QuantLinear
    from compress.loading import load

    config = tiny_model("llama").config
    config.tie_word_embeddings = True
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    embed = model.get_input_embeddings().weight.detach().clone()
    recipe = recipe_from_dict({"steps": [{"quantize": {"method": method, "bits": 4, "group_size": 32,
                                                       "lm_head": True}}], "calib": {"samples": 8, "seqlen": 32}})
    report = compress_(model, recipe, batches(8, 32), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and report.layers[-1]["module"] == "lm_head"
    assert torch.equal(model.get_input_embeddings().weight, embed)  # the embeddings are not quantized
    out = save(model, tokenizer, tmp_path / "out")
    reloaded, _ = load(out)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    if method == "rtn":
        pytest.importorskip("compressed_tensors")
        torch.save(ids, tmp_path / "ids.pt")
        subprocess.run([sys.executable, "-c", STOCK_LOAD, str(out), str(tmp_path / "ids.pt"),
                        str(tmp_path / "logits.pt")], check=True, cwd=tmp_path, capture_output=True)
        with torch.no_grad():
            torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(ids).logits, rtol=0, atol=1e-5)
