import pytest
import torch
from conftest import batches, tiny_model

from compress import Recipe, Rotate
from compress.actquant import fake_quant_tokens
from compress.apply import compress_
from compress.model import decoder_blocks
from compress.recipe import recipe_from_dict
from compress.rotate import hadamard, random_orthogonal, rotate_


@pytest.mark.parametrize("n", [1, 9, 64, 96, 576, 1536])
@pytest.mark.parametrize("method", ["hadamard", "random"])
def test_random_orthogonal_is_orthogonal(n, method):
    Q = random_orthogonal(n, method, seed=3)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(Q, random_orthogonal(n, method, seed=4)) or n == 1


def test_power_of_two_hadamard_is_a_signed_hadamard():
    Q = random_orthogonal(64, "hadamard", seed=0)
    assert torch.equal(Q.abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    H = hadamard(64)
    signs = (Q * 8 / H)[:, 0]  # Q = diag(±1)·H/8
    assert torch.equal(Q, signs[:, None] * H / 8)


def _phi3():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Phi3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _perturb_norms_(model):
    """Random norm weights, so folding them is tested (fresh models have all ones)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
@pytest.mark.parametrize("method", ["hadamard", "random"])
def test_rotated_model_computes_the_same_function(model_type, method):
    model = _phi3() if model_type == "phi3" else tiny_model(model_type)
    _perturb_norms_(model)
    x = batches(2, 24)[0]
    with torch.no_grad():
        before = model(x).logits
        q_before = decoder_blocks(model)[0].self_attn.get_submodule("qkv_proj" if model_type == "phi3" else "q_proj"
                                                                      ).weight.clone()
        rotate_(model, Rotate(method, seed=0))
        after = model(x).logits
    assert (after - before).norm() / before.norm() < 1e-4
    q_after = decoder_blocks(model)[0].self_attn.get_submodule("qkv_proj" if model_type == "phi3" else "q_proj").weight
    assert (q_after - q_before).abs().max() > 0.01  # it did rotate
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "layernorm" in n)


def test_rotation_spreads_an_outlier_channel_and_cuts_4bit_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 5] *= 60  # a massive channel in the residual stream
    x = batches(1, 32)[0]
    seen = {}
    q = decoder_blocks(model)[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))

    def error():
        with torch.no_grad():
            model(x)
        X = seen["x"]
        return ((fake_quant_tokens(X, 4) - X).norm() / X.norm()).item(), (X.abs().amax(1) / X.std(1)).mean().item()

    err_before, peak_before = error()
    with torch.no_grad():
        rotate_(model, Rotate("hadamard"))
    err_after, peak_after = error()
    handle.remove()
    assert peak_after < peak_before / 3  # max/std per token: the outlier is spread over all channels
    assert err_after < err_before / 2


def test_unsupported_architecture_is_refused():
    refusal = (r"^rotate \(the norms must commute with a rotation as they are\) does not support model_type 'opt'; "
               r"it supports: .*llama")
    with pytest.raises(ValueError, match=refusal):
        rotate_(tiny_model("opt"), Rotate())


def test_rotate_step_through_compress_then_stock_load(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from compress.saving import save

    model = tiny_model("llama")
    _perturb_norms_(model)
    x = batches(1, 20)[0]
    with torch.no_grad():
        before = model(x).logits
    report = compress_(model, Recipe(steps=(Rotate(seed=1),)), progress=False)
    assert report.layers[0]["step"] == "rotate" and report.layers[0]["hidden"] == 64
    save(model, tokenizer, tmp_path / "rot")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "rot", dtype=torch.float32).eval()
    with torch.no_grad():
        after = stock(x).logits
    assert (after - before).norm() / before.norm() < 1e-4


def test_rotate_must_come_first_and_once():
    with pytest.raises(ValueError, match="order rotate"):
        recipe_from_dict({"steps": [{"quantize": {"method": "rtn"}}, {"rotate": {}}]})
    with pytest.raises(ValueError, match="once"):
        recipe_from_dict({"steps": [{"rotate": {}}, {"rotate": {"seed": 2}}]})
    r = recipe_from_dict({"steps": [{"rotate": {"method": "random", "seed": 3}}, {"quantize": {"method": "rtn"}}]})
    assert r.steps[0] == Rotate("random", 3) and not r.needs_data
