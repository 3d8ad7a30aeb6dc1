import pytest
import torch
from conftest import tiny_model

from compress.model import ARCHITECTURES, decoder_blocks, find_linears, load_model, match

TESTED = ["llama", "qwen2", "gemma3_text", "opt", "gpt2"]


@pytest.mark.parametrize("model_type", TESTED)
def test_load_model_from_a_folder_finds_blocks_and_linears(model_type, tmp_path, tokenizer):
    tiny_model(model_type).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, "float32")
    assert model.config.model_type == model_type
    blocks = decoder_blocks(model)
    assert len(blocks) == 2
    linears = find_linears(blocks[0])
    assert len(linears) >= 4  # attention and MLP projections
    assert all(m.weight.dtype == torch.float32 for m in linears.values())


def test_dtype_choice(tmp_path, tokenizer):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_architecture_lists_the_supported_ones(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, PhiConfig

    config = PhiConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    assert "unsupported model_type 'phi'" in str(e.value)
    assert all(t in str(e.value) for t in ARCHITECTURES)


@pytest.mark.parametrize("path", ["/no/such/folder", "missing.gguf", "./nope"])
def test_missing_model_is_file_not_found(path):
    with pytest.raises(FileNotFoundError):
        load_model(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_match_globs():
    assert match("model.layers.0.mlp.down_proj", ["*"], [])
    assert not match("model.layers.0.mlp.down_proj", ["*"], ["*.down_proj"])
    assert match("model.layers.0.self_attn.q_proj", ["*self_attn*"], ["*.mlp.*"])
    assert not match("model.layers.0.mlp.up_proj", ["*self_attn*"], [])


def test_gpt2_conv1d_is_seen_as_out_by_in():
    from compress.model import weight_matrix

    model = tiny_model("gpt2")
    lin = find_linears(decoder_blocks(model)[0])
    c_fc = next(m for n, m in lin.items() if n.endswith("c_fc"))
    assert weight_matrix(c_fc).shape == (256, 64)  # [out = 4 * n_embd, in = n_embd]
