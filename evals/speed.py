"""CPU prefill and decode speed of checkpoints loaded by stock transformers, against the first one.

    .venv/bin/python evals/speed.py DENSE_DIR SMALLER_DIR [...] [--prefill 512] [--decode 64] [--repeats 7]
    .venv/bin/python evals/speed.py DENSE_DIR SMALLER_DIR [...] --pool RUN1.json RUN2.json [...]

Every folder is loaded with plain `AutoModelForCausalLM.from_pretrained` (compress is not used to
load them), in fp32. Prefill: one forward over [1, prefill] random tokens, no cache. Decode: greedy
generation of `decode` tokens after a 16-token prompt, with the KV cache, never stopping early.
The models are timed in turn within each repeat, in a shuffled order, so drifts of the machine hit all of them;
the median is reported. The ideal speedup is the ratio of the multiply-adds per token of all
Linears (lm_head included); attention scores are left out of it, which flatters no one at short
lengths. Prints a Markdown table and writes it to --out, and every timing next to it (.json).
--pool times nothing: it builds the table from the rounds of earlier runs' .json files together
(same models, same lengths and threads, taken from the files), for a figure steadier than any
single run on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def linear_macs(model) -> int:
    """Multiply-adds per token of every nn.Linear (the tied lm_head counts: it runs)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def measure(models: dict, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Every model's prefill and decode times, args.repeats rounds, the models interleaved."""
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    g = torch.Generator().manual_seed(0)
    vocab = min(m.config.vocab_size for m in models.values())
    prefill_ids = torch.randint(0, vocab, (1, args.prefill), generator=g)
    prompt = prefill_ids[:, :16]

    def run(name: str) -> None:
        m = models[name]
        with torch.inference_mode():
            t = time.perf_counter()
            m(prefill_ids, use_cache=False)
            times[name]["prefill"].append(time.perf_counter() - t)
            t = time.perf_counter()
            m.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False,
                       pad_token_id=0)
            times[name]["decode"].append(time.perf_counter() - t)

    for name in models:  # warm-up
        run(name)
        times[name] = {"prefill": [], "decode": []}
    order = list(models)
    for r in range(args.repeats):  # a fresh order each repeat: the first model of a round runs slower here
        random.Random(r).shuffle(order)
        for name in order:
            run(name)
    return times


def pooled(models: dict, runs: list[Path]) -> tuple[dict, dict[str, dict[str, list[float]]]]:
    """The runs' settings and their rounds of timings, one after another (each round stays a pair for
    the paired ratio); the runs must agree on the models, lengths and threads."""
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    settings = None
    for f in runs:
        try:
            run = json.loads(f.read_text())
            if settings is None:
                settings = run["settings"]
            elif run["settings"] != settings:
                sys.exit(f"error: {f} was timed with {run['settings']}, the first run with {settings}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"error: cannot read timings from {f}: {e}")
        if set(run["times"]) != set(models):
            sys.exit(f"error: {f} times {sorted(run['times'])}, not {sorted(models)}")
        for n in models:
            for k in ("prefill", "decode"):
                times[n][k] += run["times"][n][k]
    return settings, times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", type=Path, help="checkpoint folders; the first is the baseline")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    p.add_argument("--pool", nargs="+", type=Path, help="earlier runs' timings (.json) to pool instead of timing")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "smollm2-structured-speed.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for path in args.models:
        if not (path / "config.json").is_file():
            sys.exit(f"error: {path} is not a checkpoint folder")
    models = {path.name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for path in args.models}
    for m in models.values():  # from_pretrained leaves the weights in the mmapped file's pages, whose
        for param in m.parameters():  # placement varied the GEMM speed by ±10% from run to run here
            param.data = param.data.clone()
    if args.pool:
        settings, times = pooled(models, args.pool)
    else:
        settings = {"prefill": args.prefill, "decode": args.decode, "threads": torch.get_num_threads()}
        times = measure(models, args)
    prefill, decode = settings["prefill"], settings["decode"]
    base = next(iter(models))
    rounds = len(times[base]["prefill"])
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    macs = {n: linear_macs(m) for n, m in models.items()}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    lines = [f"CPU {cpu}, {os.cpu_count()} cores, {settings['threads']} threads, torch {torch.__version__}, "
             f"fp32, stock transformers from_pretrained; median of {rounds} (models interleaved"
             f"{f'; the rounds of {len(args.pool)} runs pooled' if args.pool else ''}). "
             f"Prefill: [1, {prefill}] tokens, no cache. Decode: {decode} greedy tokens after a "
             "16-token prompt, with the KV cache.", "",
             "| model | params (M) | Linear MACs/token (M) | ideal speedup | prefill tok/s | prefill speedup "
             "| share of ideal | prefill speedup, paired | decode tok/s | decode speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, m in models.items():
        ideal = macs[base] / macs[n]
        speed = med[base]["prefill"] / med[n]["prefill"]
        share = f"{(speed - 1) / (ideal - 1):.0%}" if ideal > 1.0001 else "-"
        paired = statistics.median(b / t for b, t in zip(times[base]["prefill"], times[n]["prefill"]))
        lines.append(f"| {n} | {sum(q.numel() for q in m.parameters()) / 1e6:.1f} | {macs[n] / 1e6:.1f} "
                     f"| {ideal:.3f}x | {prefill / med[n]['prefill']:.0f} | {speed:.3f}x | {share} "
                     f"| {paired:.3f}x | {decode / med[n]['decode']:.1f} "
                     f"| {med[base]['decode'] / med[n]['decode']:.3f}x |")
    lines += ["", "share of ideal = (prefill speedup − 1) / (ideal speedup − 1): the part of the removable work "
              "that turned into time saved. Paired: the median over rounds of the "
              "ratio within one round, which cancels drifts slower than a round."]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    if not args.pool:  # every timing, for a second look or a pool
        args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "times": times}) + "\n")


if __name__ == "__main__":
    main()
