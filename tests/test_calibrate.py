import pytest
import torch
from conftest import batches, tiny_model

from compress.calibrate import capture_block_inputs, compress_block, run_block
from compress.model import block_linears, decoder_blocks, set_weight_matrix_, weight_matrix


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "opt", "gpt2"])
def test_replaying_block0_on_captured_inputs_reproduces_the_model(model_type):
    model = tiny_model(model_type)
    data = batches(3, 24)
    inputs = capture_block_inputs(model, data)
    seen = []
    hook = decoder_blocks(model)[0].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for ids in data:
            model(ids)
    hook.remove()
    for replay, own in zip(run_block(decoder_blocks(model)[0], inputs), seen):
        torch.testing.assert_close(replay, own, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_compress_block_compresses_each_linear_once_before_it_runs(model_type):
    model = tiny_model(model_type)
    inputs = capture_block_inputs(model, batches(4, 16))
    block = decoder_blocks(model)[0]
    linears = block_linears(model, 0)
    calls = []

    def halve(fqn, stats):
        calls.append((fqn, stats.n_tokens))
        W = weight_matrix(linears[fqn])
        set_weight_matrix_(linears[fqn], W * 0.5)

    hidden = list(inputs.hidden)
    outputs = compress_block(block, inputs, linears, {"xtx"}, halve)
    assert inputs.hidden == [None] * len(hidden)  # consumed
    inputs.hidden = hidden
    assert sorted(f for f, _ in calls) == sorted(linears)  # once each
    assert all(n == 4 * 16 for _, n in calls)  # every sample fed every Linear before it was compressed
    # every sample ran every Linear after it was compressed: a plain replay through the
    # compressed block gives the very same outputs
    for got, want in zip(outputs, run_block(block, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compress_block_stats_come_from_compressed_upstream_layers():
    """True-sequential: o_proj's statistics are those of inputs produced by the compressed q/k/v."""
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, batches(2, 16))
    block = decoder_blocks(model)[0]
    linears = block_linears(model, 0)
    o_name = next(n for n in linears if n.endswith("o_proj"))
    seen = {}

    def zero_v_then_record(fqn, stats):
        if fqn.endswith("v_proj"):
            set_weight_matrix_(linears[fqn], torch.zeros_like(weight_matrix(linears[fqn])))
        seen[fqn] = stats.x_sq.clone() if stats.x_sq is not None else None

    compress_block(block, inputs, linears, {"x_sq"}, zero_v_then_record)
    assert torch.count_nonzero(seen[o_name]) == 0  # attention over zero values gives zero inputs
