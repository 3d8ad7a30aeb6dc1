"""Matmul kernels for compressed Linears, installed as `compress.kernels`.

Each op is defined by a pure-torch reference (reference.py) that runs on any device; fast GPU
kernels match it and are dispatched here when they exist for the tensors at hand.
"""

from __future__ import annotations

from .reference import quant_linear

__all__ = ["quant_linear"]
