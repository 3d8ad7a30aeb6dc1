"""Input statistics of a Linear, accumulated over calibration tokens.

One accumulator holds raw sums and a token count; readers normalize. Only what a step needs is
collected: XᵀX costs O(tokens · in²), the rest O(tokens · in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import world
from .model import frozen


@dataclass
class LinearStats:
    """Σ x xᵀ, Σ x², max |x| and the number of tokens seen, over the inputs x [..., in] of a Linear."""

    n_tokens: int = 0
    xtx_upper: Tensor | None = None  # [in, in] fp32, upper block triangle of Σ x xᵀ (see update)
    x_sq: Tensor | None = None  # [in] fp32 Σ x²
    x_absmax: Tensor | None = None  # [in] fp32 max |x|

    def update(self, x: Tensor, needs: set[str]) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.n_tokens += x.shape[0]
        if "x_sq" in needs:
            x_sq = x.square().sum(0)
            self.x_sq = x_sq if self.x_sq is None else self.x_sq.add_(x_sq)
        if "x_absmax" in needs:
            absmax = x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1])  # 0 rows: an unchosen MoE expert
            self.x_absmax = absmax if self.x_absmax is None else torch.maximum(self.x_absmax, absmax)
        if "xtx" in needs:
            if self.xtx_upper is None:
                self.xtx_upper = x.new_zeros(x.shape[1], x.shape[1])
            _add_xtx_upper_(self.xtx_upper, x)

    @property
    def xtx(self) -> Tensor:
        """Σ x xᵀ [in, in], symmetric."""
        if self.xtx_upper is None:
            raise ValueError("XᵀX was not collected for this Linear")
        full = self.xtx_upper.triu()
        full += self.xtx_upper.triu(1).t()  # in place: two [in, in] at a time, not three
        return full

    @property
    def hessian(self) -> Tensor:
        """H = 2 XᵀX / n, the Hessian of the layer-wise loss ‖(W−Ŵ)X‖² / n (GPTQ's convention)."""
        return self.xtx.mul_(2.0 / max(self.n_tokens, 1))

    @property
    def x_norm(self) -> Tensor:
        """‖X_j‖₂ per input column, Wanda's activation term."""
        if self.x_sq is None:
            raise ValueError("no inputs were observed for this Linear")
        return self.x_sq.sqrt()


def _add_xtx_upper_(acc: Tensor, x: Tensor) -> None:
    """acc += XᵀX on the blocks at or above the diagonal only.

    XᵀX is symmetric, so splitting the columns in k chunks and computing the k(k+1)/2 upper blocks
    does (k+1)/2k of the work of a full product (62% for k = 4) with matmuls still large enough to
    run near peak. Chunks of about 288 columns were fastest on a 2-core CPU.
    """
    d = x.shape[1]
    k = max(1, math.ceil(d / 288))
    edges = [round(i * d / k) for i in range(k + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        acc[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


@dataclass
class FisherStats:
    """Fisher information of one Linear's weight under the LM loss, from calibration sequences.

    The loss of a sequence is its mean next-token cross-entropy. Sums are kept raw; the properties
    normalize them. The diagonal is the empirical Fisher, E_s[(∂L_s/∂W)²] over sequences s. The
    Kronecker factors (K-FAC) are A = E_t[x xᵀ] over input tokens and G = Σ_t g gᵀ / sequences over
    the gradients g of the Linear's output, so that F ≈ G ⊗ A and ∂L/∂W = Σ_t g xᵀ.
    """

    n_samples: int = 0
    n_tokens: int = 0
    diag_sum: Tensor | None = None  # [out, in]
    a_sum: Tensor | None = None  # [in, in]
    g_sum: Tensor | None = None  # [out, out]
    guided_sum: Tensor | None = None  # [groups, in, in]: Σ_t s_ti x_t x_tᵀ (GuidedQuant, see _guided_hook)

    @property
    def diagonal(self) -> Tensor:
        if self.diag_sum is None:
            raise ValueError("the diagonal Fisher was not collected for this Linear")
        return self.diag_sum / max(self.n_samples, 1)

    @property
    def kfac(self) -> tuple[Tensor, Tensor]:
        """(A [in, in], G [out, out])."""
        if self.a_sum is None or self.g_sum is None:
            raise ValueError("the Kronecker-factored Fisher was not collected for this Linear")
        return self.a_sum / max(self.n_tokens, 1), self.g_sum / max(self.n_samples, 1)

    @property
    def guided(self) -> Tensor:
        """GuidedQuant's Hessians [groups, in, in], one per group of output channels (output_groups)."""
        if self.guided_sum is None:
            raise ValueError("the gradient-weighted (GuidedQuant) Hessians were not collected for this Linear")
        return self.guided_sum / max(self.n_samples, 1)


# How each field of a statistics object combines across ranks: a sum over samples, or a maximum.
REDUCE: dict[type, dict[str, str]] = {
    LinearStats: {"n_tokens": "sum", "xtx_upper": "sum", "x_sq": "sum", "x_absmax": "max"},
    FisherStats: {"n_samples": "sum", "n_tokens": "sum", "diag_sum": "sum", "a_sum": "sum", "g_sum": "sum",
                  "guided_sum": "sum"},
}


def all_reduce_stats_(objects: LinearStats | FisherStats | Iterable[LinearStats | FisherStats]) -> None:
    """Combine statistics objects across ranks, in place, as REDUCE says for each field; an object
    that appears several times (Linears sharing their input) is reduced once.

    Raises RuntimeError when the ranks disagree on which fields were collected (a rank saw no
    inputs), since the collectives would then not line up.
    """
    if world() == 1:
        return
    if isinstance(objects, LinearStats | FisherStats):
        objects = [objects]
    unique = list({id(o): o for o in objects}.values())
    for obj in unique:
        ops = REDUCE[type(obj)]
        counts = [f for f in ops if isinstance(getattr(obj, f), int)]
        tensors = [f for f in ops if f not in counts]
        present = [getattr(obj, f) is not None for f in tensors]
        head = torch.tensor([getattr(obj, f) for f in counts] + present, dtype=torch.int64)
        dist.all_reduce(head)  # one collective for the counts (summed) and the presence flags
        if any(int(v) not in (0, world()) for v in head[len(counts) :]):
            raise RuntimeError(f"ranks disagree on which statistics were collected: {tensors} present "
                               f"on {head[len(counts):].tolist()} of {world()} ranks")
        for f, v in zip(counts, head[: len(counts)].tolist()):
            setattr(obj, f, v)
        for f, p in zip(tensors, present):
            if p:
                t = getattr(obj, f).contiguous()  # Conv1D's Fisher diagonal is a transposed view
                dist.all_reduce(t, op=dist.ReduceOp.MAX if ops[f] == "max" else dist.ReduceOp.SUM)
                setattr(obj, f, t)


def collect_fisher(
    model: torch.nn.Module,
    batches: list[Tensor],
    linears: dict[str, torch.nn.Module],
    *,
    diagonal: bool = True,
    kfac: Iterable[str] = (),
    guided: Iterable[str] = (),
    groups: int = 4,
    progress: bool = False,
) -> dict[str, FisherStats]:
    """Fisher information of the `linears` (fqn -> module) from one forward and backward per sequence:
    the diagonal of each, the Kronecker factors of those named in `kfac` (in² + out² floats each),
    and GuidedQuant's gradient-weighted Hessians of those named in `guided` (groups · in² floats each).

    Every row of every batch [B, T] is its own sequence. Only the targets' weights take gradients
    (everything else is frozen for the pass and restored after), and each gradient is squared into
    its accumulator and freed by a post-accumulate hook, so memory stays near the model, one
    sequence's activations and one fp32 buffer per target. Under torchrun, `batches` are this
    rank's share and the sums are combined over ranks before they are returned.
    """
    from tqdm.auto import tqdm

    out = {fqn: FisherStats() for fqn in linears}
    if len({id(m.weight) for m in linears.values()}) != len(linears):
        raise ValueError("two target Linears share one weight tensor")
    with frozen(model):
        handles = []
        kfac, guided = set(kfac), set(guided)
        for fqn, m in linears.items():
            m.weight.requires_grad_(True)
            if diagonal:
                handles.append(m.weight.register_post_accumulate_grad_hook(partial(_square_grad_, out[fqn], m)))
            if fqn in kfac:
                handles.append(m.register_forward_hook(partial(_kfac_hook, out[fqn])))
            if fqn in guided:
                handles.append(m.register_forward_hook(partial(_guided_hook, out[fqn], groups)))
        sequences = [row.unsqueeze(0) for ids in batches for row in ids]
        device = next(model.parameters()).device
        try:
            for ids in tqdm(sequences, desc="fisher", unit="seq", disable=not progress):
                ids = ids.to(device)
                loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
                for fqn, m in linears.items():
                    out[fqn].n_samples += 1
                    out[fqn].n_tokens += ids.shape[1]
                    m.weight.grad = None
        finally:
            for h in handles:
                h.remove()
    all_reduce_stats_(out.values())
    return out


def _square_grad_(acc: FisherStats, module: torch.nn.Module, param: Tensor) -> None:
    g = param.grad.float().square()
    g = g.t() if type(module).__name__ == "Conv1D" else g  # [out, in], as model.weight_matrix
    acc.diag_sum = g if acc.diag_sum is None else acc.diag_sum.add_(g)
    param.grad = None


def _kfac_hook(acc: FisherStats, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
    acc.a_sum = x.t() @ x if acc.a_sum is None else acc.a_sum.addmm_(x.t(), x)

    def on_grad(g: Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).float()
        acc.g_sum = g.t() @ g if acc.g_sum is None else acc.g_sum.addmm_(g.t(), g)

    output.register_hook(on_grad)


def output_groups(out: int, groups: int, device=None) -> tuple[Tensor, ...]:
    """The output channels [0, out) split into `groups` contiguous runs (sizes differ by at most one)."""
    return torch.arange(out, device=device).tensor_split(min(groups, out))


def _guided_hook(acc: FisherStats, groups: int, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
    """GuidedQuant's statistics (Kim et al. 2025, Eq. 7): for each group i of output channels,
    H_i += Σ_t s_ti x_t x_tᵀ with s_ti the mean over the group's channels j of (∂ℓ/∂z_tj)², z the
    Linear's output. The input is held until the gradient of the output arrives in the backward."""
    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]

    def on_grad(g: Tensor) -> None:
        g2 = g.detach().reshape(-1, g.shape[-1]).float().square()  # [tokens, out]
        H = torch.stack([(x * g2[:, rows].mean(1, keepdim=True)).t() @ x
                         for rows in output_groups(g2.shape[1], groups, g2.device)])
        acc.guided_sum = H if acc.guided_sum is None else acc.guided_sum.add_(H)

    output.register_hook(on_grad)
