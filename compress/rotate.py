"""Rotation of the residual stream, folded into the weights (QuaRot, Ashkboos et al. 2024, §4).

A decoder-only transformer reads its residual stream h only through RMSNorms followed by Linears
(and the output head), and writes into it only through Linears (o_proj, down_proj) and the input
embeddings. RMSNorm commutes with an orthogonal Q once its weight g is folded into the Linears
that read it, since ‖hQ‖ = ‖h‖:

    norm(hQ) = hQ / rms(h)        reader:  W ← W·diag(g)·Q      writer: W ← Qᵀ·W, b ← Qᵀ·b
    embeddings: E ← E·Q           head:    W ← W·diag(g_final)·Q      norms: g ← 1

so the rotated model computes the same function (up to rounding), while every hidden state and
every weight column that touches it is spread over all channels: what 4-bit activations need.
The head is untied from the input embeddings first (they are rotated differently).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .config import StepConfig
from .model import decoder_blocks, final_norm, layout, set_weight_matrix_, weight_matrix


@dataclass(frozen=True)
class Rotate(StepConfig):
    """Rotate the residual stream by a random orthogonal Q folded into the weights (QuaRot, Ashkboos
    et al. 2024; rotate.py): the model computes the same function, but its hidden states and the
    weights that read them have their outliers spread over all channels, which is what 4-bit
    activations need. The norms' weights are folded into the Linears that read them first.

    method: "hadamard" (a randomized Hadamard matrix H·diag(±1)/√n; for a width n = 2^k·m with m odd,
    the Kronecker product of a random orthogonal m×m and the 2^k Hadamard) or "random" (a random
    orthogonal matrix from the QR of a Gaussian one). seed: for the signs and the random factor.
    """

    method: Literal["hadamard", "random"] = "hadamard"
    seed: int = 0
    kind: ClassVar[str] = "rotate"


def hadamard(n: int) -> Tensor:
    """The Sylvester Hadamard matrix [n, n] of ±1 (n a power of two), float64."""
    if n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    return H


def haar_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A uniformly random orthogonal [n, n] float64: QR of a Gaussian, column signs fixed by R's diagonal."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).contiguous()


def random_orthogonal(n: int, method: str = "hadamard", seed: int = 0) -> Tensor:
    """A random orthogonal Q [n, n] float64 (Q Qᵀ = I).

    "hadamard": diag(±1)·(R_m ⊗ H_p)/√p with n = p·m, p the largest power of two dividing n and R_m a
    random orthogonal m×m (R_1 = 1: a plain randomized Hadamard, QuaRot's choice when n is a power of
    two). "random": a uniformly random orthogonal matrix.
    """
    g = torch.Generator().manual_seed(seed)
    if method == "random":
        return haar_orthogonal(n, g)
    p = n & -n
    Q = hadamard(p) / math.sqrt(p)
    if n > p:
        Q = torch.kron(haar_orthogonal(n // p, g), Q)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * Q


def rotation_layout(model: nn.Module):
    """((norm, the Linears reading its output), ...), (the Linears writing into the residual): the
    architecture table's rotation points inside a decoder block."""
    return layout(model, "rotation", "rotate (the norms must commute with a rotation as they are)")


@torch.no_grad()
def rotate_(model: nn.Module, step: Rotate) -> dict:
    """Fold the norms' weights into the Linears that read them, then rotate the residual stream by
    Q = random_orthogonal(hidden, step.method, step.seed), in place. Returns the report's metrics."""
    t0 = time.perf_counter()
    reads, writes = rotation_layout(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:  # the head is rotated differently: untie it
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    Q = random_orthogonal(embed.weight.shape[1], step.method, step.seed)
    _right_(embed, Q)
    for block in decoder_blocks(model):
        for norm_name, readers in reads:
            norm = block.get_submodule(norm_name)
            for name in readers:
                _read_(block.get_submodule(name), norm.weight, Q)
            norm.weight.fill_(1.0)
        for name in writes:
            _write_(block.get_submodule(name), Q)
    final = final_norm(model)
    if head is not None:
        _read_(head, final.weight, Q)
    final.weight.fill_(1.0)
    return {"hidden": int(Q.shape[0]), "seconds": time.perf_counter() - t0}


def _read_(linear: nn.Module, g: Tensor, Q: Tensor) -> None:
    """A Linear reading norm(h)·diag(g): W ← W·diag(g)·Q (rotated inputs, norm weight folded in)."""
    W = weight_matrix(linear).double()
    set_weight_matrix_(linear, (W * g.double().to(W.device)) @ Q.to(W.device))


def _write_(linear: nn.Module, Q: Tensor) -> None:
    """A Linear adding into the residual: its outputs (rows and bias) rotated, W ← Qᵀ·W."""
    W = weight_matrix(linear).double()
    Qd = Q.to(W.device)
    set_weight_matrix_(linear, Qd.t() @ W)
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_((linear.bias.double() @ Qd).to(linear.bias.dtype))


def _right_(embed: nn.Module, Q: Tensor) -> None:
    """Embedding rows live in the residual stream: E ← E·Q."""
    E = embed.weight
    E.copy_((E.double() @ Q.to(E.device)).to(E.dtype))
