"""Streaming calibration: capture what decoder block 0 receives, then go block by block.

`compress_block` is the heart of the pass. Every calibration sample runs through the block as its
own coroutine (a greenlet), one sample at a time, so each matmul has the shape that runs fastest
on a CPU. A forward pre-hook on each target Linear adds the sample's input to that Linear's
statistics and pauses the sample there. When every sample has paused at the same Linear, its
statistics are complete: it is compressed on the spot, and the samples resume through the
compressed weights. So each block is run once, not twice (observe, then propagate), and every
Linear sees the inputs that the already-compressed Linears before it produce (GPTQ's
"true-sequential" order) at no extra cost. Linears fed by one tensor (q/k/v, gate/up) share one
set of statistics.

The price is memory: every paused sample keeps its intermediates (attention scores, the MLP's
widened activations), so a block holds all samples' at once. `compress_block(..., low_memory=True)`
(what `compress run --stream` uses) gives the same result with one batch alive at a time: each
Linear's statistics come from a forward of every batch that stops at it, through the Linears
already compressed, so the block's prefix runs again for every stage (q/k/v, o, gate/up, down:
about 2.5 forwards of the block instead of one).

MoE coverage (`Coverage`, from calib.all_experts and calib.min_expert_tokens): once every sample
has been routed (a pause of its own, or a stage), the experts to widen are decided on the block's
counts over all samples and ranks; their Linears then observe every token (moe.UnfusedExperts).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import all_reduce_sum
from .model import decoder_blocks
from .moe import Coverage, Routing, SkipExpert, UnfusedExperts, calibrating
from .stats import LinearStats, all_reduce_stats_


@dataclass
class BlockInputs:
    """What one decoder block receives, per sample: hidden states [1, T, C], extra args, kwargs."""

    hidden: list[Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]

    def extras_to_(self, device: torch.device | str) -> None:
        """Move the args and kwargs (rotary cos/sin, masks, positions) to the device the blocks run on."""
        self.args = [_on(a, device) for a in self.args]
        self.kwargs = [_on(k, device) for k in self.kwargs]


def _on(x: Any, device: torch.device | str) -> Any:
    """x with every tensor in it (in tuples, lists and dicts too) on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, tuple | list):
        return type(x)(_on(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _on(v, device) for k, v in x.items()}
    return x


class _StopForward(Exception):
    pass


ROUTED = "(routed)"  # where a sample pauses after its router (Coverage); no module has this name


def stack_batches(batches: list[Tensor], batch_size: int) -> list[Tensor]:
    """Concatenate consecutive [1, T] windows of equal length into [≤ batch_size, T] batches."""
    out: list[Tensor] = []
    for ids in batches:
        last = out[-1] if out else None
        if last is not None and last.shape[0] < batch_size and last.shape[1:] == ids.shape[1:]:
            out[-1] = torch.cat([last, ids])
        else:
            out.append(ids)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[Tensor], device: torch.device | str = "cpu") -> BlockInputs:
    """Run the model on each batch up to decoder block 0 and record what the block receives.

    A forward pre-hook on block 0 records its inputs and raises, so nothing past it runs.
    """
    captured = BlockInputs([], [], [])

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = decoder_blocks(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _call(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's output hidden states for every sample."""
    return [_call(block, h, a, k) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]


@torch.no_grad()
def run_block_(block: nn.Module, inputs: BlockInputs) -> None:
    """Run every sample through the block for its hooks' sake, keeping no outputs."""
    for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs):
        _call(block, h, a, k)


@contextmanager
def observe(
    linears: dict[str, nn.Module],
    needs: set[str],
    on_observed: Callable[[str, LinearStats, bool], None] | None = None,
) -> Iterator[dict[str, LinearStats]]:
    """Accumulate input statistics of `linears` while the caller runs forwards.

    A Linear whose input is the very tensor an earlier Linear received (q/k/v, gate/up) shares
    that Linear's LinearStats object and skips the work. `on_observed(fqn, stats, shared)` runs
    after each call. Hooks are removed on exit, also when the forward raises.
    """
    stats: dict[str, LinearStats] = {}
    leader: dict[str, str] = {}
    first_reader: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (the input, fqn)

    def hook(fqn: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        prev = _first_reader(first_reader, x)
        if fqn not in stats and prev is not None:
            leader[fqn] = prev
            stats[fqn] = stats[prev]
        if fqn in leader:
            if prev != leader[fqn]:
                raise RuntimeError(f"{fqn} stopped sharing its input with {leader[fqn]}")
        else:
            stats.setdefault(fqn, LinearStats()).update(x.detach(), needs)
            _remember(first_reader, x, fqn)
        if on_observed is not None:
            on_observed(fqn, stats[fqn], fqn in leader)

    handles = [m.register_forward_pre_hook(_bind(hook, fqn)) for fqn, m in linears.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _bind(hook: Callable, fqn: str) -> Callable:
    return lambda module, args: hook(fqn, module, args)


STAGE_STATS_BYTES = 32 * 2**20  # the statistics one stage of the staged pass gathers at most, over MoE experts


@torch.no_grad()
def compress_block(
    block: nn.Module,
    inputs: BlockInputs,
    linears: dict[str, nn.Module],
    needs: set[str],
    compress: Callable[[str, LinearStats], None],
    *,
    low_memory: bool = False,
    coverage: Coverage | None = None,
) -> list[Tensor]:
    """One pass of all samples through `block`, compressing each Linear once all samples fed it.

    `compress(fqn, stats)` is called exactly once per Linear in `linears`, in the order the block
    calls them, before any sample runs that Linear; under torchrun `stats` are summed over every
    rank's samples by then (see compress.distributed). Returns the block's outputs, computed with
    the compressed weights, for every local sample. Consumes `inputs.hidden` (set to None
    entries), so that inputs and outputs are not both held in full. `low_memory`: the same
    result with one batch alive at a time, for a few more forwards (see the module docstring).
    `coverage`: MoE experts whose statistics take every token (Coverage); None costs nothing.
    """
    from greenlet import getcurrent, greenlet

    done: set[str] = set()
    # weak: an id is forgotten when its statistics die (so never reused), and the stages can drop them
    reduced: weakref.WeakValueDictionary[int, LinearStats] = weakref.WeakValueDictionary()

    def final(fqn: str, stats: LinearStats) -> None:
        """Every local sample has fed this Linear: combine the ranks' statistics (once per shared
        object), then compress."""
        if id(stats) not in reduced:
            all_reduce_stats_(stats)
            reduced[id(stats)] = stats
        compress(fqn, stats)

    routing = Routing(coverage, block, linears) if coverage is not None else None
    if low_memory:
        def stop(experts: UnfusedExperts, hit: list[int], tokens: int) -> frozenset[int]:
            if routing.count(experts, hit, tokens):
                raise _StopForward  # a stage of its own: decided once every batch was routed
            return routing.wide[id(experts)]

        with calibrating(block, stop if routing else None):
            return _compress_block_in_stages(block, inputs, linears, needs, final, routing)

    def pause(experts: UnfusedExperts, hit: list[int], tokens: int) -> frozenset[int]:
        if routing.count(experts, hit, tokens):
            getcurrent().parent.switch(ROUTED)  # until every sample was routed
        return routing.wide[id(experts)]

    def on_observed(fqn: str, stats: LinearStats, shared: bool) -> None:
        if fqn in done:
            return
        if shared:  # its input fed a Linear that every sample already passed: stats are final
            final(fqn, stats)
            done.add(fqn)
            return
        getcurrent().parent.switch(fqn)  # pause this sample until all samples fed this Linear

    samples = [greenlet(partial(_call, block, h, a, k)) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]
    inputs.hidden = [None] * len(samples)  # each input is freed when its sample leaves the block
    outputs: list[Tensor | None] = [None] * len(samples)
    # calibrating: every sample reaches every MoE expert's Linears, in the same order, routed tokens or none
    with calibrating(block, pause if routing else None), observe(linears, needs, on_observed) as stats:
        running = list(range(len(samples)))
        while running:
            paused: dict[int, str] = {}
            for i in running:
                result = samples[i].switch()
                if samples[i].dead:
                    outputs[i] = result
                else:
                    paused[i] = result
            if not paused:
                break
            where = set(paused.values())
            if len(where) != 1 or len(paused) != len(samples):
                raise RuntimeError(f"calibration samples took different paths through the block: {sorted(where)}")
            fqn = where.pop()
            if fqn == ROUTED:
                routing.decide()
            else:
                final(fqn, stats[fqn])
                done.add(fqn)
            running = list(paused)
    for fqn in sorted(linears.keys() - done):
        final(fqn, LinearStats())  # the block never called it: no statistics
    return outputs


def _compress_block_in_stages(block: nn.Module, inputs: BlockInputs, linears: dict[str, nn.Module], needs: set[str],
                              final: Callable[[str, LinearStats], None], routing: Routing | None) -> list[Tensor]:
    """compress_block's stages, one batch at a time: each stage runs every batch up to the first
    Linear not yet compressed, adds its input to that Linear's statistics and stops the batch
    there; then that Linear is compressed. A Linear fed the very tensor a compressed one received
    (k/v after q) takes its statistics and is compressed when the next stage reaches it, as in
    the greenlet version, so both compress every Linear with the same statistics.

    MoE experts: no expert's input depends on another expert's weights, so a stage that reaches an
    expert's Linear stops only that expert (SkipExpert) and takes the other experts' Linears too:
    every expert's gate in one stage, every down in the next, instead of a stage per expert Linear,
    each re-running the attention. Experts fed one tensor (calib.all_experts) share its statistics
    in the stage. A stage stops taking experts once its statistics hold STAGE_STATS_BYTES (the rest
    wait for the next stage), which bounds the memory of one stage. An expert's statistics are
    dropped once its three Linears are compressed; a later reader of the same tensor, if any,
    records its own (the same numbers)."""
    experts: dict[int, str] = {}  # id(an expert's Linear) -> the expert's name, for those in `linears`
    for m in block.modules():
        if isinstance(m, UnfusedExperts):
            experts.update({id(getattr(m[e], n)): f"{id(m)}.{e}" for e in range(m.num_experts) for n in m[e].names})
    expert_of = {fqn: experts[id(m)] for fqn, m in linears.items() if id(m) in experts}
    done: dict[str, LinearStats | None] = {}  # compressed Linear -> its statistics (None: dropped)
    reader: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (the input, a compressed Linear it fed)
    stage: dict[str, LinearStats] = {}  # the Linears this stage stops at, in the block's order
    fed: dict[int, tuple[weakref.ref, str]] = {}  # this stage: id(input) -> (the input, a stage Linear it fed)

    def hook(fqn: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if fqn not in done:
            prev = _first_reader(reader, x)
            if prev is not None and done[prev] is not None:
                done[fqn] = done[prev]  # shares a compressed Linear's input, so its statistics
                final(fqn, done[fqn])
            else:  # a Linear of this stage: record its input, stop (the batch, or this expert only)
                if stage and fqn not in stage and not (fqn in expert_of and stage.keys() <= expert_of.keys()):
                    raise RuntimeError(f"calibration samples took different paths through the block: "
                                       f"{sorted([*stage, fqn])}")
                twin = _first_reader(fed, x)
                if fqn not in stage and twin is None and stage and _nbytes(stage) >= STAGE_STATS_BYTES:
                    raise SkipExpert  # this stage is full: this expert waits for the next one
                if twin is None:
                    stage.setdefault(fqn, LinearStats()).update(x.detach(), needs)
                    _remember(fed, x, fqn)
                elif stage.setdefault(fqn, stage[twin]) is not stage[twin]:
                    raise RuntimeError(f"calibration samples took different paths through the block: {fqn}")
                raise SkipExpert if fqn in expert_of else _StopForward
        _remember(reader, x, fqn)

    handles = [m.register_forward_pre_hook(_bind(hook, fqn)) for fqn, m in linears.items()]
    try:
        while True:
            outputs: list[Tensor] = []
            for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs):
                try:
                    outputs.append(_call(block, h, a, k))
                except (_StopForward, SkipExpert):
                    pass
            routed = routing is not None and routing.pending  # every batch stopped once routed
            if bool(outputs) + bool(stage) + routed > 1:
                raise RuntimeError(f"calibration samples took different paths through the block: {sorted(stage)}")
            if routed:
                routing.decide()
                continue
            if not stage:  # every batch went through the compressed block: these are its outputs
                break
            for fqn, stats in stage.items():
                final(fqn, stats)
                done[fqn] = stats
            stage.clear()
            fed.clear()
            finished = {expert_of[f] for f in done if f in expert_of}
            finished -= {expert_of[f] for f in expert_of.keys() - done.keys()}
            for fqn in [f for f in done if expert_of.get(f) in finished]:
                done[fqn] = None
    finally:
        for handle in handles:
            handle.remove()
    for fqn in sorted(linears.keys() - done.keys()):
        final(fqn, LinearStats())  # the block never called it: no statistics
    inputs.hidden = [None] * len(outputs)
    return outputs


def _nbytes(stage: dict[str, LinearStats]) -> int:
    """The bytes the statistics of a stage hold (shared ones once)."""
    unique = {id(st): st for st in stage.values()}.values()
    return sum(t.nbytes for st in unique for t in (st.xtx_upper, st.x_sq, st.x_absmax) if t is not None)


def _first_reader(readers: dict[int, tuple[weakref.ref, str]], x: Tensor) -> str | None:
    seen = readers.get(id(x))
    return seen[1] if seen is not None and seen[0]() is x else None


def _remember(readers: dict[int, tuple[weakref.ref, str]], x: Tensor, fqn: str) -> None:
    key = id(x)
    readers[key] = (weakref.ref(x, lambda _: readers.pop(key, None)), fqn)


@dataclass
class DensePass:
    """Statistics of the uncompressed model, for planning budgets before anything is compressed."""

    x_norm: dict[str, Tensor]  # fqn -> ‖X_j‖₂ per input column
    influence: list[float]  # per decoder block: 1 − cos(input, output), ShortGPT's block influence
    stats: dict[str, LinearStats]  # fqn -> its inputs' Σx² (x_norm's source), what scores.SCORERS read


@torch.no_grad()
def dense_pass(model: nn.Module, batches: list[Tensor], *, progress: bool = False) -> DensePass:
    """Run `batches` through the dense model block by block, recording every Linear's input norms
    and every block's influence. Nothing is modified."""
    from tqdm.auto import tqdm

    from .model import block_linears
    from .scores import block_influence

    inputs = capture_block_inputs(model, batches, next(model.parameters()).device)
    x_norm: dict[str, Tensor] = {}
    observed: dict[str, LinearStats] = {}
    influence = []
    for i in tqdm(range(len(decoder_blocks(model))), desc="score", unit="block", disable=not progress):
        linears = block_linears(model, i)
        with observe(linears, {"x_sq"}) as stats:
            outputs = run_block(decoder_blocks(model)[i], inputs)
        all_reduce_stats_(stats.values())
        x_norm.update({fqn: s.x_norm for fqn, s in stats.items()})
        observed.update(stats)
        weighted = sum(block_influence(a, b) * a.shape[0] for a, b in zip(inputs.hidden, outputs))
        weighted, n = all_reduce_sum([weighted, sum(a.shape[0] for a in inputs.hidden)])
        influence.append(weighted / n)
        inputs.hidden = outputs
    return DensePass(x_norm, influence, observed)
