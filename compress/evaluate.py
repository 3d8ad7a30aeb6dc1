"""Perplexity on the canonical protocol (GPTQ/SparseGPT/Wanda token perplexity), and the KL divergence
of the next-token distribution from a reference model's over the same windows (llama.cpp's
`--kl-divergence`: mean and 99th percentile, and how often the top token agrees)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
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
    """Perplexity evaluation; `data` None means no evaluation. `dense` also evaluates the input model;
    `kl` then keeps its log-probabilities (on disk) and reports the compressed model's KL divergence
    from them and its top-1 agreement with it."""

    data: str | None = None
    seqlen: int = 2048
    max_tokens: int | None = None
    batch_size: int = 1
    dense: bool = True
    kl: bool = False

    def validate(self) -> None:
        require(not self.kl or self.data is not None, "eval.kl needs eval.data (the text both models are compared on)")
        require(not self.kl or self.dense, "eval.kl compares with the input model's evaluation, which eval.dense "
                "false (--no-dense-eval) skips; drop one of them")
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
    sink: Callable[[Tensor], None] | None = None,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of `tokens` [1, N]; returns (ppl, tokens scored).

    Windows hold `seqlen` tokens (capped at the model's maximum length) and the trailing partial
    window is dropped. With `bos_token_id`, every window is BOS + seqlen − 1 text tokens, all of
    which are scored; without it the first token of each window is context only. Under torchrun
    each rank scores windows rank, rank + world, ... and the NLL and token sums are all-reduced.
    `sink`, when given, is called with every batch's logits [B, seqlen, V] (see `log_probs_writer`).
    """
    limit = max_length(model)
    seqlen = min(seqlen, limit) if limit else seqlen
    step = seqlen - 1 if bos_token_id is not None else seqlen
    windows = eval_windows(tokens, seqlen, bos_token_id)[rank() :: world()]  # a rank may get none: sums zero
    device = next(model.parameters()).device
    nll, count, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(windows) * step, unit="tok", desc="perplexity", disable=not progress, leave=False)
    for b0 in range(0, len(windows), batch_size):
        x = windows[b0 : b0 + batch_size].to(device)
        logits = model(x, use_cache=False).logits
        if sink is not None:
            sink(logits)
        logits = logits[:, :-1]
        target = x[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum").item()
        count += target.numel()
        bar.update(x.shape[0] * step)
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}", tok_s=f"{count / (time.perf_counter() - t0):.0f}")
    bar.close()
    nll, count = all_reduce_sum([nll, count])
    return math.exp(nll / count), int(count)


def eval_windows(tokens: Tensor, seqlen: int, bos_token_id: int | None = None) -> Tensor:
    """The evaluation windows [n, seqlen] of `tokens` [1, N], as `perplexity` scores them: consecutive,
    non-overlapping, the trailing partial one dropped; with `bos_token_id`, BOS + seqlen − 1 text tokens."""
    step = seqlen - 1 if bos_token_id is not None else seqlen
    n_windows = tokens.shape[1] // step
    if n_windows == 0:
        raise ValueError(f"evaluation text has {tokens.shape[1]} tokens, fewer than one window of {step}")
    windows = tokens[0, : n_windows * step].reshape(n_windows, step)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows


Logits = Callable[[Tensor], Tensor]  # windows [B, T] -> logits (or log-probabilities) [B, T, V]


@dataclass(frozen=True)
class KLStats:
    """KL(P_reference || P_model) of the next-token distributions, in nats, over every scored position:
    its mean and 99th percentile; `top1` the share of positions whose most likely token is the same;
    both models' perplexities on those `tokens` positions."""

    mean: float
    p99: float
    top1: float
    ppl: float
    reference_ppl: float
    tokens: int

    def summary(self) -> dict[str, float]:
        return {"mean": self.mean, "p99": self.p99, "top1": self.top1}


@torch.no_grad()
def kl_divergence(
    model, reference, windows: Tensor, batch_size: int = 1, progress: bool = True
) -> KLStats:
    """Compare `model` with `reference` on `windows` [n, T] (`eval_windows`), scoring the positions
    `perplexity` scores (all but each window's last). Each is a causal LM (called as `m(x).logits` on
    its parameters' device) or a callable giving logits or log-probabilities [B, T, V] of a batch.

    Per position, in float32 from the two log-softmaxes: KL = Σ_v p_ref(v) (log p_ref(v) − log p(v)).
    Only one batch of both models' logits is held at a time, plus one float per position for the
    percentile. Under torchrun each rank takes windows rank, rank + world, ...; the sums are
    all-reduced and the per-position values gathered. A different vocabulary raises ValueError.
    """
    model_logits, device = _logits_fn(model)
    reference_logits, _ = _logits_fn(reference)
    windows = windows[rank() :: world()]
    sums, per_position = [0.0] * 5, []  # KL, top-1 agreements, NLL, reference NLL, positions
    bar = tqdm(total=windows.numel(), unit="tok", desc="kl-divergence", disable=not progress, leave=False)
    for x in windows.split(batch_size):
        x = x.to(device) if device is not None else x
        logits = model_logits(x)
        ref = reference_logits(x)
        if ref.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the reference gives {ref.shape[-1]} logits per token and the model {logits.shape[-1]}: "
                             "KL divergence needs the same vocabulary")
        lp = F.log_softmax(logits[:, :-1].float(), -1)
        ref_lp = F.log_softmax(ref[:, :-1].to(lp.device, torch.float32), -1)
        p = ref_lp.exp()
        kl = torch.where(p > 0, p * (ref_lp - lp), 0.0).sum(-1)  # 0 · log 0 = 0, also where p_ref is exactly 0
        target = x[:, 1:].to(lp.device).flatten()
        per_position.append(kl.flatten().cpu())
        for i, v in enumerate((kl.double().sum(), (lp.argmax(-1) == ref_lp.argmax(-1)).sum(),
                               F.nll_loss(lp.flatten(0, 1), target, reduction="sum"),
                               F.nll_loss(ref_lp.flatten(0, 1), target, reduction="sum"), target.numel())):
            sums[i] += float(v)
        bar.update(x.numel())
        bar.set_postfix(kl=f"{sums[0] / sums[4]:.4f}", top1=f"{sums[1] / sums[4]:.3f}")
    bar.close()
    kl_sum, agree, nll, ref_nll, count = all_reduce_sum(sums)
    values = _gather(torch.cat(per_position) if per_position else torch.zeros(0))
    return KLStats(mean=kl_sum / count, p99=quantile(values, 0.99), top1=agree / count, ppl=math.exp(nll / count),
                   reference_ppl=math.exp(ref_nll / count), tokens=int(count))


def _logits_fn(m) -> tuple[Logits, torch.device | None]:
    if isinstance(m, torch.nn.Module):
        device = next(m.parameters()).device
        return (lambda x: m(x.to(device), use_cache=False).logits), device
    return m, None


def quantile(values: Tensor, q: float) -> float:
    """torch.quantile's linear interpolation, without its limit of 2^24 elements."""
    v = values.float().sort().values
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(torch.lerp(v[lo], v[hi], pos - lo))


def _gather(t: Tensor) -> Tensor:
    """Every rank's 1-D CPU float tensor, concatenated (itself without a process group)."""
    if world() == 1:
        return t
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([t.numel()]))
    longest = int(max(sizes))
    padded = torch.cat([t.float(), torch.zeros(longest - t.numel())])
    parts = [torch.empty(longest) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)])


def vocab_size(model) -> int | None:
    """The size of the model's output vocabulary, from its config (None where the config has none)."""
    return getattr(model.config.get_text_config(), "vocab_size", None)


def log_probs_writer(file) -> Callable[[Tensor], None]:
    """A `perplexity` sink that appends every batch's log-softmax to the binary `file`, in float16:
    2 bytes per vocabulary entry per window position. Where rounding ties the top token with another,
    it is raised by one float16 step, so that the top token read back is the one computed."""

    def write(logits: Tensor) -> None:
        lp = F.log_softmax(logits.float(), -1)
        half, top = lp.to(torch.float16), lp.argmax(-1, keepdim=True)
        best = half.gather(-1, top)
        tied = (half == best).sum(-1, keepdim=True) > 1
        half.scatter_(-1, top, torch.where(tied, torch.nextafter(best, torch.full_like(best, math.inf)), best))
        file.write(half.cpu().numpy().tobytes())

    return write


def log_probs_reader(file, windows: Tensor) -> Logits:
    """The reference `log_probs_writer` recorded in `file` while `perplexity` ran over `windows` [n, T]
    (the same ones, in the same order), for `kl_divergence`: each call reads the next batch's
    log-probabilities, float16 [B, T, V]. Reading from the start again needs a new reader."""
    n = windows[rank() :: world()].numel()
    size = file.seek(0, os.SEEK_END)
    file.seek(0)
    vocab = size // (2 * n) if n else 0
    if n and size != 2 * n * vocab:
        raise RuntimeError(f"the recorded log-probabilities ({size} bytes) do not match {n} window positions")

    def read(x: Tensor) -> Tensor:
        want = x.numel() * vocab * 2
        data = file.read(want)
        if len(data) != want:
            raise RuntimeError("the recorded log-probabilities ended before the windows did")
        return torch.frombuffer(bytearray(data), dtype=torch.float16).view(*x.shape, vocab)

    return read


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
