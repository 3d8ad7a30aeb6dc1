"""Sparse upcycling (Komatsuzaki et al. 2023): a dense Llama-type model as a Mixtral-layout MoE.

    .venv/bin/python evals/upcycle.py MODEL --out DIR [--experts 8] [--top-k 2] [--seed 0] [--data TEXT]

Every MLP becomes E identical copies of itself behind a seeded random router; Mixtral renormalizes its
top-k weights to sum to 1, so the MoE computes the dense model's function (up to float rounding) while
the tokens spread unevenly over the experts. No MoE weights can be downloaded here: this is our test MoE.

Why Mixtral and not qwen3_moe: Qwen3 attention always RMS-normalizes q and k per head (q_norm, k_norm);
even with unit weights that changes the scores, so it cannot hold Llama's attention. Mixtral's attention
is Llama's (no bias, head_dim**-0.5 scaling, the same RoPE code) with a sliding window we turn off.
MODEL is a folder or a .gguf; DIR gets stock `save_pretrained` files (per-expert w1/w2/w3 tensors,
which transformers fuses into 3D parameters on load) and the tokenizer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

SAMPLE = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
    "in Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel "
    "Tower surpassed the Washington Monument to become the tallest man-made structure in the world. "
    "def mean(xs):\n    return sum(xs) / len(xs)\n"
    "Photosynthesis converts light energy into chemical energy stored in glucose; 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. "
    "In 1848 revolutions broke out across Europe, from Paris to Vienna and Berlin, demanding constitutions. "
)


def moe_config(dense, experts: int, top_k: int):
    """The Mixtral config whose attention, norms, RoPE and embeddings are the dense model's."""
    from transformers import MixtralConfig

    c = dense.config
    if c.model_type not in ("llama", "mistral"):
        raise ValueError(f"upcycling needs a llama or mistral model, got model_type {c.model_type!r}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Mixtral has no attention or MLP biases; this model has them")
    if not 1 <= top_k <= experts:
        raise ValueError(f"need 1 <= top_k <= experts, got top_k {top_k} and {experts} experts")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(c.rope_parameters),
        sliding_window=getattr(c, "sliding_window", None),  # Llama has none: full causal attention
        attention_dropout=c.attention_dropout, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, num_local_experts=experts, num_experts_per_tok=top_k,
        dtype=dense.dtype,
    )


@torch.no_grad()
def upcycle(dense, experts: int = 8, top_k: int = 2, seed: int = 0):
    """A MixtralForCausalLM computing `dense`'s function: its MLPs copied into every expert, routers random."""
    from transformers import MixtralForCausalLM

    config = moe_config(dense, experts, top_k)
    moe = MixtralForCausalLM(config).to(dense.dtype).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    gen = torch.Generator().manual_seed(seed)
    h = config.hidden_size
    for dense_block, block in zip(dense.model.layers, moe.model.layers):
        mlp = dense_block.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # Mixtral's [gate; up] halves
        block.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, -1, -1))
        block.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, -1, -1))
        # Logits ~ N(0, 1) for a unit-RMS input; the top-k choice is all that matters for the output.
        block.mlp.gate.weight.copy_(torch.randn(experts, h, generator=gen) / h**0.5)
    left = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
    assert not left, f"weights not carried over: {left}"
    if config.tie_word_embeddings:
        moe.tie_weights()
    else:
        moe.lm_head.weight.copy_(dense.lm_head.weight)
    moe.generation_config = dense.generation_config
    return moe


@torch.no_grad()
def drop_experts(model, keep: Sequence[int]) -> None:
    """Keep only experts `keep` (the same indices in every block): their router rows and weights.
    top-k shrinks to the experts left if it must."""
    keep = sorted(set(keep))
    n = model.config.num_local_experts
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"keep must name experts in 0..{n - 1}, got {keep}")
    idx = torch.tensor(keep)
    top_k = min(model.config.num_experts_per_tok, len(keep))
    for block in model.model.layers:
        moe = block.mlp
        moe.gate.weight = torch.nn.Parameter(moe.gate.weight[idx].clone())
        moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj[idx].clone())
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj[idx].clone())
        moe.gate.num_experts = moe.experts.num_experts = len(keep)  # used to one-hot the routing
        moe.gate.top_k = moe.top_k = top_k
    model.config.num_local_experts, model.config.num_experts_per_tok = len(keep), top_k
    model.num_experts, model.num_experts_per_tok = len(keep), top_k


@torch.no_grad()
def expert_counts(model, ids: torch.Tensor) -> torch.Tensor:
    """[blocks, experts]: how many tokens of `ids` each block routes to each expert (top-k picks)."""
    picks, hooks = [], []
    for block in model.model.layers:
        hooks.append(block.mlp.gate.register_forward_hook(lambda m, i, out: picks.append(out[2].flatten())))
    try:
        model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    n = model.config.num_local_experts
    return torch.stack([torch.bincount(p, minlength=n) for p in picks])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="dense llama-type model: a folder or a .gguf file")
    p.add_argument("--out", required=True, help="folder for the MoE model")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="load and save dtype (float32 keeps a dequantized GGUF exact)")
    p.add_argument("--data", help="text file whose first --tokens tokens show the routing (default: a sample)")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    from compress.model import load_model

    t0 = time.perf_counter()
    dense, tok = load_model(args.model, args.dtype)
    moe = upcycle(dense, args.experts, args.top_k, args.seed)
    text = open(args.data, encoding="utf-8").read() if args.data else SAMPLE
    ids = tok(text[: 20 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        want, got = dense(ids, use_cache=False).logits, moe(ids, use_cache=False).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    counts = expert_counts(moe, ids)
    moe.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.model} -> {args.out}: mixtral, {moe.config.num_hidden_layers} blocks x {args.experts} experts, "
          f"top-{args.top_k}, seed {args.seed}, {sum(q.numel() for q in moe.parameters()) / 1e6:.0f}M parameters")
    print(f"max |logit difference| / max |logit| vs the dense model on {ids.shape[1]} tokens: {err:.2e}")
    print(f"tokens per expert (top-{args.top_k} picks) on {ids.shape[1]} tokens:")
    for b in sorted({0, 1, len(counts) // 2, len(counts) - 1}):
        print(f"  block {b:2d}: {counts[b].tolist()}")
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
