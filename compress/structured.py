"""Structured removal: MLP channels, attention heads and whole decoder blocks, so the model shrinks.

A unit is everything that exists only for one channel or head: MLP channel j is row j of gate_proj
and up_proj and column j of down_proj; query head h is its rows of q_proj and its columns of
o_proj (a KV group adds its rows of k_proj and v_proj). Removing a unit drops those rows and
columns from the Linears, which become smaller nn.Linears, so the saved model has fewer
parameters and every runtime runs it faster.

After the removal the consumer (down_proj, o_proj) can be refit without training: its kept input
columns W_K are set to the least-squares optimum on calibration inputs X,
argmin ‖W X − W_K' X_K‖ = W H[:, K] H[K, K]⁻¹ with H = XᵀX (as FLAP compensates, but by a full
refit rather than a bias). Score obspa (obspa.py) does both with no data, on a proxy for H; fusion
(fusion.py) merges the removed MLP channels into the kept ones instead of dropping them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .calibrate import BlockInputs, observe, run_block_
from .config import StepConfig, require
from .fusion import Fusion, fuse_channels
from .model import decoder_blocks, layout, set_module
from .obspa import head_energy, mlp_xtx, norm_scale, remove_columns
from .stats import FisherStats, LinearStats, all_reduce_stats_

log = logging.getLogger(__name__)


# the scores each unit takes
SCORES = {"channels": ("magnitude", "wanda", "fisher", "oba", "obspa"),
          "heads": ("magnitude", "wanda", "fisher", "oba", "obspa"),
          "layers": ("influence",), "experts": ("reap", "fisher", "frequency", "random")}


@dataclass(frozen=True)
class Structured(StepConfig):
    """Remove whole units so that the model really shrinks (structured.py).

    unit: "channels" (MLP intermediate channels: gate/up rows with the matching down columns),
    "heads" (attention query heads, the same number from every KV group so GQA still holds; with
    kv_groups, whole KV groups: a key/value head with all its query heads), or "layers" (whole
    decoder blocks, the least influential by ShortGPT's 1 − cos(input, output) on the dense model), or
    "experts" (whole routed experts of every MoE block with their router rows, experts.py).
    fraction: of the units of each MLP, attention or of the decoder blocks; heads are rounded to
    whole heads per KV group, channels to a multiple of `multiple` kept.
    score: "magnitude" (the unit's squared weights), "wanda" (the output energy the unit feeds the
    next Linear on calibration inputs, activation-aware), "fisher" (½ Σ F w² over the unit's
    weights, diagonal Fisher on the dense model, as LLM-Pruner's second-order Taylor term), "oba"
    (Optimal Brain Apoptosis, oba.py: the loss change gᵀδ + ½δᵀHδ of removing the unit, with the exact
    Hessian over every block's consumer weights from Hessian-vector products on the dense model,
    oba_probes sign probes per calibration window), "obspa" (OBSPA, obspa.py: the consumer's OBS cost
    of removing the unit with no calibration data, XᵀX replaced by a proxy from the weights: the MLP's
    inputs under obspa_samples isotropic Gaussian residual inputs through the block's norm; for heads
    the energy ‖W_o,h W_v diag(γ)‖² of each head's OV circuit), or "influence" (layers only); experts
    take "reap", "fisher", "frequency" or "random" (experts.py; compensate does not apply to them).
    compensate: refit the kept input columns of the consumer (down_proj, o_proj) by least squares on
    calibration activations, so the layer's output changes least (FLAP-like, no training); with score
    obspa, the OBS update on the proxy instead (no data; channels removed one at a time, obspa.py;
    heads have none under their proxy).
    fusion (YAML `fusion: ot`, `fusion_reg`): Intra-Fusion (fusion.py), channels only: each removed
    MLP channel is merged into the kept ones most like it by an optimal-transport plan instead of
    dropped; it replaces compensation (set compensate false).
    allocation "uniform": every decoder block loses the same units, so the result is a stock
    checkpoint with its config updated (intermediate_size, num_attention_heads, num_key_value_heads,
    num_hidden_layers). "fisher" (channels): each block's count within fraction ± allocation_range,
    the same total, chosen so the summed Fisher saliency of the removed channels is least
    (allocate.py's knapsack); the per-layer shapes are then recorded in compression_config and the
    checkpoint loads through compress.load.
    """

    unit: Literal["channels", "heads", "layers", "experts"] = "channels"
    fraction: float = 0.2
    score: Literal["magnitude", "wanda", "fisher", "oba", "obspa", "influence", "reap", "frequency", "random"] = "wanda"
    compensate: bool = True
    kv_groups: bool = False
    multiple: int = 1
    damp: float = 0.01
    allocation: Literal["uniform", "fisher"] = "uniform"
    allocation_range: float = 0.15
    oba_probes: int = 16  # Hessian-vector products per window for score oba (a power of two)
    obspa_samples: int = 8192  # Gaussian residual inputs behind score obspa's proxy XᵀX of the MLP
    fusion: Fusion | None = None
    kind: ClassVar[str] = "structured"

    @property
    def needs(self) -> set[str]:
        return set()  # structured.py observes the consumers' inputs in its own pass over each block

    @property
    def needs_data(self) -> bool:
        if self.unit == "experts":
            return self.score != "random"
        return (self.unit == "layers" or self.score in ("wanda", "fisher", "oba")
                or self.compensate and self.score != "obspa" or self.allocation == "fisher")

    def validate(self) -> None:
        require(0.0 < self.fraction < 1.0, f"structured.fraction must be in (0, 1), got {self.fraction}")
        require(self.score in SCORES.get(self.unit, ()),
                 f"structured.score {self.score} does not apply to unit {self.unit} (layers take influence; channels "
                 "and heads take magnitude, wanda, fisher, oba or obspa; experts take reap, fisher, frequency or "
                 "random)")
        require(self.obspa_samples >= 1, f"structured.obspa_samples must be >= 1, got {self.obspa_samples}")
        require(self.fusion is None or self.unit == "channels",
                f"structured.fusion ot merges MLP channels: it applies to unit channels only, not {self.unit}")
        require(self.fusion is None or not self.compensate,
                "structured.fusion ot replaces compensation (a refit would read the activations of the channels "
                "before they were merged): set compensate false")
        require(self.oba_probes >= 1 and self.oba_probes & (self.oba_probes - 1) == 0,
                 f"structured.oba_probes must be a power of two (1, 2, 4, ...), got {self.oba_probes}")
        require(self.multiple >= 1, f"structured.multiple must be >= 1, got {self.multiple}")
        require(self.damp > 0, f"structured.damp must be > 0, got {self.damp}")
        require(not self.kv_groups or self.unit == "heads", "structured.kv_groups applies to unit heads only")
        require(self.allocation == "uniform" or self.unit == "channels",
                 f"structured.allocation {self.allocation} applies to unit channels only")
        require(0 < self.allocation_range <= 0.5,
                 f"structured.allocation_range must be in (0, 0.5], got {self.allocation_range}")


def units_of(model: nn.Module) -> dict:
    """Names inside a decoder block of the MLP and attention parts (the architecture table's units)."""
    return layout(model, "units", "structured removal")


def consumers(model: nn.Module, prefix: str, step: Structured) -> dict[str, nn.Module]:
    """The Linear whose input columns `step` removes, by fqn (its inputs are observed for wanda and
    compensation)."""
    name = units_of(model)["mlp_out" if step.unit == "channels" else "attn_out"]
    return {f"{prefix}.{name}": model.get_submodule(f"{prefix}.{name}")}


def unit_linears(model: nn.Module, prefix: str, step: Structured) -> dict[str, nn.Module]:
    """Every Linear of the block that loses rows or columns under `step` (the Fisher score reads them)."""
    u = units_of(model)
    names = (*u["mlp"], u["mlp_out"]) if step.unit == "channels" else (u["q"], *u["kv"], u["attn_out"])
    return {f"{prefix}.{n}": model.get_submodule(f"{prefix}.{n}") for n in names}


# ---- layers ---------------------------------------------------------------------------------


def remove_layers_(model: nn.Module, step: Structured, influence: list[float]) -> list[int]:
    """Drop the ⌊fraction · L⌉ decoder blocks of least influence; returns their old indices.
    The rest are renumbered (their KV-cache slots) and config.num_hidden_layers follows."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    k = half_up(step.fraction * n)
    if not 1 <= k < n:
        raise ValueError(f"structured layers fraction {step.fraction} removes {k} of {n} decoder blocks; "
                         "it must remove at least one and keep at least one")
    drop = sorted(sorted(range(n), key=lambda i: influence[i])[:k])
    for i in reversed(drop):
        del blocks[i]
    for i, block in enumerate(blocks):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    config = model.config
    config.num_hidden_layers = len(blocks)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    return drop


# ---- channels and heads -----------------------------------------------------------------------


def _sq(W: Tensor, fisher: FisherStats | None, score: str) -> Tensor:
    """Per-weight importance [out, in]: w² (magnitude) or ½ F w² (fisher)."""
    W = W.detach().float()
    return 0.5 * fisher.diagonal * W.square() if score == "fisher" else W.square()


def channel_scores(model: nn.Module, prefix: str, step: Structured, stats: LinearStats | None,
                   fisher: dict[str, FisherStats], oba: Tensor | None = None) -> Tensor:
    """One score per MLP channel [intermediate]; higher means keep. oba: the block's scores from
    oba.oba_scores (the predicted loss increase)."""
    if step.score == "oba":
        return _given(oba, prefix)
    linears = unit_linears(model, prefix, step)
    *producers, consumer = linears
    if step.score == "wanda":
        return linears[consumer].weight.detach().float().square().sum(0) * _xtx(stats).diagonal()
    score = sum(_sq(linears[f].weight, fisher.get(f), step.score).sum(1) for f in producers)
    return score + _sq(linears[consumer].weight, fisher.get(consumer), step.score).sum(0)


def head_scores(model: nn.Module, prefix: str, step: Structured, stats: LinearStats | None,
                fisher: dict[str, FisherStats], head_dim: int) -> Tensor:
    """One score per query head [heads]; higher means keep. wanda: the output energy the head puts
    through o_proj on calibration inputs, tr(W_h H_hh W_hᵀ)."""
    linears = unit_linears(model, prefix, step)
    q, k, v, o = linears
    W_o = linears[o].weight.detach().float()
    heads = W_o.shape[1] // head_dim
    if step.score == "wanda":
        H = _xtx(stats)
        return torch.stack([((W_o[:, s] @ H[s, s]) * W_o[:, s]).sum() for s in _slices(heads, head_dim)])
    if step.score == "obspa":  # the OBS cost under the data-free proxy (obspa.py)
        W_v = linears[v].weight.detach()
        norm = model.get_submodule(f"{prefix}.{units_of(model)['attn_norm']}")
        return head_energy(W_o, W_v, norm_scale(norm, W_v.shape[1], W_v), head_dim)
    rows = _sq(linears[q].weight, fisher.get(q), step.score).sum(1).view(heads, head_dim).sum(1)
    cols = _sq(linears[o].weight, fisher.get(o), step.score).sum(0).view(heads, head_dim).sum(1)
    return rows + cols


def kv_scores(model: nn.Module, prefix: str, step: Structured, head_score: Tensor,
              fisher: dict[str, FisherStats], head_dim: int) -> Tensor:
    """One score per KV group: its query heads' scores plus (magnitude, fisher) its k/v rows."""
    linears = unit_linears(model, prefix, step)
    q, k, v, o = linears
    groups = linears[k].weight.shape[0] // head_dim
    score = head_score.view(groups, -1).sum(1)
    if step.score not in ("wanda", "obspa"):  # theirs count what the head writes, through o_proj
        for f in (k, v):
            score = score + _sq(linears[f].weight, fisher.get(f), step.score).sum(1).view(groups, head_dim).sum(1)
    return score


def _given(oba: Tensor | None, prefix: str) -> Tensor:
    if oba is None:
        raise ValueError(f"structured score oba needs the scores of {prefix} from oba.oba_scores")
    return oba


def half_up(x: float) -> int:
    """Round half up (Python's round() goes to even: a quarter of 2 heads would remove none)."""
    return int(x + 0.5 + 1e-9)


def _slices(n: int, width: int) -> list[slice]:
    return [slice(i * width, (i + 1) * width) for i in range(n)]


def _xtx(stats: LinearStats | None) -> Tensor:
    if stats is None or stats.xtx_upper is None or stats.n_tokens == 0:
        raise ValueError("this structured score or compensation needs calibration inputs")
    return stats.xtx


def keep_count(total: int, fraction: float, multiple: int = 1) -> int:
    """Units kept of `total` when removing `fraction`, rounded to a multiple (at least one multiple)."""
    kept = total - half_up(fraction * total)
    return min(total, max(multiple, round(kept / multiple) * multiple))


@torch.no_grad()
def compensate(W: Tensor, H: Tensor, keep: Tensor, damp: float) -> Tensor:
    """The kept columns W'_K [out, |K|] minimizing ‖W X − W'_K X_K‖ over calibration inputs X with
    H = XᵀX: W H[:, K] (H[K, K] + λI)⁻¹, λ = damp · mean diag H[K, K]."""
    H = H.double()
    H_kk = H[keep][:, keep]
    H_kk = H_kk + damp * H_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=H.dtype,
                                                                                device=H.device)
    rhs = W.double() @ H[:, keep]  # [out, |K|]
    L, info = torch.linalg.cholesky_ex(H_kk)
    if info != 0:
        raise ValueError("compensation: the kept inputs' XᵀX is singular even after damping")
    return torch.cholesky_solve(rhs.t(), L).t().to(W.dtype)


def output_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """‖(W − W_new) X‖² / ‖W X‖² from H = XᵀX (W_new holds zeros at removed columns)."""
    D = (W - W_new).double()
    W, H = W.double(), H.double()
    return (((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-30)).item()


def _take_rows(linear: nn.Linear, idx: Tensor, W: Tensor | None = None) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.copy_(linear.weight[idx] if W is None else W)
    if linear.bias is not None:
        new.bias.copy_(linear.bias[idx])
    return new


def _take_cols(linear: nn.Linear, idx: Tensor, W: Tensor | None = None) -> nn.Linear:
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.copy_(linear.weight[:, idx] if W is None else W)
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


def _check_linear(m: nn.Module, fqn: str) -> None:
    if type(m) is not nn.Linear:
        raise ValueError(f"structured removal needs plain nn.Linear modules, {fqn} is {type(m).__name__}")


@torch.no_grad()
def shrink_block_(model: nn.Module, prefix: str, step: Structured, inputs: BlockInputs | None,
                  fisher: dict[str, FisherStats], n_remove: int | None = None, oba: Tensor | None = None) -> dict:
    """Remove `step.unit`s from one decoder block in place (channels: `n_remove` of them when an
    allocation planned it, else the step's fraction); returns its metrics (kept and removed units,
    parameters removed, the consumer's relative output error on calibration inputs, or on score
    obspa's proxy inputs as proxy_error). `oba`: this block's unit scores for score oba
    (oba.oba_scores on the dense model)."""
    block = model.get_submodule(prefix)
    linears = unit_linears(model, prefix, step)
    for fqn, m in linears.items():
        _check_linear(m, fqn)
    (out_fqn, out_linear), = consumers(model, prefix, step).items()
    data_free = step.score == "obspa"  # its compensation is the OBS update on the proxy, not a refit on data
    stats = None
    if step.score == "wanda" or step.compensate and not data_free:
        if inputs is None:
            raise ValueError("structured removal with wanda scores or compensation needs calibration data")
        with observe({out_fqn: out_linear}, {"xtx"}) as observed:
            run_block_(block, inputs)
        stats = observed.get(out_fqn)
        if stats is not None:
            all_reduce_stats_(stats)  # scores, refit and error read XᵀX alone
    W = out_linear.weight.detach().float()
    params_before = sum(m.weight.numel() for m in linears.values())
    W_keep = proxy = None
    if step.unit == "channels":
        n = W.shape[1]
        n_keep = keep_count(n, step.fraction, step.multiple) if n_remove is None else n - n_remove
        if data_free:
            proxy = _mlp_proxy(model, prefix, step, out_linear)
            cols, W_keep = remove_columns(W, proxy, n - n_keep, step.damp, update=step.compensate)
        else:
            cols = channel_scores(model, prefix, step, stats, fisher, oba).topk(n_keep).indices.sort().values
        removed, kept = n - n_keep, n_keep
    else:
        keep_heads, keep_groups, head_dim = _heads_to_keep(model, prefix, step, stats, fisher, oba)
        cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep_heads.tolist()])
        kept, removed = len(keep_heads), W.shape[1] // head_dim - len(keep_heads)
    if W_keep is None:
        W_keep = compensate(W, _xtx(stats), cols, step.damp) if step.compensate and not data_free else W[:, cols]
    metrics = {"kept": kept, "removed": removed}
    W_new = torch.zeros_like(W)
    W_new[:, cols] = W_keep
    if stats is not None and step.fusion is None:  # fused channels' activations are no longer the observed ones
        metrics["error"] = output_error(W, W_new, stats.xtx)
    if proxy is not None and step.fusion is None:
        metrics["proxy_error"] = output_error(W, W_new, proxy)
    names = list(linears)
    if step.unit == "channels":
        rows = [None] * len(names[:-1])
        if step.fusion is not None:
            *rows, W_keep, _ = _fuse(linears, cols, step)
            metrics["fused"] = removed
        for fqn, R in zip(names[:-1], rows):
            set_module(model, fqn, _take_rows(linears[fqn], cols, R))
    else:
        q, k, v, o = names
        set_module(model, q, _take_rows(linears[q], cols))
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_groups.tolist()])
        if len(keep_groups) * head_dim < linears[k].weight.shape[0]:
            for f in (k, v):
                set_module(model, f, _take_rows(linears[f], kv_rows))
        attn = model.get_submodule(f"{prefix}.{units_of(model)['attn']}")
        attn.num_key_value_groups = len(keep_heads) // len(keep_groups)
    set_module(model, out_fqn, _take_cols(out_linear, cols, W_keep.to(out_linear.weight.dtype)))
    params_after = sum(m.weight.numel() for m in unit_linears(model, prefix, step).values())
    metrics["params"] = params_before
    metrics["params_removed"] = params_before - params_after
    return metrics


def _mlp_proxy(model: nn.Module, prefix: str, step: Structured, consumer: nn.Linear) -> Tensor:
    """Score obspa's XᵀX of down_proj's inputs, from Gaussian residual inputs through the block's MLP norm."""
    u = units_of(model)
    norm = model.get_submodule(f"{prefix}.{u['mlp_norm']}")
    mlp = model.get_submodule(f"{prefix}.{u['mlp_out'].rsplit('.', 1)[0]}")
    return mlp_xtx(mlp, norm, consumer, step.obspa_samples)


def _fuse(linears: dict[str, nn.Module], keep: Tensor, step: Structured) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fusion.fuse_channels on the block's (gate, up, down): the kept rows and columns with the rest merged in."""
    *producers, consumer = linears
    if any(linears[f].bias is not None for f in producers):
        raise ValueError(f"structured.fusion ot merges weight rows only, but {producers[0]} or {producers[1]} has a "
                         "bias; use fusion none")
    gate, up = (linears[f].weight.detach() for f in producers)
    return fuse_channels(gate, up, linears[consumer].weight.detach(), keep.to(gate.device), step.fusion.reg)


def _heads_to_keep(model: nn.Module, prefix: str, step: Structured, stats: LinearStats | None,
                   fisher: dict[str, FisherStats], oba: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """(kept query heads, kept KV groups, head_dim). Query heads are removed evenly from every KV
    group (so each group keeps the same number and grouped-query attention still maps them); with
    kv_groups, or when every group has one head, whole groups go (oba then scores groups)."""
    attn = model.get_submodule(f"{prefix}.{units_of(model)['attn']}")
    head_dim = attn.head_dim
    by_oba = step.score == "oba"
    score = _given(oba, prefix) if by_oba else head_scores(model, prefix, step, stats, fisher, head_dim)
    heads = model.get_submodule(f"{prefix}.{units_of(model)['q']}").out_features // head_dim
    per_group = attn.num_key_value_groups
    groups = heads // per_group
    if step.kv_groups or per_group == 1:
        k = half_up(step.fraction * groups)
        if not 1 <= k < groups:
            raise ValueError(f"structured heads fraction {step.fraction} removes {k} of {groups} KV groups in "
                             f"{prefix}; it must remove at least one and keep at least one")
        group_score = score if by_oba else kv_scores(model, prefix, step, score, fisher, head_dim)
        keep_groups = group_score.topk(groups - k).indices.sort().values
        keep_heads = torch.cat([torch.arange(g * per_group, (g + 1) * per_group) for g in keep_groups.tolist()])
        return keep_heads, keep_groups, head_dim
    k = half_up(step.fraction * per_group)
    if not 1 <= k < per_group:
        raise ValueError(f"structured heads fraction {step.fraction} removes {k} of the {per_group} query heads "
                         f"of each KV group in {prefix}; it must remove at least one and keep at least one "
                         "(or set kv_groups: true)")
    by_group = score.view(groups, per_group)
    kept = by_group.topk(per_group - k, dim=1).indices.sort(dim=1).values
    keep_heads = (kept + torch.arange(groups).unsqueeze(1) * per_group).flatten()
    return keep_heads, torch.arange(groups), head_dim


def update_config_(model: nn.Module) -> None:
    """Write the blocks' shapes into the config (intermediate_size, heads) when every block has the
    same; otherwise the config keeps its sizes and the saved checkpoint records each Linear's shape
    (saving.save, compression_config)."""
    u = units_of(model)
    blocks = decoder_blocks(model)
    sizes = {b.get_submodule(u["mlp_out"]).in_features for b in blocks}
    heads = {(b.get_submodule(u["q"]).out_features, b.get_submodule(u["kv"][0]).out_features) for b in blocks}
    config = model.config
    head_dim = blocks[0].get_submodule(u["attn"]).head_dim
    config.head_dim = head_dim
    if len(sizes) == 1:
        config.intermediate_size = sizes.pop()
    if len(heads) == 1:
        q_out, kv_out = heads.pop()
        config.num_attention_heads = q_out // head_dim
        config.num_key_value_heads = kv_out // head_dim


def sync_attention_(model: nn.Module) -> None:
    """Set every attention's query-heads-per-KV-head from its own q_proj and k_proj widths (after
    per-layer shapes were loaded)."""
    for m in model.modules():
        q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        if hasattr(m, "num_key_value_groups") and q is not None and k is not None:
            m.num_key_value_groups = q.out_features // k.out_features
