"""CPU time of one MLP's GEMMs at a prefill of SmolLM2 shape, by the MLP's width.

    .venv/bin/python evals/mlp_widths.py [--widths 1536 1280 1229 1216 1152] [--tokens 512] [--threads 1] [--rounds 200]

Times F.linear for gate/up ([tokens, 576] x [576, width]) and down ([tokens, width] x [width, 576]):
whether removing channels saves the time its multiply-adds promise, or whether some widths run
the GEMM slower per channel. The widths take turns in each round; medians over the rounds after
the warm-up. Prints a Markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def timed(a: torch.Tensor, w: torch.Tensor) -> float:
    t = time.perf_counter()
    torch.nn.functional.linear(a, w)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", nargs="+", type=int, default=[1536, 1280, 1229, 1216, 1152])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mlp-gemm-widths.md")
    args = p.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or min(args.widths + [args.hidden, args.tokens]) < 1:
        raise SystemExit("error: --rounds, --threads, --widths, --hidden and --tokens must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    x = torch.randn(args.tokens, args.hidden)
    full = args.widths[0]
    shapes = {width: (torch.randn(width, args.hidden), torch.randn(args.tokens, width),
                      torch.randn(args.hidden, width)) for width in args.widths}
    times: dict[int, dict[str, list[float]]] = {width: {"up": [], "down": []} for width in args.widths}
    for r in range(args.warmup + args.rounds):  # the widths interleaved, so drifts of the machine hit all
        for width, (w_in, h, w_out) in shapes.items():
            up, down = timed(x, w_in), timed(h, w_out)
            if r >= args.warmup:
                times[width]["up"].append(up)
                times[width]["down"].append(down)
    rows = [(width, statistics.median(t["up"]), statistics.median(t["down"])) for width, t in times.items()]
    base = 2 * rows[0][1] + rows[0][2]  # gate and up share a shape
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    lines = [f"CPU {cpu}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, fp32; "
             f"{args.tokens} tokens, hidden {args.hidden}; median of {args.rounds} rounds, the widths interleaved.", "",
             "| width | gate/up ms | down ms | MLP ms (2 x gate/up + down) | MLP speedup | ideal (width ratio) |",
             "|---|---|---|---|---|---|"]
    for width, up, down in rows:
        mlp = 2 * up + down
        lines.append(f"| {width} | {up * 1e3:.2f} | {down * 1e3:.2f} | {mlp * 1e3:.2f} | {base / mlp:.3f}x "
                     f"| {full / width:.3f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
