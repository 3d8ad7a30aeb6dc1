import pytest
import torch
from conftest import tiny_model

from compress import Calib
from compress.data import calibration_batches, load_tokens, tokenize


def test_calibration_windows_are_seeded_slices_of_the_text(tokenizer, text_file):
    calib = Calib(source=str(text_file), samples=5, seqlen=16, seed=3)
    a, b = calibration_batches(tokenizer, calib), calibration_batches(tokenizer, calib)
    assert len(a) == 5 and all(x.shape == (1, 16) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = calibration_batches(tokenizer, Calib(source=str(text_file), samples=5, seqlen=16, seed=4))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    stream = tokenize(tokenizer, text_file.read_text())[0].tolist()
    window = a[0][0].tolist()
    assert any(stream[i : i + 16] == window for i in range(len(stream) - 15))


def test_text_shorter_than_one_sample_is_a_clear_error(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(ValueError, match="one sample needs 513"):
        calibration_batches(tokenizer, Calib(source=str(short), seqlen=512))


def test_empty_file_and_missing_source(tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(tokenizer, Calib(source=str(empty)))
    with pytest.raises(FileNotFoundError, match="not a dataset name"):
        load_tokens(tokenizer, "no/such/file.txt")


def test_self_generated_calibration(tokenizer):
    model = tiny_model("llama")
    out = calibration_batches(tokenizer, Calib(source="self", samples=3, seqlen=12, seed=0), model)
    again = calibration_batches(tokenizer, Calib(source="self", samples=3, seqlen=12, seed=0), model)
    assert [x.shape for x in out] == [(1, 12)] * 3
    assert all(torch.equal(x, y) for x, y in zip(out, again))
    assert all(x[0, 0] == tokenizer.bos_token_id for x in out)


def test_eval_tokens_are_cut_to_max_tokens(tokenizer, text_file):
    assert load_tokens(tokenizer, str(text_file), 50).shape == (1, 50)
