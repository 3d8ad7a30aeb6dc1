"""The formats GPUs serve in 2026 (FP8, FP8 in blocks, NVFP4, MXFP4, INT8 per channel): their
grids, round to nearest, and GPTQ's projection onto them. A leaf next to grid.py (the integer
group grids of W2-W8): the same convention, a weight ŵ = v · s, with v a value the element type
holds and s the scale of the weight's group, but here the element type is a small float (or
int8) and the scale has a type of its own.

    format     element  group             stored scale                       as compressed-tensors
    fp8        E4M3     one per row       fp32                               float-quantized
    fp8-block  E4M3     128 x 128 block   fp32                               float-quantized
    nvfp4      E2M1     16 inputs         E4M3, over a per-tensor fp32 one   nvfp4-pack-quantized
    mxfp4      E2M1     32 inputs         E8M0 (a power of two)              mxfp4-pack-quantized
    int8       int8     one per row       fp32                               int-quantized

NVFP4's scale is two-level, as compressed-tensors defines it: a per-tensor global g = 448·6 /
max|W| puts the groups' scales in E4M3's range; a group stores e = E4M3(g · max|w_group| / 6) and
its weights are v · e / g. Linears that vLLM runs as one GEMM (FUSED: q/k/v, gate/up) share one g,
the smallest of theirs, as vLLM needs and llm-compressor writes. MXFP4 stores 127 + log2 s in a byte (OCP MX spec v1.0).

Every scale is chosen so that the stored model is exactly the optimized one: the effective scale
is computed from what is stored, before any value is rounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .pack import expand_groups

E4M3_MAX, E2M1_MAX, INT8_MAX = 448.0, 6.0, 127.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BLOCK = 128  # fp8-block's square
# sibling Linears that vLLM loads into one fused GEMM (qkv_proj, gate_up_proj, an expert's w13): one
# format and, in NVFP4, one global scale for each group
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass(frozen=True)
class Format:
    name: str
    element: str  # "e4m3", "e2m1" or "int8"
    group: int  # inputs sharing a scale; -1: the whole row
    block_rows: int  # rows sharing a scale (fp8-block: 128)
    scale: str  # the stored scale's type: "fp32", "e4m3" or "e8m0"
    global_scale: bool  # NVFP4's per-tensor fp32 scale over the group scales

    @property
    def element_bits(self) -> int:
        return 4 if self.element == "e2m1" else 8

    def groups(self, out: int, cols: int) -> tuple[int, int]:
        """The shape of the scale tensor of a [out, cols] weight."""
        g = cols if self.group == -1 else self.group
        return -(-out // self.block_rows), -(-cols // g)

    def avg_bits(self, out: int, cols: int) -> float:
        """Stored bits per weight: elements, scales and the global scale."""
        r, c = self.groups(out, cols)
        scale_bits = {"fp32": 32, "e4m3": 8, "e8m0": 8}[self.scale]
        return self.element_bits + (r * c * scale_bits + 32 * self.global_scale) / (out * cols)


FORMATS = {f.name: f for f in (
    Format("fp8", "e4m3", -1, 1, "fp32", False),
    Format("fp8-block", "e4m3", BLOCK, BLOCK, "fp32", False),
    Format("nvfp4", "e2m1", 16, 1, "e4m3", True),
    Format("mxfp4", "e2m1", 32, 1, "e8m0", False),
    Format("int8", "int8", -1, 1, "fp32", False),
)}


def round_e4m3(x: Tensor) -> Tensor:
    """Nearest E4M3 value (ties to even), saturating at ±448; fp32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_e2m1(x: Tensor) -> Tensor:
    """Nearest E2M1 value, saturating at ±6; fp32. The grid steps by 0.5 below 2, by 1 up to 4, by 2 up
    to 6, so each range rounds on its own step (ties to the even multiple)."""
    a = x.float().abs().clamp_(max=E2M1_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return q.copysign_(x.float())


def round_element(x: Tensor, element: str) -> Tensor:
    if element == "e4m3":
        return round_e4m3(x)
    if element == "e2m1":
        return round_e2m1(x)
    return torch.round(x.float()).clamp_(-INT8_MAX, INT8_MAX)


def element_max(element: str) -> float:
    return {"e4m3": E4M3_MAX, "e2m1": E2M1_MAX, "int8": INT8_MAX}[element]


def global_scale(W: Tensor) -> Tensor:
    """NVFP4's per-tensor scale g = 448 · 6 / max|W| (1 for an all-zero W), fp32 [1]."""
    amax = W.abs().amax().float()
    return torch.where(amax > 0, E4M3_MAX * E2M1_MAX / amax, torch.ones_like(amax)).reshape(1)


def fused_groups(fqns: Iterable[str]) -> list[list[str]]:
    """fqns grouped as vLLM fuses them (FUSED names under one parent module); any other Linear alone."""
    groups: dict = {}
    for fqn in fqns:
        parent, _, leaf = fqn.rpartition(".")
        key = next(((parent, i) for i, names in enumerate(FUSED) if leaf in names), fqn)
        groups.setdefault(key, []).append(fqn)
    return list(groups.values())


def shared_global_scales(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVFP4's global scale of each weight, shared within its fused group: the group's smallest (set
    by its largest max|W|), so that no member's scales leave E4M3's range."""
    scales = {}
    for group in fused_groups(weights):
        g = torch.stack([global_scale(weights[f]) for f in group]).amin(0)
        scales.update(dict.fromkeys(group, g))
    return scales


def stored_scale(amax: Tensor, fmt: Format, g: Tensor | None = None) -> Tensor:
    """The stored scale of groups whose largest |w| is amax: fp32 values an fp32, E4M3 or E8M0 tensor
    holds (for NVFP4, e = E4M3(g · amax / 6), to be divided by g)."""
    top = element_max(fmt.element)
    if fmt.scale == "fp32":
        return torch.where(amax > 0, amax / top, torch.ones_like(amax))
    if fmt.scale == "e4m3":
        e = round_e4m3(g * amax / top)
        return torch.where(e > 0, e, torch.full_like(e, 2.0**-9))  # E4M3's smallest: a zero group stays 0
    # E8M0: the smallest power of two that keeps the group's largest weight on the grid (no clipping)
    exp = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / top)).clamp(-127, 127)
    return torch.exp2(exp)


def fit_scales(W: Tensor, fmt: Format, g: Tensor | None = None) -> Tensor:
    """The stored scales of W's groups for its weights: min-max (stored_scale), except that NVFP4's E4M3
    scale takes, per group, whichever of the min-max scale and the next E4M3 value up rounds the group
    with the least squared error (no data needed). RTN NVFP4 on SmolLM2 (fused global scales), min-max
    (llm-compressor's rule) against this: WikiText ppl 26.62 / 26.16, mean KL 0.2372 / 0.2363, p99 KL
    1.50 / 1.42, held-out SOTU 2001-2021 ppl 30.34 / 30.33. Also trying one code down (least squared
    error, but it clips) was worse: 25.03 against 24.86 on the first 16k WikiText tokens."""
    stored = stored_scale(group_absmax(W, fmt), fmt, g)
    if fmt.element != "e2m1":
        return stored
    if fmt.scale != "e4m3":  # E8M0: the smallest power of two that keeps the largest weight on the grid
        return stored
    # the min-max E4M3 scale or the next code up (which never clips): a smaller one clips the largest
    # weights, and that cost perplexity on SmolLM2 though it lowered the squared error
    codes = stored.to(torch.float8_e4m3fn).view(torch.uint8).int()
    candidates = [(codes + d).clamp(1, 126).to(torch.uint8).view(torch.float8_e4m3fn).float() for d in (0, 1)]
    out, cols = W.shape
    Wg = W.float().reshape(out, -1, fmt.group)
    errors = []
    for c in candidates:
        s = effective_scale(c, fmt, g)[..., None]
        errors.append((Wg - round_e2m1(Wg / s) * s).square().sum(-1))
    best = torch.stack(errors).argmin(0)
    return torch.gather(torch.stack(candidates), 0, best[None])[0]


def effective_scale(stored: Tensor, fmt: Format, g: Tensor | None = None) -> Tensor:
    return stored / g if fmt.global_scale else stored


def group_absmax(W: Tensor, fmt: Format) -> Tensor:
    """max |w| over each scale group of W [out, in] -> [row blocks, column groups]."""
    out, cols = W.shape
    rows, n = fmt.groups(out, cols)
    g = cols if fmt.group == -1 else fmt.group
    A = torch.nn.functional.pad(W.abs().float(), (0, n * g - cols, 0, rows * fmt.block_rows - out))
    return A.reshape(rows, fmt.block_rows, n, g).amax(dim=(1, 3))


def expand_scale(s: Tensor, fmt: Format, out: int, cols: int) -> Tensor:
    """[row blocks, column groups] -> [out, cols] (a broadcast view where one scale spans the row)."""
    g = cols if fmt.group == -1 else fmt.group
    if fmt.block_rows == 1 and g >= cols:
        return s[:, :1].expand(out, cols)
    wide = expand_groups(s, g, cols)
    return wide if fmt.block_rows == 1 else wide.repeat_interleave(fmt.block_rows, dim=0)[:out]


@dataclass
class FloatQuantized:
    """One weight matrix on a Format: ŵ = values · scale (scale per group, expanded)."""

    values: Tensor  # fp32 [out, in], each one the element type holds (E4M3, E2M1 or int8 values)
    stored: Tensor  # fp32 [row blocks, column groups], the stored scales' values
    global_scale: Tensor | None  # fp32 [1] (NVFP4)
    fmt: Format
    damp: float | None = None
    act: str | None = None  # the activation format the Linear is stored with (ACTS)
    act_scale: Tensor | None = None  # its static scale, where it has one

    @property
    def scale(self) -> Tensor:
        return effective_scale(self.stored, self.fmt, self.global_scale)

    @property
    def weight(self) -> Tensor:
        out, cols = self.values.shape
        return self.values * expand_scale(self.scale, self.fmt, out, cols)

    @property
    def avg_bits(self) -> float:
        return self.fmt.avg_bits(*self.values.shape)


def rtn_float(W: Tensor, fmt: Format, g: Tensor | None = None) -> FloatQuantized:
    """Round to nearest: each group's scale (fit_scales: min-max, or for FP4 the best of its neighbours),
    then each weight to the nearest value of the element type. `g`: NVFP4's global scale when it is
    shared (shared_global_scales); W's own by default."""
    W = W.float()
    g = (global_scale(W) if g is None else g.float()) if fmt.global_scale else None
    stored = fit_scales(W, fmt, g)
    s = expand_scale(effective_scale(stored, fmt, g), fmt, *W.shape)
    return FloatQuantized(round_element(W / s, fmt.element), stored, g, fmt)


def gptq_float(W: Tensor, H: Tensor, fmt: Format, *, keep: Tensor | None = None, act_order: bool = False,
               block_size: int = 128, damp: float = 0.01, g: Tensor | None = None) -> FloatQuantized:
    """GPTQ onto a Format (gptq.py's sweep with this projection): columns left to right (or by
    decreasing H_jj with act_order), each rounded on its group's scale, the error pushed onto the later
    columns through H⁻¹. A group's scale comes from the weights as updated when the sweep reaches its
    first column (from the original weights with act_order, or when a group spans the row); NVFP4's
    global scale `g` (shared_global_scales), else the original weights' own, as compressed-tensors'
    observers take it."""
    from .obs import obs_sweep

    W = W.float() if keep is None else W.float() * keep
    out, cols = W.shape
    gs = cols if fmt.group == -1 else fmt.group
    g = (global_scale(W) if g is None else g.float()) if fmt.global_scale else None
    static = act_order or gs >= cols
    if not static and block_size % gs:
        raise ValueError(f"block_size {block_size} must be a multiple of the {fmt.name} group {gs}")
    stored = fit_scales(W, fmt, g)  # replaced group by group unless static
    s_col = expand_scale(effective_scale(stored, fmt, g), fmt, out, cols).t().contiguous()  # [in, out]
    values_t = torch.empty(cols, out, device=W.device)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    columns = order.tolist() if order is not None else range(cols)

    def project(pos: int, q: Tensor, rest: Tensor, keep_rest: Tensor | None) -> Tensor:
        col = columns[pos]
        if not static and col % gs == 0:  # a group starts: its scale from the weights as they are now
            Wg = rest[: min(gs, cols - col)].t()
            Wg = Wg if keep_rest is None else Wg * keep_rest[: Wg.shape[1]].t()
            sg = fit_scales(Wg, fmt, g)  # [row blocks, 1]
            stored[:, col // gs] = sg[:, 0]
            s_col[col : col + Wg.shape[1]] = expand_scale(effective_scale(sg, fmt, g), fmt, out, 1)[:, 0]
        s = s_col[col]
        v = round_element(q / s, fmt.element)
        values_t[col] = v
        return v * s

    sweep = obs_sweep(W, H, keep=keep, project=project, perm=order, block_size=block_size, damp=damp)
    return FloatQuantized(values_t.t().contiguous(), stored, g, fmt, sweep.damp)


# Activation formats, simulated exactly as compressed-tensors defines them (and vLLM runs them): the
# input of a Linear is rounded on its own grid and dequantized at once (fake quant).
#   fp8-token   E4M3, one scale per token, max|x| / 448 at runtime       (FP8_DYNAMIC)
#   fp8-group   E4M3, one scale per token and 128 inputs, at runtime    (FP8_BLOCK)
#   fp8-tensor  E4M3, one scale for the tensor, from calibration        (FP8, static)
#   int8-token  int8, one scale per token, max|x| / 127.5 at runtime    (INT8 W8A8; codes -128 … 127)
#   nvfp4       E2M1 in groups of 16, E4M3 scales at runtime over a global one from calibration
ACTS = ("fp8-token", "fp8-group", "fp8-tensor", "int8-token", "nvfp4")
STATIC_ACTS = ("fp8-tensor", "nvfp4")  # these need max |x| over the calibration inputs
ACT_FORMAT = {"fp8-token": "fp8", "fp8-group": "fp8", "fp8-tensor": "fp8", "int8-token": "int8", "nvfp4": "nvfp4"}


def act_static_scale(x_absmax: Tensor, act: str) -> Tensor:
    """The stored static scale of an activation format from the calibration inputs' max |x| (fp32 [1]):
    fp8-tensor's input_scale, or nvfp4's input_global_scale."""
    amax = x_absmax.float().amax().reshape(1)
    return global_scale(amax) if act == "nvfp4" else stored_scale(amax, FORMATS["fp8"])


def fake_quant_act(x: Tensor, act: str, static: Tensor | None = None) -> Tensor:
    """x [..., in] as a Linear with `act` activations sees it (dequantized, x's dtype)."""
    X = x.reshape(-1, x.shape[-1]).float()
    if act == "fp8-tensor":
        Xq = round_e4m3(X / static) * static
    elif act == "nvfp4":
        Xq = rtn_groups(X, FORMATS["nvfp4"], static)
    elif act == "int8-token":  # compressed-tensors' symmetric int8: the 255 steps of -128 … 127 span ±max|x|
        s = X.abs().amax(1, keepdim=True) / 127.5
        s = torch.where(s > 0, s, torch.full_like(s, torch.finfo(torch.float32).eps))
        Xq = torch.round(X / s).clamp_(-128, 127) * s
    else:
        fmt = FORMATS["fp8"] if act == "fp8-token" else Format("fp8-group", "e4m3", BLOCK, 1, "fp32", False)
        Xq = rtn_groups(X, fmt, None)
    return Xq.to(x.dtype).reshape(x.shape)


def rtn_groups(X: Tensor, fmt: Format, g: Tensor | None) -> Tensor:
    """X [rows, in] rounded to nearest on fmt's groups of each row, dequantized; `g` a given global
    scale (else none, or X's own for a format that has one)."""
    if fmt.global_scale and g is None:
        g = global_scale(X)
    stored = stored_scale(group_absmax(X, fmt), fmt, g)
    s = expand_scale(effective_scale(stored, fmt, g), fmt, *X.shape)
    return round_element(X / s, fmt.element) * s
