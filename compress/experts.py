"""Expert pruning: whole routed experts leave every MoE block (structured unit "experts").

Each MoE block loses the same number of experts, ⌊fraction · E⌉, those of least importance:

    reap       REAP (Lasby et al. 2025, "REAP the Experts", Eq. 9): the mean, over the calibration
               tokens routed to expert j (j among the token's top-k), of g_j(x) · ‖f_j(x)‖₂, with
               f_j(x) the expert's output and g_j(x) the weight the block multiplies it by (after the
               router's top-k renormalization where the model has one: Mixtral, Qwen3-MoE's
               norm_topk_prob). The authors' code defaults to the softmax probability before it.
    fisher     ½ Σ F w² over the expert's three Linears, the diagonal Fisher of the dense model (the
               whole-model pass that channels' fisher score reads); an expert no token reached has none: 0.
    frequency  how many calibration tokens the router sends the expert.
    random     a seeded draw (calib.seed and the block index): the baseline the others must beat.

reap and frequency run the block once more over its calibration inputs (like channels' wanda
score), so they see the earlier blocks already pruned, and they stream. Removing expert j drops its
Linears and router row j (and any per-expert router tensor, a bias or e_score_correction); the rest
are renumbered 0..E'-1 in order, config's expert count follows, and top-k where fewer experts are
left than it picks. The count is one per model, so every MoE block loses the same number, and the
saved checkpoint is a stock one: `from_pretrained` builds E' fused experts and fills them.

Group-limited routing (DeepSeek-V3, GLM-4-MoE with n_group > 1): the router splits experts 0..E-1
into n_group contiguous groups, scores each group by the sum of its 2 best experts and lets a token
choose its top-k within its topk_group best groups. Each group loses the same number of experts,
its least important ones, so the groups, n_group and topk_group keep their trained meaning (a
global choice renumbered into new contiguous groups would silently move experts between groups,
and dropping the grouping would route differently from what the model learned). A fraction that
removes no multiple of n_group, or leaves a group fewer than 2 experts (its score) or fewer than
top-k / topk_group (the experts a token may reach), is refused before any work.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .calibrate import BlockInputs, run_block_
from .distributed import all_reduce_sum
from .model import architecture, decoder_blocks, set_module, supporting
from .moe import Experts, UnfusedExperts
from .stats import FisherStats
from .structured import Structured, half_up


def layout_of(model: nn.Module) -> Experts:
    """Where the model's routed experts and routers are; refuses a model without them."""
    layout = architecture(model).experts
    if layout is None:
        raise ValueError(f"structured unit experts needs a mixture-of-experts model; model_type "
                         f"{model.config.model_type!r} has no routed experts "
                         f"(supported: {', '.join(supporting('experts'))})")
    return layout


def kept_count(total: int, fraction: float, groups: int = 1, per_group: int = 1) -> int:
    """Experts left of `total` when removing `fraction` (half up); at least one goes and one stays, and
    with `groups` router groups as many go from each, leaving each at least `per_group` (group_rule)."""
    k = half_up(fraction * total)
    if not 1 <= k < total:
        raise ValueError(f"structured experts fraction {fraction} removes {k} of {total} experts per MoE block; "
                         "it must remove at least one and keep at least one")
    if groups > 1 and (k % groups or (total - k) // groups < per_group):
        raise ValueError(f"structured experts fraction {fraction} removes {k} of {total} experts per MoE block, "
                         f"whose router has {groups} expert groups (n_group): it must remove a multiple of {groups} "
                         f"and keep at least {per_group} per group")
    return total - k


def group_rule(model: nn.Module) -> tuple[int, int]:
    """(expert groups of the router, the fewest experts a group may keep): 2 for the group's score (the
    sum of its 2 best), and top-k / topk_group so that a token still reaches top-k experts. (1, 1)
    without group-limited routing."""
    config, layout = model.config, layout_of(model)
    groups = (getattr(config, layout.groups, None) or 1) if layout.groups else 1
    if groups == 1:
        return 1, 1
    return groups, max(2, math.ceil(config.num_experts_per_tok / config.topk_group))


def check_experts(model: nn.Module, step: Structured) -> None:
    """Refuse, before any work, a model without experts and a fraction that rounds to none or all, or
    that the router's expert groups cannot share."""
    kept_count(getattr(model.config, layout_of(model).count), step.fraction, *group_rule(model))


def expert_linears(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """fqn -> every Linear of the routed experts of one block (none in a dense block); the Fisher
    score reads them."""
    layout = layout_of(model)
    experts = _experts(model.get_submodule(prefix), layout)
    if experts is None:
        return {}
    return {f"{prefix}.{layout.path}.{e}.{n}": getattr(experts[e], n) for e in range(experts.num_experts)
            for n in layout.names}


def _experts(block: nn.Module, layout: Experts) -> UnfusedExperts | None:
    parent, _, name = layout.path.rpartition(".")
    found = getattr(block.get_submodule(parent) if parent else block, name, None)
    if found is not None and not isinstance(found, UnfusedExperts):
        raise ValueError(f"structured unit experts needs per-expert Linears ({type(found).__name__} is fused); "
                         "load the model with compress (load_model, load) or call compress.model.unfuse_experts")
    return found


@torch.no_grad()
def routed_scores(block: nn.Module, experts: UnfusedExperts, inputs: BlockInputs) -> tuple[Tensor, Tensor]:
    """(REAP score, routed token count) per expert [E], from one run of the block over its inputs."""
    n = experts.num_experts
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    routing = {}

    def routed(module, args, kwargs):  # the top-k choice the experts are called with
        _, routing["index"], routing["weights"] = (*args, *kwargs.values())[:3]

    def expert_out(e: int, module, args, out):
        slot, token = torch.where(routing["index"].t() == e)  # UnfusedExperts' own order of the rows
        if len(token) != out.shape[0]:
            raise RuntimeError(f"expert {e} ran on {out.shape[0]} rows, its router sent it {len(token)}")
        g = routing["weights"][token, slot].double()
        sums[e] += (g * out.double().norm(dim=-1)).sum().item()
        counts[e] += len(token)

    handles = [experts.register_forward_pre_hook(routed, with_kwargs=True)]
    handles += [experts[e].register_forward_hook(partial(expert_out, e)) for e in range(n)]
    try:
        run_block_(block, inputs)
    finally:
        for h in handles:
            h.remove()
    both = torch.tensor(all_reduce_sum([*sums.tolist(), *counts.tolist()]), dtype=torch.float64)  # torchrun's shares
    sums, counts = both[:n], both[n:]
    return sums / counts.clamp_min(1), counts


def fisher_scores(prefix: str, layout: Experts, n: int, experts: UnfusedExperts,
                  fisher: dict[str, FisherStats]) -> Tensor:
    """½ Σ F w² per expert over its three Linears."""
    score = torch.zeros(n, dtype=torch.float64)
    for e in range(n):
        for name in layout.names:
            f = fisher.get(f"{prefix}.{layout.path}.{e}.{name}")
            if f is None:
                raise ValueError(f"structured experts score fisher needs the Fisher of {prefix}.{layout.path}.{e}")
            if f.diag_sum is not None:  # None: no token reached the expert in the Fisher pass
                score[e] += (0.5 * f.diagonal * getattr(experts[e], name).weight.detach().float().square()).sum().item()
    return score


def renumber_(table: dict, experts_fqn: str, keep: list[int]) -> None:
    """Move the entries of kept experts' modules (keys fqn or (step, fqn)) to their new numbers
    and drop the removed ones', so later steps find theirs (the Fisher, an allocation's plan)."""
    new_of = {old: new for new, old in enumerate(keep)}
    head = experts_fqn + "."
    moved = {}
    for key in [k for k in table if (k[1] if isinstance(k, tuple) else k).startswith(head)]:
        fqn = key[1] if isinstance(key, tuple) else key
        e, _, rest = fqn[len(head):].partition(".")
        value = table.pop(key)
        if int(e) in new_of:
            new = f"{head}{new_of[int(e)]}" + (f".{rest}" if rest else "")
            moved[(key[0], new) if isinstance(key, tuple) else new] = value
    table.update(moved)


@torch.no_grad()
def remove_experts_(model: nn.Module, prefix: str, step: Structured, inputs: BlockInputs | None,
                    fisher: dict[str, FisherStats], seed: int, tables: tuple[dict, ...] = ()) -> dict:
    """Remove the least important experts of one decoder block in place; returns its metrics ({}
    for a block without routed experts). `fisher` and `tables` are renumbered with the experts."""
    layout = layout_of(model)
    block = model.get_submodule(prefix)
    experts = _experts(block, layout)
    if experts is None:
        return {}  # a dense block of an MoE model (Qwen-MoE's mlp_only_layers)
    n = experts.num_experts
    if step.score in ("reap", "frequency"):
        if inputs is None:
            raise ValueError(f"structured experts score {step.score} needs calibration data")
        reap, counts = routed_scores(block, experts, inputs)
        score = reap if step.score == "reap" else counts
    elif step.score == "fisher":
        score = fisher_scores(prefix, layout, n, experts, fisher)
    else:
        index = int(prefix.rpartition(".")[2])
        score = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 + index), dtype=torch.float64)
    groups, per_group = group_rule(model)
    kept = kept_count(n, step.fraction, groups, per_group) // groups  # per group: the same number from each
    best = score.view(groups, n // groups).topk(kept, dim=1).indices  # group g holds experts g·n/G.. (router's view)
    keep = sorted((best + torch.arange(groups)[:, None] * (n // groups)).flatten().tolist())
    params = sum(m.weight.numel() for m in expert_linears(model, prefix).values())
    set_module(block, layout.path, UnfusedExperts([experts[e] for e in keep], experts.act_fn))
    _cut_router_(block, layout, n, keep, model.config.num_experts_per_tok)
    experts_fqn = f"{prefix}.{layout.path}"
    for table in (fisher, *tables):
        renumber_(table, experts_fqn, keep)
    left = sum(m.weight.numel() for m in expert_linears(model, prefix).values())
    return {"kept": len(keep), "removed": n - len(keep), "params": params, "params_removed": params - left,
            "removed_experts": [e for e in range(n) if e not in keep],
            "scores": [float(f"{s:.4g}") for s in score.tolist()]}


def _cut_router_(block: nn.Module, layout: Experts, n: int, keep: list[int], top_k: int) -> None:
    """Keep the router's rows of the kept experts (every router tensor with one entry per expert)."""
    router = block.get_submodule(layout.routers[0])  # the first router picks the experts
    idx = torch.tensor(keep)
    for name, p in list(router.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == n:
            setattr(router, name, nn.Parameter(p.detach()[idx.to(p.device)].clone(), requires_grad=p.requires_grad))
    for name, b in list(router.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == n:
            setattr(router, name, b[idx.to(b.device)].clone())
    if router.weight.shape[0] != len(keep):
        raise ValueError(f"{layout.routers[0]} has {router.weight.shape[0]} rows, not one per expert")
    moe = block.get_submodule(layout.path.rpartition(".")[0]) if "." in layout.path else block
    for m in (router, moe):
        for attr, value in (("num_experts", len(keep)), ("out_features", len(keep)), ("top_k", min(top_k, len(keep)))):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, value)


def update_expert_config_(model: nn.Module, steps: list[Structured]) -> None:
    """The config's expert count (and top-k where fewer are left) after the expert steps, in order.
    From the config, not the blocks: a resumed streamed run holds its finished blocks on meta."""
    if not steps:
        return
    config, count = model.config, layout_of(model).count  # Mixtral's num_experts: num_local_experts via attribute_map
    for step in steps:
        setattr(config, count, kept_count(getattr(config, count), step.fraction, *group_rule(model)))
        config.num_experts_per_tok = min(config.num_experts_per_tok, getattr(config, count))
    for attr, value in (("num_experts", getattr(config, count)), ("num_experts_per_tok", config.num_experts_per_tok)):
        if isinstance(getattr(model, attr, None), int):  # MixtralForCausalLM's copies (its auxiliary loss)
            setattr(model, attr, value)


def expert_counts(model: nn.Module) -> list[int]:
    """The number of routed experts of every MoE block."""
    layout = layout_of(model)
    return [e.num_experts for b in decoder_blocks(model) if (e := _experts(b, layout)) is not None]
