"""Perplexity on the canonical protocol (GPTQ/SparseGPT/Wanda token perplexity)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .config import Config, require
from .distributed import all_reduce_sum, rank, world
from .model import max_length


@dataclass(frozen=True)
class Eval(Config):
    """Perplexity evaluation; `data` None means no evaluation. `dense` also evaluates the input model."""

    data: str | None = None
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1
    dense: bool = True

    def validate(self) -> None:
        require(self.seqlen >= 2, f"eval.seqlen must be >= 2, got {self.seqlen}")
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        require(
            self.max_tokens is None or self.max_tokens >= 2,
            f"eval.max_tokens must be >= 2, got {self.max_tokens}",
        )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front when it encodes by itself (Llama-2, Gemma)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x").input_ids[:1] == [bos]


@torch.no_grad()
def perplexity(
    model,
    tokens: Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of `tokens` [1, N]; returns (ppl, tokens scored).

    Windows hold `seqlen` tokens (capped at the model's maximum length) and the trailing partial
    window is dropped. With `bos_token_id`, every window is BOS + seqlen − 1 text tokens, all of
    which are scored; without it the first token of each window is context only. Under torchrun
    each rank scores windows rank, rank + world, ... and the NLL and token sums are all-reduced.
    """
    limit = max_length(model)
    seqlen = min(seqlen, limit) if limit else seqlen
    step = seqlen - 1 if bos_token_id is not None else seqlen
    n_windows = tokens.shape[1] // step
    if n_windows == 0:
        raise ValueError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {step}")
    windows = tokens[0, : n_windows * step].reshape(n_windows, step)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_token_id), windows], dim=1)
    windows = windows[rank() :: world()]  # a rank may get none: its sums are zero
    device = next(model.parameters()).device
    nll, count, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(windows) * step, unit="tok", desc="perplexity", disable=not progress, leave=False)
    for b0 in range(0, len(windows), batch_size):
        x = windows[b0 : b0 + batch_size].to(device)
        logits = model(x, use_cache=False).logits[:, :-1]
        target = x[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").item()
        count += target.numel()
        bar.update(x.shape[0] * step)
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}", tok_s=f"{count / (time.perf_counter() - t0):.0f}")
    bar.close()
    nll, count = all_reduce_sum([nll, count])
    return math.exp(nll / count), int(count)


@torch.no_grad()
def heldout_loss(model, batches: list[Tensor]) -> float:
    """Mean next-token cross-entropy over every token of `batches` ([B, T] each)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count
