"""MaskLLM: learnable 2:4 masks (Fang et al., NeurIPS 2024, "MaskLLM: Learnable Semi-Structured
Sparsity for Large Language Models").

Every group of 4 consecutive inputs of a row keeps one of the six 2-of-4 patterns S_1..S_6. Each
group holds six logits θ; the mask is learned end to end with the LM loss of the whole model, the
weights frozen. A forward samples a soft choice by Gumbel-softmax (the paper's Eq. 4-5),

    y = softmax((θ + g) / τ),  g ~ Gumbel(0, 1)        M̃ = Σ_k y_k S_k        W̃ = W ⊙ M̃

so the gradient reaches θ through y; τ anneals linearly from tau_start to tau_end over the step
budget, and the final mask is the most likely pattern per group, S_argmax θ: exactly 2:4, the kept
weights untouched. The logits start from a one-shot mask M₀ (Wanda or magnitude) as a prior:
θ_k = prior · |S_k ∩ M₀|, so the pattern equal to M₀ leads by `prior` over the four that share one
position with it. The paper scales logits by κ before the softmax; under Adam that is the same as
multiplying the learning rate by κ, so `lr` is the one knob here.

Memory: six fp32 logits per group of four weights (1.5 floats per weight) plus Adam's two moments
of them, and one soft mask per Linear alive for the backward pass.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .calibrate import dense_pass, stack_batches
from .config import Prune, require
from .distributed import world
from .model import block_linears, decoder_blocks, frozen, match, set_weight_matrix_, weight_matrix
from .prune import select_mask
from .scores import SCORERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskLlm(Prune):
    """Learned 2:4 masks (pattern "2:4" only), trained end to end on the LM loss over the whole dense
    model, weights frozen, before any block is compressed: six logits per group of 4 inputs, one per
    2-of-4 pattern, sampled by Gumbel-softmax at a temperature annealed linearly from tau_start to
    tau_end, trained by Adam (lr) on calib.batch_size windows per step for train_steps steps or
    `minutes`, whichever ends first; the logits start from the `init` mask (wanda, on the first
    calib.score_samples windows, or magnitude) with the strength `prior`. train_steps 0 gives the
    init mask itself."""

    pattern: str = "2:4"
    init: Literal["wanda", "magnitude"] = "wanda"
    train_steps: int = 100
    minutes: float | None = None
    lr: float = 0.05
    tau_start: float = 1.0
    tau_end: float = 0.05
    prior: float = 3.0
    method: ClassVar[str] = "maskllm"

    @property
    def needs_data(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        require(self.pattern == "2:4", f"prune method maskllm learns 2:4 masks: set pattern '2:4', got "
                f"{self.pattern!r}")
        require(self.train_steps >= 0, f"prune.train_steps must be >= 0, got {self.train_steps}")
        require(self.minutes is None or self.minutes > 0, f"prune.minutes must be > 0, got {self.minutes}")
        require(self.lr > 0, f"prune.lr must be > 0, got {self.lr}")
        require(self.tau_end > 0, f"prune.tau_end must be > 0, got {self.tau_end}")
        require(self.tau_start >= self.tau_end, f"prune.tau_start must be >= tau_end ({self.tau_end}), got "
                f"{self.tau_start}")
        require(self.prior >= 0, f"prune.prior must be >= 0, got {self.prior}")

# the six ways to keep 2 of 4 inputs, one per row: [6, 4]
PATTERNS = torch.tensor([[float(j in kept) for j in range(4)] for kept in itertools.combinations(range(4), 2)])


def prior_logits(keep: Tensor, prior: float) -> Tensor:
    """Logits [out, in/4, 6] from a 2:4 keep-mask [out, in]: prior times the overlap of each
    candidate pattern with the mask's own group (2 for the same pattern, 1 or 0 for the others)."""
    out, cols = keep.shape
    return prior * (keep.reshape(out, cols // 4, 4).float() @ PATTERNS.to(keep.device).t())


def soft_mask(logits: Tensor, tau: float) -> Tensor:
    """A Gumbel-softmax sample of the mask, [out, in/4, 4] with values in [0, 1] summing to 2 per group."""
    # -log E, E ~ Exp(1), is Gumbel(0, 1); E = 0 would give an infinite logit and a NaN mask
    gumbel = -torch.empty_like(logits).exponential_().clamp_min_(torch.finfo(logits.dtype).tiny).log_()
    y = torch.softmax((logits + gumbel) / tau, dim=-1)
    return y @ PATTERNS.to(logits.device)


def hard_mask(logits: Tensor) -> Tensor:
    """The most likely pattern of every group as a bool keep-mask [out, in]: exactly 2 of every 4."""
    out, groups, _ = logits.shape
    return PATTERNS.to(logits.device)[logits.argmax(-1)].bool().reshape(out, groups * 4)


class _SoftMasked(nn.Module):
    """Parametrization of a Linear's weight: W ⊙ M̃ with M̃ sampled afresh at every forward."""

    def __init__(self, logits: nn.Parameter, transposed: bool):
        super().__init__()
        self.logits = logits
        self.transposed = transposed  # Conv1D keeps its weight as [in, out]
        self.tau = 1.0

    def forward(self, W: Tensor) -> Tensor:
        Wm = W.t() if self.transposed else W
        masked = Wm * soft_mask(self.logits, self.tau).reshape(Wm.shape).to(W.dtype)
        return masked.t() if self.transposed else masked


def init_masks(model: nn.Module, step: MaskLlm, windows: list[Tensor], progress: bool = False) -> dict[str, Tensor]:
    """fqn -> the one-shot 2:4 keep-mask the logits start from, for every Linear `step` targets:
    Wanda's |W|·‖X‖ with input norms from the dense model on `windows`, or |W|."""
    linears = targets(model, step)
    stats = dense_pass(model, stack_batches(windows, 4), progress=progress).stats if step.init == "wanda" else {}
    masks = {}
    for fqn, m in linears.items():
        W = weight_matrix(m).detach().float()
        score = SCORERS[step.init](W, stats[fqn] if step.init == "wanda" else None)  # magnitude reads none
        masks[fqn] = select_mask(score, 0.5, (2, 4))
    return masks


def targets(model: nn.Module, step: MaskLlm) -> dict[str, nn.Module]:
    return {fqn: m for b in range(len(decoder_blocks(model))) for fqn, m in block_linears(model, b).items()
            if match(fqn, step.targets, step.ignore)}


def learn_masks_(model: nn.Module, step: MaskLlm, windows: list[Tensor], *, batch_size: int = 1,
                 score_windows: int | None = None, progress: bool = False, seed: int = 0) -> dict[str, dict]:
    """Learn a 2:4 mask for every Linear `step` targets and apply it in place; returns fqn -> metrics.

    `windows` ([1, T] token ids each) are cycled through, batch_size per optimizer step, for
    step.train_steps steps or step.minutes, whichever ends first (τ follows whichever budget is
    closer to its end). Only the logits train; every model parameter is frozen and restored to its
    requires_grad afterwards. The kept weights are bit-identical to the originals, the rest exactly 0.
    The initial mask is Wanda's (input norms on the first `score_windows`) or magnitude's.
    Metrics per Linear: sparsity, `changed` (the share of its groups whose pattern differs from the
    initial mask), the optimizer steps run and the training loss at the first and last.
    """
    if world() > 1:
        raise ValueError("prune method maskllm trains in one process: run it without torchrun")
    if not windows:
        raise ValueError("prune method maskllm needs calibration data (its masks are trained on it)")
    t0 = time.perf_counter()
    init = init_masks(model, step, windows[:score_windows], progress)
    linears = targets(model, step)
    logits = {fqn: nn.Parameter(prior_logits(init[fqn], step.prior)) for fqn in linears}
    losses = _train(model, step, linears, logits, windows, batch_size, progress, seed) if step.train_steps else []
    metrics = {}
    for fqn, m in linears.items():
        keep = hard_mask(logits[fqn].detach())
        W = weight_matrix(m).detach()
        set_weight_matrix_(m, W.masked_fill(~keep, 0))
        changed = (keep != init[fqn]).reshape(keep.shape[0], -1, 4).any(-1).float().mean().item()
        metrics[fqn] = {"sparsity": 1 - keep.float().mean().item(), "changed": changed, "steps": len(losses)}
        if losses:  # the soft-mask training loss (the same for every Linear), first and last step
            metrics[fqn].update(loss_first=losses[0], loss_last=losses[-1])
    log.info("maskllm: %d steps in %.1f s, soft-mask loss %s", len(losses), time.perf_counter() - t0,
             f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-")
    return metrics


def _train(model: nn.Module, step: MaskLlm, linears: dict[str, nn.Module], logits: dict[str, nn.Parameter],
           windows: list[Tensor], batch_size: int, progress: bool, seed: int) -> list[float]:
    """The optimizer loop over the logits; the Linears are parametrized only inside it."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    masks = {}
    with frozen(model):  # eval mode, no dropout: the noise is the mask's
        for fqn, m in linears.items():
            masks[fqn] = _SoftMasked(logits[fqn], transposed=type(m).__name__ == "Conv1D")
            parametrize.register_parametrization(m, "weight", masks[fqn], unsafe=True)
        opt = torch.optim.Adam(list(logits.values()), lr=step.lr)
        budget = step.minutes * 60 if step.minutes is not None else math.inf
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the Gumbel noise
        losses: list[float] = []
        t0 = time.perf_counter()
        bar = tqdm(range(step.train_steps), desc="maskllm", unit="step", disable=not progress)
        try:
            for t in bar:
                elapsed = time.perf_counter() - t0
                if elapsed > budget:
                    log.info("maskllm: the %.1f minute budget ended after %d steps", step.minutes, t)
                    break
                done = max(t / max(step.train_steps - 1, 1), elapsed / budget)
                tau = step.tau_start + (step.tau_end - step.tau_start) * min(done, 1.0)
                for mask in masks.values():
                    mask.tau = tau
                first = t * batch_size
                ids = torch.cat([windows[(first + j) % len(windows)] for j in range(batch_size)]).to(device)
                loss = model(ids, labels=ids, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tau=f"{tau:.2f}")
        finally:
            for m in linears.values():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            torch.random.set_rng_state(gen_state)
    return losses
