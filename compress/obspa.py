"""OBSPA: Optimal-Brain structured pruning with no calibration data (structured score "obspa").

Wang et al. 2024, "Structurally Prune Anything: Any Architecture, Any Framework, Any Time" (SPA),
prune groups of coupled channels by an Optimal Brain (OBS/OBC) criterion and introduce OBSPA, which
needs neither fine-tuning nor calibration data. Only the paper's abstract was at hand here, not
its proxy for the data, so what follows is our own data-free reading of it for decoder blocks:

Groups. MLP channel j is row j of gate_proj and up_proj and column j of down_proj; a query head is
its q_proj rows and o_proj columns, with its KV group's k/v rows when a whole group goes (GQA as
structured.py removes heads). A group changes the block's output only through its consumer
(down_proj, o_proj), so the cost of removing it is the consumer's layer-wise OBS cost: the least
‖ΔW X‖² = tr(ΔW H ΔWᵀ) over updates of the kept inputs' weights, H = XᵀX of the consumer's inputs.

The data-free proxy for H (the one modelling choice): the block's residual input is isotropic noise
z ~ N(0, I) passed through the block's own norm, so the norm's weights γ (what most shapes a normed
hidden state) count, and nothing else is assumed about the data.
- MLP: H = E[a aᵀ] over the down_proj inputs a = act(gate x) ⊙ (up x), x = norm(z), estimated from
  `samples` draws of z (a seeded Monte Carlo: SwiGLU's second moments have no closed form). It is
  not diagonal: channels whose gate/up rows point alike give correlated activations, so OBS sees
  that such a channel is redundant and moves its down column onto its look-alikes. The identity
  proxy would see none of that: its OBS cost is ‖down[:, j]‖² alone (the gate and up rows would
  not count) and its OBS update is zero.
- heads: attention mixes tokens with weights no weight-only rule predicts, so the proxy keeps no
  cross-head terms: H is block-diagonal, head h's block W_v,g diag(γ²) W_v,gᵀ (its KV group's values
  of x = γ ⊙ z). A head's cost is then ‖W_o,h W_v,g diag(γ)‖²_F, the energy of its OV circuit, and
  the OBS update of the other heads' columns is zero: heads get no compensation.

Selection. With compensation, channels are removed one at a time, the cheapest by the OBS cost
‖W[:, j]‖² / [H⁻¹]_jj, and after each the other columns take the OBS update and H⁻¹ loses the row
and column (as OBC and ZipLM remove structures), so two redundant channels are not both removed
as each other's backup. Without it, the cost is OBD's ‖W[:, j]‖² H_jj (the output energy the
channel adds), all at once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def mlp_xtx(mlp: nn.Module, norm: nn.Module, consumer: nn.Linear, samples: int, seed: int = 0,
            chunk: int = 1024) -> Tensor:
    """The proxy H [n, n] (float64, per sample) of `consumer`'s inputs when the block's residual input
    is z ~ N(0, I) [samples, hidden] through `norm` and `mlp` (the module whose forward calls consumer)."""
    W = consumer.weight
    g = torch.Generator(device=W.device).manual_seed(seed)
    seen: list[Tensor] = []
    handle = consumer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    H = torch.zeros(consumer.in_features, consumer.in_features, dtype=torch.float64, device=W.device)
    try:
        for start in range(0, samples, chunk):
            z = torch.randn(min(chunk, samples - start), consumer.out_features, generator=g, device=W.device)
            mlp(norm(z.to(W.dtype)))
            a = seen.pop().float().reshape(-1, consumer.in_features)
            H += (a.t() @ a).double()
    finally:
        handle.remove()
    return H / samples


@torch.no_grad()
def remove_columns(W: Tensor, H: Tensor, n_remove: int, damp: float, update: bool) -> tuple[Tensor, Tensor]:
    """Remove `n_remove` input columns of W [out, n] under H [n, n]; returns (kept indices [n − n_remove],
    sorted; the kept columns [out, n − n_remove] in W's dtype). update: greedy OBS, one column at a
    time with the OBS update of the rest (H damped by damp · mean diag); else OBD, no update."""
    n = W.shape[1]
    if not update:
        cost = W.double().square().sum(0) * H.diagonal()
        keep = cost.topk(n - n_remove).indices.sort().values
        return keep, W[:, keep]
    Wd = W.double().clone()
    H = H.double()
    H = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(n, dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise ValueError("obspa: the proxy XᵀX is singular even after damping; raise structured.damp")
    Hinv = torch.cholesky_inverse(L)
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    for _ in range(n_remove):
        d = Hinv.diagonal()
        q = int(torch.where(alive, Wd.square().sum(0) / d, torch.inf).argmin())
        row = Hinv[q] / d[q]
        Wd.addr_(Wd[:, q].clone(), row, alpha=-1)  # OBS: the kept columns absorb what column q did under H
        Hinv.addr_(Hinv[:, q].clone(), row, alpha=-1)  # H⁻¹ of the columns left (row and column q become zero)
        alive[q] = False
    keep = alive.nonzero().squeeze(1)
    return keep, Wd[:, keep].to(W.dtype)


@torch.no_grad()
def head_energy(W_o: Tensor, W_v: Tensor, gamma: Tensor, head_dim: int) -> Tensor:
    """One cost per query head [heads]: ‖W_o,h W_v,g diag(γ)‖²_F, the OBS cost of removing head h under
    the block-diagonal proxy (g: the KV group head h reads, grouped-query attention's h // (heads / groups))."""
    heads, groups = W_o.shape[1] // head_dim, W_v.shape[0] // head_dim
    V = (W_v.float() * gamma.float()).view(groups, head_dim, -1)  # [G, d, in]
    W_oh = W_o.float().view(W_o.shape[0], heads, head_dim)  # [out, H, d]
    per_group = heads // groups
    return torch.stack([(W_oh[:, h] @ V[h // per_group]).square().sum() for h in range(heads)])


@torch.no_grad()
def norm_scale(norm: nn.Module, hidden: int, like: Tensor) -> Tensor:
    """γ of an RMS norm as it acts, whatever its parametrization (w or 1 + w): norm(1) [hidden]."""
    return norm(torch.ones(1, hidden, dtype=like.dtype, device=like.device)).float().squeeze(0)
