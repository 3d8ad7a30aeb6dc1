import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from compress.evaluate import adds_bos, perplexity


def _uniform_model():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform predictor
    return model


def test_uniform_predictor_has_perplexity_equal_to_the_vocabulary_size():
    tokens = torch.randint(0, VOCAB, (1, 1000))
    ppl, count = perplexity(_uniform_model(), tokens, seqlen=64, batch_size=3, progress=False)
    assert ppl == pytest.approx(VOCAB, rel=1e-5)
    assert count == (1000 // 64) * 63  # the tail window is dropped; first token of a window is context


def test_bos_windows_score_every_text_token():
    tokens = torch.randint(2, VOCAB, (1, 200))
    _, count = perplexity(_uniform_model(), tokens, seqlen=50, bos_token_id=0, progress=False)
    assert count == (200 // 49) * 49


def test_perplexity_matches_a_direct_computation_and_batching_does_not_change_it():
    model = tiny_model("llama")
    tokens = torch.randint(0, VOCAB, (1, 256))
    with torch.no_grad():
        losses = [model(tokens[:, i : i + 64], labels=tokens[:, i : i + 64]).loss.item() for i in range(0, 256, 64)]
    direct = math.exp(sum(losses) / len(losses))
    one = perplexity(model, tokens, seqlen=64, batch_size=1, progress=False)[0]
    four = perplexity(model, tokens, seqlen=64, batch_size=4, progress=False)[0]
    assert one == pytest.approx(direct, rel=1e-5) and four == pytest.approx(one, rel=1e-5)


def test_seqlen_is_capped_at_the_model_maximum():
    tokens = torch.randint(0, VOCAB, (1, 600))
    _, count = perplexity(_uniform_model(), tokens, seqlen=4096, progress=False)  # max_position_embeddings 256
    assert count == 2 * 255


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(_uniform_model(), torch.zeros(1, 10, dtype=torch.long), seqlen=64, progress=False)


def test_adds_bos(tokenizer):
    assert not adds_bos(tokenizer)  # the test tokenizer adds no special tokens
