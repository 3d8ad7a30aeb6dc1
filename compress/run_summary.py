"""What `compress run` prints when it is done: the summary table of its report (perplexity, size,
sparsity, bits, time, memory; KL divergence; MoE experts' calibration tokens) and the CPU it ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_table(report: dict) -> str:
    rows = [("setting", "perplexity", "params M", "sparsity", "weight bits", "compress s", "peak RSS MB")]
    millions = lambda key: f"{report[key]['total'] / 1e6:.1f}" if key in report else "-"  # noqa: E731
    if "dense_ppl" in report:
        rows.append(("dense", f"{report['dense_ppl']:.2f}", millions("dense_params"), "0.0%", "-", "-", "-"))
    quant = [r for r in report.get("layers", []) if r["step"] == "quantize"]
    bits = sum(r["bits"] * r["params"] for r in quant) / sum(r["params"] for r in quant) if quant else None
    rows.append((
        Path(report["recipe"]).stem, f"{report['ppl']:.2f}" if "ppl" in report else "-", millions("params"),
        f"{100 * report['sparsity']:.1f}%", f"{bits:.3g}" if bits else "-", f"{report['compress_seconds']:.1f}",
        f"{report['peak_rss_mb']:.0f}",
    ))
    if "kl" in report:  # against the input model: nothing to show on its own row
        kl = report["kl"]
        rows = [(*r, *c) for r, c in zip(rows, [("KL mean", "KL p99", "top-1"), *[("-", "-", "-")] * (len(rows) - 2),
                                                (f"{kl['mean']:.4g}", f"{kl['p99']:.4g}", f"{100 * kl['top1']:.2f}%")])]
    experts = expert_tokens(report)
    return "\n".join(_align(rows) + ([""] + _align(experts) if len(experts) > 1 else []))


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns: the first left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def expert_tokens(report: dict) -> list[tuple[str, ...]]:
    """Per MoE block of the report's rows: the calibration tokens its router gave each expert (min,
    median, max over the experts) and, with calib.min_expert_tokens, how many got fewer (those took
    all tokens); a header alone when the report has no expert rows with token counts."""
    import re
    from statistics import median

    from .model import ARCHITECTURES

    least = report.get("calib", {}).get("min_expert_tokens", 0)
    paths = "|".join(sorted({re.escape(a.experts.path) for a in ARCHITECTURES.values() if a.experts}))
    pattern = re.compile(rf"(.+)\.(?:{paths})\.(\d+)\.[^.]+")
    blocks: dict[str, dict[str, int]] = {}
    for r in report.get("layers", []):
        m = pattern.fullmatch(r["module"])
        if m and "tokens" in r:
            blocks.setdefault(m[1], {})[m[2]] = r.get("routed_tokens", r["tokens"])
    rows = [("MoE block", "expert tokens min", "median", "max", *([f"below {least}"] if least else []))]
    for block, counts in blocks.items():
        n = sorted(counts.values())
        below = [str(sum(v < least for v in n))] if least else []
        rows.append((block, str(n[0]), f"{median(n):g}", str(n[-1]), *below))
    return rows
