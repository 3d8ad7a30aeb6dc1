"""GuidedQuant (Kim et al., ICML 2025): a Hessian-driven quantizer run per group of output channels.

The layer-wise objective ‖(W − Ŵ)X‖² weighs every output channel alike. GuidedQuant weighs output
channel j's error on token t by the end loss's sensitivity to it, (∂ℓ/∂z_tj)², which turns the
objective into a block-diagonal Fisher: one input-space matrix per output channel,

    Σ_j (w_j − ŵ_j)ᵀ F_j (w_j − ŵ_j),      F_j = Σ_t (∂ℓ/∂z_tj)² x_t x_tᵀ

so the cross-weight interactions within a channel are kept (unlike a diagonal Fisher). To stay
affordable the output channels are split into a few contiguous groups and F_j is averaged within
each (the paper's Eq. 7): group i gets H_i = Σ_t s_ti x_t x_tᵀ with s_ti the mean of
(∂ℓ/∂z_tj)² over its channels (stats.collect_fisher, `guided`). GPTQ, OWQ or LeanQuant then run
on each group's rows with that group's H_i in place of XᵀX.

Where this differs from the paper's code: the gradients and the inputs x_t both come from one
forward and backward pass over the dense model (on the first calib.score_samples windows), before
the streaming pass; the paper weighs the inputs of the partly quantized model, as they stream, by
gradients taken on the dense model. Holding per-token gradients for every Linear until its block
streams would need its own bookkeeping in the streaming pass; this keeps the Hessians in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .grid import Quantized
from .nonuniform import LutQuantized
from .outliers import OutlierQuantized
from .stats import output_groups


def solve(W: Tensor, H: Tensor, quantize: Callable[[Tensor, Tensor, Tensor | None], Quantized | LutQuantized],
          keep: Tensor | None = None, guided: Tensor | None = None) -> Quantized | OutlierQuantized | LutQuantized:
    """`quantize`(W, H, keep) of W [out, in] on the layer Hessian H [in, in], or, given `guided`
    [groups, in, in], of each group of output channels on its own gradient-weighted Hessian."""
    if guided is None:
        return quantize(W, H, keep)
    parts = [quantize(W[rows], guided[i], None if keep is None else keep[rows])
             for i, rows in enumerate(output_groups(W.shape[0], guided.shape[0], W.device))]
    if isinstance(parts[0], LutQuantized):
        return LutQuantized(torch.cat([p.codes for p in parts]), torch.cat([p.lut for p in parts]),
                            parts[0].bits, parts[0].group_size)
    return Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                     torch.cat([p.zero for p in parts]), parts[0].spec)


def guided_objective(W: Tensor, W_hat: Tensor, guided: Tensor) -> float:
    """Σ_i tr((W − Ŵ)_i H_i (W − Ŵ)_iᵀ) over the output-channel groups i: the loss GuidedQuant minimizes."""
    D = (W - W_hat).double()
    return sum(float(((D[rows] @ guided[i].double()) * D[rows]).sum())
               for i, rows in enumerate(output_groups(W.shape[0], guided.shape[0], W.device)))
