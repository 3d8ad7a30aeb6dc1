import math
from types import SimpleNamespace

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


class _Oracle(torch.nn.Module):
    """Records the windows it is given and puts all probability on the token that follows in the window
    (it sees the whole window): the perplexity is exactly 1 when every scored target is the next token."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # perplexity reads the device from a parameter
        self.config = SimpleNamespace(max_position_embeddings=256)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids.clone())
        logits = torch.full((*input_ids.shape, VOCAB), -1e4)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 0.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("bos", [None, 0])
def test_windows_are_bos_then_consecutive_slices_and_every_text_token_is_scored(bos):
    """seqlen 50 over 200 tokens: with BOS, windows are BOS + tokens[49 i : 49 (i + 1)] (the 4 tokens past
    196 dropped), all 49 text tokens scored; without it, tokens[50 i : 50 (i + 1)] with the first one context."""
    tokens = torch.randint(2, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    model = _Oracle()
    ppl, count = perplexity(model, tokens, seqlen=50, batch_size=3, bos_token_id=bos, progress=False)
    step = 50 if bos is None else 49
    expect = [tokens[0, i * step : (i + 1) * step] for i in range(200 // step)]
    if bos is not None:
        expect = [torch.cat([torch.tensor([bos]), w]) for w in expect]
    assert [w.shape[0] for w in model.seen] == [3, 1]  # batches of 3 windows
    assert torch.equal(torch.cat(model.seen), torch.stack(expect))
    assert count == 4 * 49 and ppl == 1.0


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
