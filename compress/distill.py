"""Recovery by distillation: train the compressed model toward the dense teacher's next-token
distributions, kept as a few sampled token ids per position so that the teacher runs once.

Sparse targets (Random Sampling KD; Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs"). At every position the teacher's softmax p (temperature 1) is
sampled K times with replacement; the draws are merged into (id, count) pairs. Their empirical
distribution p̂ = count / K is an unbiased estimate of p (E[p̂] = p), so the student's loss

    L = −Σ_v p̂_v log q_v = −(1/K) Σ_k log q_{id_k}        (q: the student's softmax, full vocabulary)

has the gradient of the forward KL(p ‖ q) in expectation, unlike a top-k cut of p, which drops the
tail and is biased. With the proposal equal to the teacher's own softmax the importance weights
p/proposal are all 1, which leaves the normalized counts above; we use no other proposal.

Training (distill_): the Linears of the decoder blocks that the step targets, nothing else (norms,
embeddings and the head stay as they are). "kept": their weights train, with the gradient at zero
weights masked and the zeros written back after every optimizer step, so a pruning pattern (2:4)
holds exactly. "lora": each gets rank-r adapters B·A (B starts at zero) beside the frozen weight;
at the end W + (alpha/r)·B·A is merged and the zeros re-applied (the merge of LoRAPrune, Zhang et al.
2024; its LoRA-gradient pruning criterion is not built here: the mask is the earlier steps').
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import StepConfig, require
from .data import Calib
from .model import block_linears, decoder_blocks, frozen, match, set_weight_matrix_, weight_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distill(StepConfig):
    """Recover what the earlier steps lost by training the compressed model toward the dense
    teacher's next-token distributions (distill.py), on calibration text, never the evaluation's.

    The teacher is the model before any step: before the streaming pass it runs once over `samples`
    windows of `seqlen` tokens of calib.source (drawn with `seed`, apart from the calibration
    windows) and keeps, per position, `samples_per_token` token ids drawn with replacement from its
    softmax, as ids and counts (Random Sampling KD, Anshumann et al. 2025). After the pass the
    targeted Linears train on the cross-entropy against those samples' empirical distribution, in
    batches of `batch_size` windows with AdamW at `lr` (10 warmup steps, then a cosine to 0 over the
    budget), until `steps` optimizer steps or `minutes` of wall time for the whole step (teacher pass
    included), whichever comes first. train "kept": the weights themselves, zeros (pruned positions) held at zero;
    "lora": rank-`lora_rank` adapters (scale lora_alpha / lora_rank), merged into the weights at the
    end and the zeros re-applied (LoRAPrune's merge, Zhang et al. 2024). precision "bfloat16": the
    training forward and backward run under bfloat16 autocast (weights, gradients' accumulation and
    AdamW's states stay float32); the teacher always runs in the model's own dtype.
    """

    steps: int = 1000
    minutes: float = 30.0
    lr: float = 1e-4
    train: Literal["kept", "lora"] = "kept"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    samples_per_token: int = 64
    samples: int = 64
    seqlen: int = 512
    batch_size: int = 2
    seed: int = 1
    precision: Literal["float32", "bfloat16"] = "float32"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    kind: ClassVar[str] = "distill"

    @property
    def needs_data(self) -> bool:
        return True

    def calib(self, source: str) -> Calib:
        """Where the distillation windows come from: the recipe's calibration source, this step's count."""
        return Calib(source=source, samples=self.samples, seqlen=self.seqlen, seed=self.seed)

    def validate(self) -> None:
        require(self.steps >= 1, f"distill.steps must be >= 1, got {self.steps}")
        require(self.minutes > 0, f"distill.minutes must be > 0, got {self.minutes}")
        require(0 < self.lr < 1, f"distill.lr must be in (0, 1), got {self.lr}")
        require(self.lora_rank >= 1, f"distill.lora_rank must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha > 0, f"distill.lora_alpha must be > 0, got {self.lora_alpha}")
        require(1 <= self.samples_per_token <= 255,  # counts are stored as uint8
                 f"distill.samples_per_token must be in [1, 255], got {self.samples_per_token}")
        require(self.samples >= 1, f"distill.samples must be >= 1, got {self.samples}")
        require(self.seqlen >= 2, f"distill.seqlen must be >= 2, got {self.seqlen}")
        require(self.batch_size >= 1, f"distill.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SparseTargets:
    """The teacher's sampled tokens for every window: ids int32 [n, T, K] and counts uint8 [n, T, K];
    at each position the counts sum to K and slots past the distinct ids have count 0."""

    ids: Tensor
    counts: Tensor
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.counts[0, 0].sum())


def sample_targets(logits: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K draws with replacement from softmax(logits) at every position, merged into distinct ids
    with their counts. logits [..., V] -> (ids int32 [..., K], counts uint8 [..., K])."""
    shape = logits.shape[:-1]
    p = logits.reshape(-1, logits.shape[-1]).float().softmax(-1)
    draws = torch.multinomial(p, k, replacement=True, generator=generator).sort(-1).values  # [P, K]
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.cumsum(-1) - 1  # the slot of each draw's distinct id
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    return ids.to(torch.int32).reshape(*shape, k), counts.to(torch.uint8).reshape(*shape, k)


def kd_loss(logits: Tensor, ids: Tensor, counts: Tensor) -> Tensor:
    """Mean over positions of −Σ (count/K) log q at the sampled ids; logits [B, T, V], ids/counts [B, T, K]."""
    logq = logits.float().log_softmax(-1).gather(-1, ids.long())
    w = counts.float()
    return -(logq * w).sum(-1).div(w.sum(-1)).mean()


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: list[Tensor], step: Distill, *, progress: bool = True) -> SparseTargets:
    """Run the (dense) model once over `windows` ([1, T] each) and keep step.samples_per_token
    sampled ids per position; the draws are seeded by step.seed."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(step.seed)
    x = torch.cat(windows)
    ids, counts = [], []
    for b0 in tqdm(range(0, len(x), step.batch_size), desc="teacher", unit="batch", disable=not progress):
        logits = model(x[b0 : b0 + step.batch_size].to(device), use_cache=False).logits.cpu()
        i, c = sample_targets(logits, step.samples_per_token, gen)
        ids.append(i)
        counts.append(c)
    return SparseTargets(torch.cat(ids), torch.cat(counts), time.perf_counter() - t0)


def distill_linears(model: nn.Module, step: Distill) -> dict[str, nn.Module]:
    """The block Linears the step trains; a module without a float weight (quantized codes) is refused."""
    linears = {fqn: m for b in range(len(decoder_blocks(model))) for fqn, m in block_linears(model, b).items()
               if match(fqn, step.targets, step.ignore)}
    if not linears:
        raise ValueError("distill.targets selects no Linear in the decoder blocks")
    for fqn, m in linears.items():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise ValueError(f"distill cannot train {fqn} ({type(m).__name__}): it has no float weight")
    return linears


def distill_(model: nn.Module, windows: list[Tensor], targets: SparseTargets, step: Distill, *,
             progress: bool = True) -> dict:
    """Train the model in place toward `targets` within step.steps and step.minutes (the teacher's
    targets.seconds counted in); returns the figures for report.json."""
    t0 = time.perf_counter()
    budget = step.minutes * 60 - targets.seconds
    linears = distill_linears(model, step)
    with frozen(model):  # eval mode (no dropout), as the teacher's targets were computed
        masks = {fqn: m.weight.detach() != 0 for fqn, m in linears.items()}  # in the weight's own layout
        hooks, params, lora = [], [], {}
        for fqn, m in linears.items():
            if step.train == "kept":
                m.weight.requires_grad_(True)
                hooks.append(m.weight.register_hook(lambda g, mask=masks[fqn]: g * mask))
                params.append(m.weight)
            else:
                lora[fqn] = _add_lora(m, step, hooks)
                params += lora[fqn]
        opt = torch.optim.AdamW(params, lr=step.lr, weight_decay=0.0)
        device = next(model.parameters()).device
        x = torch.cat(windows)
        gen = torch.Generator().manual_seed(step.seed)
        order: list[int] = []
        losses: list[float] = []
        bar = tqdm(total=step.steps, desc="distill", unit="step", disable=not progress)
        try:
            with torch.enable_grad():
                slowest = 0.0
                for i in range(step.steps):
                    elapsed = time.perf_counter() - t0
                    # stop before a step that could end past the budget: steps vary, so the slowest so far
                    if budget <= 0 or elapsed + slowest > budget:
                        break
                    t_step = time.perf_counter()
                    # a 10-step warmup, then a cosine to 0 over whichever budget runs out first
                    frac = max(i / step.steps, elapsed / budget)
                    for group in opt.param_groups:
                        group["lr"] = step.lr * min(1.0, (i + 1) / 10) * 0.5 * (1 + math.cos(math.pi * frac))
                    if len(order) < step.batch_size:
                        order += torch.randperm(len(x), generator=gen).tolist()
                    idx, order = order[: step.batch_size], order[step.batch_size :]
                    with torch.autocast(device.type, torch.bfloat16, enabled=step.precision == "bfloat16"):
                        logits = model(x[idx].to(device), use_cache=False).logits
                    loss = kd_loss(logits, targets.ids[idx].to(device), targets.counts[idx].to(device))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step.train == "kept":
                        _rezero_(linears, masks)
                    losses.append(loss.item())
                    slowest = max(slowest, time.perf_counter() - t_step)
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", min=f"{(time.perf_counter() - t0) / 60:.1f}")
        finally:
            bar.close()
            for h in hooks:
                h.remove()
            if lora:
                _merge_lora_(linears, lora, masks, step)
    seconds = time.perf_counter() - t0
    head, tail = losses[:10], losses[-10:]
    log.info("distill: %d steps in %.0f s, loss %.4f -> %.4f", len(losses), seconds,
             sum(head) / max(len(head), 1), sum(tail) / max(len(tail), 1))
    return {"train": step.train, "steps": len(losses), "seconds": seconds, "teacher_seconds": targets.seconds,
            "total_seconds": seconds + targets.seconds, "tokens": len(losses) * step.batch_size * x.shape[1],
            "windows": len(x), "samples_per_token": step.samples_per_token,
            "first_loss": sum(head) / len(head) if head else None, "last_loss": sum(tail) / len(tail) if tail else None}


@torch.no_grad()
def _rezero_(linears: dict[str, nn.Module], masks: dict[str, Tensor]) -> None:
    # the masked gradient leaves Adam's update at zero there already; this also undoes float drift
    for fqn, m in linears.items():
        m.weight.mul_(masks[fqn])


def _add_lora(m: nn.Module, step: Distill, hooks: list) -> list[Tensor]:
    """Adapters A [r, in], B [out, r] (B zero: training starts from the compressed model), added to the
    module's output by a forward hook."""
    out_f, in_f = weight_matrix(m).shape
    A = torch.empty(step.lora_rank, in_f, device=m.weight.device).uniform_(-1, 1).div_(math.sqrt(in_f))
    B = torch.zeros(out_f, step.lora_rank, device=m.weight.device)
    A.requires_grad_(True)
    B.requires_grad_(True)
    scale = step.lora_alpha / step.lora_rank
    hooks.append(m.register_forward_hook(
        lambda mod, args, out: out + (scale * (args[0].to(A.dtype) @ A.t()) @ B.t()).to(out.dtype)))
    return [A, B]


@torch.no_grad()
def _merge_lora_(linears: dict, lora: dict, masks: dict, step: Distill) -> None:
    scale = step.lora_alpha / step.lora_rank
    for fqn, (A, B) in lora.items():
        m = linears[fqn]
        W = weight_matrix(m).float() + scale * (B @ A)
        set_weight_matrix_(m, W)
        m.weight.mul_(masks[fqn])
