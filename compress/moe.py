"""Mixture-of-experts blocks, as plain Linears.

Transformers 5 keeps the routed experts of an MoE block (Qwen2/3-MoE, Mixtral, GLM-4-MoE,
DeepSeek-V3) in one module of fused 3D parameters, gate_up_proj [E, 2I, H] (gate rows first, then
up) and down_proj [E, H, I], that loops over the experts the router picked. No Linear is in there,
so nothing could compress it. `unfuse_experts_` replaces that module, in place, by
`UnfusedExperts`: per expert, three nn.Linear under the names the per-expert checkpoints use
(`experts.{e}.gate_proj`, or `w1` for Mixtral), computing what the fused module computed. So every
method sees each expert's Linears, with the statistics of the tokens routed to that expert only (or
of all tokens, when a Coverage asks: calib.all_experts, calib.min_expert_tokens), and saved
checkpoints hold the per-expert tensors that stock transformers merges back into its fused
parameters when it loads.

The router is not touched here (model.block_linears leaves it out of compression). Shared experts
(Qwen2-MoE's shared_expert, GLM-4-MoE's and DeepSeek-V3's shared_experts) are plain MLPs of Linears
already, compressed like any MLP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .distributed import all_reduce_sum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Experts:
    """Where an architecture row's MoE blocks keep their routed experts (model.ARCHITECTURES)."""

    path: str = "mlp.experts"  # the fused experts module, from a decoder block
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down as checkpoints name them
    # the routing modules, from a decoder block: never compressed (model.block_linears leaves them out)
    routers: tuple[str, ...] = ("mlp.gate",)
    count: str = "num_experts"  # the config attribute holding the number of routed experts per block
    # the config attribute holding the number of expert groups of group-limited routing (DeepSeek-V3's
    # n_group: a token picks experts within its router's topk_group best groups), None without it
    groups: str | None = None


class Expert(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), its Linears under the checkpoints' names."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)

    def forward(self, x: Tensor, act: Callable[[Tensor], Tensor], quiet: bool = False) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        if quiet:  # .forward skips the hooks: calibration observes another call (UnfusedExperts.widen)
            gate, up, down = gate.forward, up.forward, down.forward
        return down(act(gate(x)) * up(x))  # gate and up read the same tensor: calibration shares their statistics


class SkipExpert(Exception):
    """Raised by a calibration hook in an expert's Linear: that expert stops there and the others run
    on, since no expert's input depends on another's weights; UnfusedExperts re-raises it once all
    have run, to stop the forward (calibrate's staged pass gathers a whole stage of experts in one run)."""


class UnfusedExperts(nn.Module):
    """The routed experts of one MoE block as children "0" ... "E-1" (Expert), called as the fused
    module is: (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].

    The Linears are called, not read, so they may be anything a compression puts there
    (QuantLinear, a low-rank pair, ...). While `calibrating` is set (calibrate.compress_block sets it),
    an expert that no token of this forward chose is still called, on an empty input: the
    calibration pass needs every sample to reach the same Linears in the same order. `widen` (set
    with it, for calib.all_experts or calib.min_expert_tokens) returns, from this forward's counts of
    routed tokens, the experts whose Linears are to observe every token: each of those runs once on
    all tokens for the hooks, and once, unobserved, on its routed tokens for the output.
    """

    def __init__(self, experts: list[Expert], act_fn: nn.Module):
        super().__init__()
        self.num_experts = len(experts)
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.act_fn = act_fn
        self.calibrating = False
        self.widen: Callable[[UnfusedExperts, list[int], int], Collection[int]] | None = None

    def __getitem__(self, e: int) -> Expert:
        return getattr(self, str(e))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # an index of num_experts is a slot routed nowhere (transformers' convention)
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts + 1)[: self.num_experts].tolist()
        wide = self.widen(self, hit, hidden_states.shape[0]) if self.widen is not None else ()
        skipped = None
        for e in range(self.num_experts):
            try:
                if e in wide:
                    self[e](hidden_states, self.act_fn)  # every token, for the statistics only
                if not (hit[e] or (self.calibrating and e not in wide)):
                    continue
                slot, token = torch.where(top_k_index.t() == e)  # the fused loop's order: by slot, then token
                y = self[e](hidden_states[token], self.act_fn, e in wide) * top_k_weights[token, slot, None]
            except SkipExpert as stop:
                skipped = stop
                continue
            out.index_add_(0, token, y.to(out.dtype))
        if skipped is not None:
            raise skipped
        return out


def is_fused(module: nn.Module) -> bool:
    """Transformers' fused experts: 3D gate_up_proj and down_proj parameters."""
    params = dict(module.named_parameters(recurse=False))
    return {"gate_up_proj", "down_proj"} <= params.keys() and params["gate_up_proj"].dim() == 3


def _linear(weight: Tensor) -> nn.Linear:
    """An nn.Linear holding a copy of weight [out, in] (built on meta: no random init to throw away)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


@torch.no_grad()
def unfuse(fused: nn.Module, names: tuple[str, str, str]) -> UnfusedExperts:
    """The per-expert version of one fused experts module (same dtype and device, copies of its weights)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    if getattr(fused, "has_bias", False) or getattr(fused, "is_transposed", False) or not getattr(
            fused, "is_concatenated", True):
        raise ValueError(f"{type(fused).__name__}: only bias-free, concatenated [gate; up] experts can be unfused")
    inter = gate_up.shape[1] // 2
    experts = [Expert(names, _linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]))
               for e in range(gate_up.shape[0])]
    return UnfusedExperts(experts, fused.act_fn)


def unfuse_experts_(blocks: nn.ModuleList, layout: Experts) -> int:
    """Replace the fused experts of every block that has them by their UnfusedExperts, one block
    at a time (the fused copy is freed before the next); returns how many were replaced. Blocks
    without them (Qwen-MoE's dense mlp_only_layers) and blocks already unfused are skipped."""
    parent_path, _, name = layout.path.rpartition(".")
    count = 0
    for block in blocks:
        parent = block.get_submodule(parent_path) if parent_path else block
        fused = getattr(parent, name, None)
        if isinstance(fused, nn.Module) and is_fused(fused):
            setattr(parent, name, unfuse(fused, layout.names))
            count += 1
    return count


@contextmanager
def calibrating(module: nn.Module, widen: Callable | None = None) -> Iterator[None]:
    """Inside: every UnfusedExperts below `module` calls all its experts, chosen or not, and
    widens those that `widen` names (UnfusedExperts)."""
    found = [m for m in module.modules() if isinstance(m, UnfusedExperts)]
    for m in found:
        m.calibrating, m.widen = True, widen
    try:
        yield
    finally:
        for m in found:
            m.calibrating, m.widen = False, None


@dataclass
class Coverage:
    """Which routed experts' statistics take every calibration token of their block: all of them
    (`all_experts`), or those the router gave fewer than `min_tokens`. The pass fills `widened`
    (expert fqn -> its routed tokens) for the report rows."""

    all_experts: bool = False
    min_tokens: int = 0
    widened: dict[str, int] = field(default_factory=dict)


class Routing:
    """One block's routing counts under a Coverage, summed over samples until `decide` (every
    sample routed), then over ranks; after it, `wide` holds each experts module's widened set."""

    def __init__(self, coverage: Coverage, block: nn.Module, linears: dict[str, nn.Module]):
        self.coverage = coverage
        rel = {id(m): n for n, m in block.named_modules()}  # the block's prefix, read off a Linear's name
        prefix = next((f[: len(f) - len(rel[id(m)])] for f, m in linears.items() if id(m) in rel), "")
        self.names = {id(m): prefix + n for n, m in block.named_modules() if isinstance(m, UnfusedExperts)}
        self.counts: dict[int, list[int]] = {}  # id(experts) -> [routed tokens per expert..., all tokens]
        self.wide: dict[int, frozenset[int]] = {}

    def count(self, experts: UnfusedExperts, hit: list[int], tokens: int) -> bool:
        """Add one sample's counts; False once this module's experts are decided."""
        if id(experts) in self.wide:
            return False
        old = self.counts.setdefault(id(experts), [0] * (len(hit) + 1))
        self.counts[id(experts)] = [a + b for a, b in zip(old, [*hit, tokens])]
        return True

    def decide(self) -> None:
        """Every sample was routed: widen, per experts module still open, on its counts over all ranks."""
        c = self.coverage
        for key in sorted(self.counts.keys() - self.wide.keys(), key=self.names.get):
            *routed, total = (int(n) for n in all_reduce_sum(self.counts[key]))
            self.wide[key] = frozenset(e for e, n in enumerate(routed) if c.all_experts or n < c.min_tokens)
            for e in sorted(self.wide[key]):
                name = f"{self.names[key]}.{e}"
                c.widened[name] = routed[e]
                if not c.all_experts:
                    log.warning("%s: %d routed calibration tokens, below calib.min_expert_tokens %d: its statistics "
                                "take all %d tokens of the block", name, routed[e], c.min_tokens, total)

    @property
    def pending(self) -> bool:
        return bool(self.counts.keys() - self.wide.keys())
