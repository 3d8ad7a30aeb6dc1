"""Score validation: does a score rank what it scores by the loss increase it really causes?

Units are sampled from the model and each is perturbed in three ways: a whole decoder block
removed (skipped), a group of input columns of one Linear removed (zeroed), a whole Linear
quantized (round to nearest, 3 bits, groups of 128). Further Linears, drawn on their own, are each
rounded to nearest onto every float format of FORMAT_KINDS, one unit per (Linear, format): the
choices a per-Linear format allocation weighs against each other. Every score predicts each unit's
loss increase; the true increase is measured by doing it, on held-out sequences. The report gives
Spearman's ρ per score and unit kind next to what a random score reaches (the central 95% of ρ
under random ranking), the same over all format units pooled ("formats": a Linear at fp8 against
another at nvfp4, and the formats of one Linear against each other), and, for the scores in loss
units (Fisher, K-FAC), the median ratio of predicted to measured increase: the
post-quantization-integral papers find gradient and Hessian estimates can be off by orders of
magnitude.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calibrate import dense_pass, stack_batches
from .evaluate import heldout_loss
from .fpquant import FORMATS, rtn_float
from .grid import QuantSpec, rtn
from .model import block_linears, decoder_blocks, weight_matrix
from .scores import large_weight_fraction, outlier_ratio, wanda_median
from .stats import collect_fisher

GROUP = 64  # input columns removed together in a "group" unit
QUANT = QuantSpec(bits=3, group_size=128, sym=False)
LOSS_UNITS = ("fisher", "kfac")  # scores that predict a loss increase in nats, not just a ranking
FORMAT_KINDS = {  # unit kind -> the whole Linear rounded to nearest on that format
    "nvfp4": lambda W: rtn_float(W, FORMATS["nvfp4"]).weight,
    "mxfp4": lambda W: rtn_float(W, FORMATS["mxfp4"]).weight,
    "fp8": lambda W: rtn_float(W, FORMATS["fp8"]).weight,
    "bf16": lambda W: W.to(torch.bfloat16).float(),
}
POOLED = "formats"  # the summary's row over every format unit together


@dataclass(frozen=True)
class Unit:
    kind: str  # "block", "group", "quant" or a key of FORMAT_KINDS
    target: str  # block index or Linear fqn
    col: int = 0  # first removed column of a group


def validate_scores(model: nn.Module, score_batches: list[Tensor], heldout: list[Tensor], *, groups: int = 24,
                    quants: int = 24, formats: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """Predicted against measured loss increases for every score; see the module docstring.

    `score_batches` ([1, T] each) feed the Fisher and activation statistics, `heldout` ([B, T])
    the measured losses; `formats` Linears are each rounded onto every format of FORMAT_KINDS.
    Returns {"units": [...], "spearman": {kind: {score: ρ}}, "null95": {kind: (lo, hi)}, "ratio":
    {kind: {score: median predicted/measured}}}, with the kind POOLED when there are format units.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    n_blocks = len(decoder_blocks(model))
    linears = {f: m for b in range(n_blocks) for f, m in block_linears(model, b).items()}
    names = sorted(linears)
    units = [Unit("block", str(b)) for b in range(n_blocks)]
    for fqn in rng.sample(names, min(groups, len(names))):
        cols = weight_matrix(linears[fqn]).shape[1]
        units.append(Unit("group", fqn, rng.randrange(0, max(1, cols - GROUP + 1))))
    units += [Unit("quant", fqn) for fqn in rng.sample(names, min(quants, len(names)))]
    format_rng = random.Random(f"formats:{seed}")  # a stream of its own: the kinds above keep their samples
    units += [Unit(kind, fqn) for fqn in format_rng.sample(names, min(formats, len(names))) for kind in FORMAT_KINDS]
    sampled = {u.target for u in units if u.kind != "block"}
    dense = dense_pass(model, stack_batches(score_batches, 4), progress=progress)
    fisher = collect_fisher(model, score_batches, linears, kfac=sampled, progress=progress)
    base = heldout_loss(model, heldout)
    rows = []
    for u in tqdm(units, desc="measure", unit="unit", disable=not progress):
        with perturbed(model, u, linears):
            measured = heldout_loss(model, heldout) - base
        rows.append({"kind": u.kind, "target": u.target, "col": u.col, "measured": measured,
                     **predictions(model, u, linears, fisher, dense, rng)})
    return summarize(rows)


def layer_scores(model: nn.Module, score_batches: list[Tensor], *, progress: bool = True) -> list[dict]:
    """Every layer-wise score of every decoder block, on the dense model (no validation)."""
    linears = {f: m for b in range(len(decoder_blocks(model))) for f, m in block_linears(model, b).items()}
    dense = dense_pass(model, stack_batches(score_batches, 4), progress=progress)
    fisher = collect_fisher(model, score_batches, linears, progress=progress)
    rng = random.Random(0)
    rows = []
    for b in range(len(decoder_blocks(model))):
        scores = predictions(model, Unit("block", str(b)), linears, fisher, dense, rng)
        del scores["random"]
        rows.append({"block": b, **scores})
    return rows


def predictions(model: nn.Module, u: Unit, linears: dict, fisher: dict, dense, rng: random.Random) -> dict[str, float]:
    """Every score's prediction for one unit (higher = a larger loss increase expected)."""
    if u.kind == "block":
        W = {f: weight_matrix(m).detach().float() for f, m in block_linears(model, int(u.target)).items()}
        params = sum(w.numel() for w in W.values())
        layers = [(W[f], dense.x_norm[f]) for f in W]
        return {
            "block influence": dense.influence[int(u.target)],
            "owl outliers": outlier_ratio(layers, 5.0),
            "dlp median": wanda_median(layers),
            "large weights": sum(large_weight_fraction(W[f]) * W[f].numel() for f in W) / params,
            "fisher": float(sum(0.5 * (fisher[f].diagonal * W[f].square()).sum() for f in W)),
            "magnitude": float(sum(W[f].square().sum() for f in W)),
            "random": rng.random(),
        }
    W = weight_matrix(linears[u.target]).detach().float()
    delta = W - perturbed_weight(W, u)
    A, G = fisher[u.target].kfac
    x_sq = dense.x_norm[u.target].square()
    return {
        "magnitude": float(delta.square().sum()),
        "wanda": float((delta.square() * x_sq).sum()),  # the diagonal of the layer Hessian
        "hessian": float(((delta @ A) * delta).sum()),  # ‖δX‖², the layer-wise (GPTQ) loss
        "fisher": float(0.5 * (fisher[u.target].diagonal * delta.square()).sum()),
        "kfac": float(0.5 * ((G @ delta @ A) * delta).sum()),
        "random": rng.random(),
    }


def perturbed_weight(W: Tensor, u: Unit) -> Tensor:
    if u.kind == "group":
        out = W.clone()
        out[:, u.col : u.col + GROUP] = 0
        return out
    if u.kind in FORMAT_KINDS:
        return FORMAT_KINDS[u.kind](W)
    return rtn(W, QUANT).weight


class _Skip(nn.Module):
    """Stands in for a removed decoder block: passes the hidden state through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def perturbed(model: nn.Module, u: Unit, linears: dict):
    """The model with one unit removed or quantized, restored exactly on exit."""
    if u.kind == "block":
        blocks = decoder_blocks(model)
        kept = blocks[int(u.target)]
        attention_type = getattr(kept, "attention_type", None)
        skip = _Skip()
        if attention_type is not None:
            skip.attention_type = attention_type
        blocks[int(u.target)] = skip
        try:
            yield
        finally:
            blocks[int(u.target)] = kept
        return
    W = weight_matrix(linears[u.target])
    saved = W.detach().clone()
    with torch.no_grad():
        W.copy_(perturbed_weight(saved.float(), u).to(W.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            W.copy_(saved)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    ra, rb = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def _ranks(x: Tensor) -> Tensor:
    """0-based ranks; tied values share their mean rank: below + (count − 1) / 2."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    below = counts.cumsum(0) - counts  # how many values are smaller
    return (below + (counts - 1) / 2).to(x.dtype)[inverse]


def null_band(n: int, trials: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Central 95% of Spearman's ρ between n measurements and a random score."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n, dtype=torch.float64).tolist()
    rhos = sorted(spearman(base, torch.randperm(n, generator=g).tolist()) for _ in range(trials))
    return rhos[int(0.025 * trials)], rhos[int(0.975 * trials) - 1]


def kind_rows(rows: list[dict], kind: str) -> list[dict]:
    """The units of one kind; for POOLED, every format unit."""
    return [r for r in rows if r["kind"] == kind or (kind == POOLED and r["kind"] in FORMAT_KINDS)]


def summarize(rows: list[dict]) -> dict:
    out = {"units": rows, "spearman": {}, "null95": {}, "ratio": {}}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds + ([POOLED] if any(k in FORMAT_KINDS for k in kinds) else []):
        sel = kind_rows(rows, kind)
        measured = [r["measured"] for r in sel]
        scores = [k for k in sel[0] if k not in ("kind", "target", "col", "measured")]
        out["spearman"][kind] = {s: spearman([r[s] for r in sel], measured) for s in scores}
        out["null95"][kind] = null_band(len(sel))
        ratios = {}
        for s in scores:
            if s in LOSS_UNITS:
                pairs = torch.tensor([r[s] / r["measured"] for r in sel if r["measured"] > 0], dtype=torch.float64)
                ratios[s] = float(pairs.median()) if len(pairs) else float("nan")
        out["ratio"][kind] = ratios
    return out


def validation_table(result: dict) -> str:
    kinds = {"block": "decoder block removed", "group": f"{GROUP} input columns removed",
             "quant": f"Linear quantized (RTN {QUANT.bits}-bit g{QUANT.group_size})",
             **{k: f"Linear rounded to {k}" for k in FORMAT_KINDS}, POOLED: "Linear rounded, all formats pooled"}
    lines = ["| unit | n | score | Spearman ρ | random 95% band | beats random | median predicted/measured |",
             "|---|---|---|---|---|---|---|"]
    for kind, rhos in result["spearman"].items():
        n = len(kind_rows(result["units"], kind))
        lo, hi = result["null95"][kind]
        for score, rho in sorted(rhos.items(), key=lambda kv: -kv[1]):
            ratio = result["ratio"][kind].get(score)
            lines.append(f"| {kinds[kind]} | {n} | {score} | {rho:+.3f} | {lo:+.2f} to {hi:+.2f} "
                         f"| {'yes' if rho > hi else 'no'} | {f'{ratio:.3g}' if ratio is not None else '-'} |")
    return "\n".join(lines)


def plot_validation(result: dict, path) -> None:
    """Predicted against measured loss increase, one panel per unit kind and score (log-log); the
    format units in the pooled row only, one colour per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in result["spearman"] if k not in FORMAT_KINDS]
    width = max(len(v) for v in result["spearman"].values())
    fig, axes = plt.subplots(len(kinds), width, figsize=(2.6 * width, 2.6 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        sel = kind_rows(result["units"], kind)
        for j in range(width):
            ax = axes[i][j]
            scores = list(result["spearman"][kind])
            if j >= len(scores):
                ax.axis("off")
                continue
            s = scores[j]
            for sub in dict.fromkeys(r["kind"] for r in sel):
                pts = [r for r in sel if r["kind"] == sub]
                ax.scatter([r[s] for r in pts], [max(r["measured"], 1e-6) for r in pts], s=8,
                           label=sub if kind == POOLED else None)
            if kind == POOLED and j == 0:
                ax.legend(fontsize=6)
            ax.set_yscale("log")
            if s != "random":
                ax.set_xscale("log")
            ax.set_title(f"{kind}: {s}\nρ = {result['spearman'][kind][s]:+.2f}", fontsize=8)
            ax.tick_params(labelsize=6)
        axes[i][0].set_ylabel("measured Δloss", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
