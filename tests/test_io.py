import json

import pytest
import torch
from conftest import batches, tiny_model

from compress.apply import compress_
from compress.io import save
from compress.recipe import recipe_from_dict


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
