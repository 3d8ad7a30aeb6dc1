"""The protocol every compressed Linear follows (layers.FORMATS lists the classes).

Each class owns its serialization: its compression_config entry, its checkpoint tensors, how to
rebuild itself from them, its dense weight. Save, load, convert and inspect (saving.py, loading.py)
and the stream's resume call these and nothing class-specific, so a new format touches layers.py
(and kernels/) only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

NO_STOCK = "stock transformers and vLLM cannot load them; compress.load can, and `compress convert --dense` "


class CompressedLinear(nn.Module):
    """The protocol of a compressed Linear (in_features, out_features and bias as nn.Linear has them).

    kind            its key in FORMATS (claims() finds the class of a compression_config entry)
    pack_quantized  its tensors are compressed-tensors pack-quantized and listed in quantization_config:
                    stock runtimes load them (the others are recorded in compression_config only)
    sparse_bitmask  its tensors are compressed-tensors sparse-bitmask, listed in quantization_config's
                    sparsity_config
    stock_note      "{n} ...": what stock runtimes make of n such modules (saving.stock_notes), or None
    """

    kind: ClassVar[str]
    pack_quantized: ClassVar[bool] = False
    sparse_bitmask: ClassVar[bool] = False
    stock_note: ClassVar[str | None] = None

    @classmethod
    def claims(cls, entry: dict) -> bool:
        """Whether a compression_config entry (or a layout) is one of this class."""
        return entry.get("type") == cls.kind

    def entry(self) -> dict:
        """Its config.json compression_config entry."""
        raise NotImplementedError

    def layout(self) -> dict:
        """entry() and what the tensors say besides (in, out, bias): enough to rebuild an empty one."""
        return {**self.entry(), "in": self.in_features, "out": self.out_features, "bias": self.bias is not None}

    @classmethod
    def empty(cls, layout: dict, dtype: torch.dtype = torch.float32, device=None) -> CompressedLinear:
        """A module of that layout, its tensors unset (on device "meta": the stream's resume)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Its checkpoint tensors, module-local names, bias aside (saved as the model's other tensors)."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], entry: dict, fqn: str, like: nn.Module | None = None
                     ) -> CompressedLinear:
        """The module from its checkpoint tensors (tensors(), with the bias when it has one) and entry;
        `like` is the module it replaces in the model config.json builds. ValueError naming fqn when
        the tensors do not fit."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """W [out, in] as forward multiplies by (`convert --dense` writes it)."""
        raise NotImplementedError


def fill_(m: nn.Module, t: dict[str, Tensor], fqn: str, what: str) -> nn.Module:
    """Copy stored tensors into m's own tensors of the same names (bias included); ValueError naming
    fqn for an unexpected, a missing or a misshapen one."""
    own = {**dict(m.named_buffers(recurse=False)), **dict(m.named_parameters(recurse=False))}
    if set(t) - set(own):
        raise ValueError(f"{fqn}: unexpected tensors {sorted(set(t) - set(own))}")
    if set(own) - set(t):
        raise ValueError(f"{fqn}: the {what} layer lacks tensors {sorted(set(own) - set(t))}")
    with torch.no_grad():
        for name, value in t.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{fqn}: tensor {name} {tuple(value.shape)} does not fit a {what} layer")
            own[name].copy_(value)
    return m


def shape_tensor(m: nn.Module) -> Tensor:
    return torch.tensor([m.out_features, m.in_features], dtype=torch.int64)


def to_linear(m: CompressedLinear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear holding m's dense weight and its bias."""
    W, b = m.dense_weight(), m.bias
    dtype = dtype or (b.dtype if b is not None else torch.float32)
    lin = nn.Linear(m.in_features, m.out_features, bias=b is not None, dtype=dtype, device=W.device)
    with torch.no_grad():
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    return lin
