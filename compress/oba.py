"""Optimal Brain Apoptosis scores for MLP channels and attention heads (Sun et al., ICLR 2025).

The score of a unit u is the second-order prediction of the LM loss change when it is removed,

    ΔL_u ≈ gᵀδ_u + ½ δ_uᵀ H δ_u,

with g and H the gradient and the exact Hessian of the mean next-token loss on calibration windows,
over the consumers' weights (down_proj, o_proj) of every decoder block at once: H holds the cross
terms between layers that the layer-wise XᵀX leaves out.

δ_u is the unit's consumer columns, negated (down_proj column j; o_proj's columns of head h). Zeroing
them removes the unit exactly as dropping its producer rows too does (those rows then feed nothing),
but along this direction the unit's output falls linearly, so the Taylor series is accurate for a
small unit. The paper's δ over all the unit's parameters (gate, up and down) makes the channel's
output fall as (1 − t)³, whose second-order expansion misses the leading term of the loss change.

Per-unit scalars m (one per unit, 1 in the dense model) scale the consumers' input columns: W diag(m)
is linear in m, so ∂L/∂m_u = −gᵀδ_u and ∂²L/∂m_u∂m_v = δ_uᵀHδ_v exactly, and only the m require
gradients. One Hessian-vector product (double backward) with a sign vector s gives s_u (Hs)_u, an
unbiased estimate of H_uu (Hutchinson). The signs are r_u · (−1)^popcount(k & π(u)) for probes
k < K (rows of a Sylvester Hadamard matrix, a random permutation π of the units, random signs r):
with K a power of two, the estimate is H_uu plus the cross terms with the units sharing π(u) mod K,
so it is exact once K is at least the number of units.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import shard, world
from .model import blocks_path, decoder_blocks, frozen
from .structured import Structured, consumers, units_of

log = logging.getLogger(__name__)

# Hessian-vector products batched into one double backward (vmap) hold [probes, T, vocab] logit
# gradients: as many probes as keep that under 2^26 elements (2 for 512 tokens of a 49k vocabulary)
BATCH_ELEMENTS = 2**26


def unit_width(model: nn.Module, prefix: str, step: Structured) -> int:
    """Consumer input columns per unit: 1 for a channel, head_dim for a head, a KV group's heads
    for a group (kv_groups, or one query head per group)."""
    if step.unit == "channels":
        return 1
    attn = model.get_submodule(f"{prefix}.{units_of(model)['attn']}")
    per_group = attn.num_key_value_groups
    return attn.head_dim * (per_group if step.kv_groups or per_group == 1 else 1)


def probe_signs(n: int, probes: int, seed: int) -> Tensor:
    """Sign vectors [probes, n] (float): r_u · (−1)^popcount(k & π(u)) for rows k of a Sylvester
    Hadamard matrix, so that Σ_k s_ku s_kv = 0 for u ≠ v unless π(u) ≡ π(v) mod probes (a power of 2)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    r = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    both = torch.arange(probes).unsqueeze(1) & perm.unsqueeze(0)  # [probes, n]
    parity = torch.zeros_like(both)
    for b in range(max(1, (max(n, probes) - 1).bit_length())):
        parity ^= (both >> b) & 1
    return ((1 - 2 * parity) * r).float()


def oba_scores(model: nn.Module, step: Structured, samples: list[Tensor], seed: int = 0,
               progress: bool = False) -> tuple[dict[str, Tensor], dict]:
    """(block prefix -> predicted loss increase of removing each of its units [units] (channels,
    query heads, or KV groups as `unit_width` says), −∂L/∂m_u + ½ H_uu, from `samples` (each [1, T]);
    metrics: samples, probes, seconds, and the median standard error of the ½ H_uu estimates
    against the spread (standard deviation) of the scores within a block, both in nats).

    Every sample takes one forward, one backward that keeps its graph, and step.oba_probes
    Hessian-vector products through it, with probes of its own. Under torchrun, `samples` are
    shared out and the sums combined over ranks, so every rank returns the same scores.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()

    prefixes = [f"{blocks_path(model)}.{b}" for b in range(len(decoder_blocks(model)))]
    layers = {}
    for prefix in prefixes:
        (_, linear), = consumers(model, prefix, step).items()
        width = unit_width(model, prefix, step)
        if linear.in_features % width:
            raise ValueError(f"{prefix}: {linear.in_features} consumer inputs do not split into units of {width}")
        layers[prefix] = (linear, width, linear.in_features // width)
    device = next(model.parameters()).device
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    masks = [torch.ones(n, device=device, dtype=dtype, requires_grad=True) for _, _, n in layers.values()]
    sizes = [n for _, _, n in layers.values()]
    grad_sum, quad_sum, quad_sq = (torch.zeros(sum(sizes), dtype=torch.float64) for _ in range(3))
    handles = [linear.register_forward_pre_hook(_scale_inputs(m, width))
               for (linear, width, _), m in zip(layers.values(), masks)]
    local = shard(range(len(samples)))  # global indices: each window's probes do not depend on the ranks
    with frozen(model):
        try:
            for i in tqdm(local, desc="oba", unit="seq", disable=not progress):
                ids = samples[i].to(device)
                signs = probe_signs(sum(sizes), step.oba_probes, seed * 100_003 + i)  # fresh probes: the noise averages
                with sdpa_kernel(SDPBackend.MATH):  # the fused CPU/GPU attention kernels have no double backward
                    loss = lm_loss(model, ids)
                grads = torch.autograd.grad(loss, masks, create_graph=True)
                chunks = signs.split(max(1, BATCH_ELEMENTS // (ids.shape[1] * model.config.vocab_size)))
                for k, s in enumerate(chunks):  # [probes, units]: a batch of Hessian-vector products in one pass
                    hs = torch.autograd.grad(grads, masks, grad_outputs=s.to(device, dtype).split(sizes, dim=1),
                                             retain_graph=k < len(chunks) - 1, is_grads_batched=True)
                    e = s.double() * torch.cat(hs, 1).detach().double().cpu()  # [probes, units] estimates of H_uu
                    quad_sum += e.sum(0)
                    quad_sq += e.square().sum(0)
                grad_sum += torch.cat(grads).detach().double().cpu()
        finally:
            for h in handles:
                h.remove()
    total = torch.stack([grad_sum, quad_sum, quad_sq, torch.full_like(grad_sum, len(local))])
    if world() > 1:  # on the model's device: NCCL carries CUDA tensors only
        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    n = total[3] * step.oba_probes  # estimates per unit
    grad, quad = total[0] / total[3], total[1] / n
    stderr = 0.5 * ((total[2] / n - quad.square()).clamp_min(0) / n.clamp_min(2)).sqrt()
    score = (-grad + 0.5 * quad).float()
    metrics = {"samples": int(total[3, 0]), "probes": step.oba_probes, "seconds": time.perf_counter() - t0,
               "stderr": stderr.median().item(),
               "spread": torch.stack([s.std() for s in score.double().split(sizes)]).median().item()}
    log.info("oba: %d units, %s", len(score), metrics)
    return dict(zip(layers, score.split(sizes))), metrics


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of `ids` [1, T], in the model's dtype or float32 if narrower
    (transformers' own loss always takes float32, which would cap a float64 check at 1e-7)."""
    logits = model(ids, use_cache=False).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _scale_inputs(mask: Tensor, width: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * mask.to(x.device, x.dtype).repeat_interleave(width),) + args[1:]
    return hook


def step_oba(model: nn.Module, steps: tuple, samples: list[Tensor], seed: int,
             progress: bool = False) -> dict[int, tuple[dict[str, Tensor], dict]]:
    """id(step) -> its oba_scores (scores, metrics), for every structured step with score oba, on the
    model as it is (the dense one: compress_ calls this before the streaming pass, as it takes the Fisher)."""
    wanted = [s for s in steps if isinstance(s, Structured) and s.score == "oba"]
    if wanted and not samples:
        raise ValueError("structured score oba needs calibration data")
    return {id(s): oba_scores(model, s, samples, seed, progress) for s in wanted}
