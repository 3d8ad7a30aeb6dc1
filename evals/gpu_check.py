"""A GPU check in one command: GPTQ and SparseGPT on a Llama-3-8B-shaped model, the Triton kernels
against their references, and their speed at Llama-3-8B shapes, on one CUDA device.

    python evals/gpu_check.py [--out DIR] [--blocks 2] [--samples 32] [--seqlen 512] [--dtype bfloat16]
                              [--device cuda] [--budget-s 480] [--sections compress,kernels,bench]
                              [--wheels DIR] [--tiny]
    bash evals/gpu_check.sh [ARGS]      (the same, from any directory)

In this order (compress first: it runs no Triton kernel, so a slow cold compile cannot starve it):

1. compress: a Llama-3-8B-shaped model with random weights (LlamaConfig: hidden 4096, intermediate
   14336, 32 heads, 8 kv heads, vocab 128256, untied head; --blocks decoder blocks, default 2) in
   --dtype (default bfloat16) on the CPU, compressed by compress.compress_ on --device with
   recipes/gptq-w4g128.yaml and recipes/sparsegpt-50.yaml on --samples x --seqlen random tokens
   (default 32 x 512). Per block: its wall time (from the previous block's last forward, or the end of
   the capture pass, to its own last forward, which passes its compressed outputs on; CUDA
   synchronized; moving the block to and from the device included) and the summed solver time of its
   Linears. Building the model is timed apart.
   Should that run raise, its error is recorded (exit 1) and the blocks are timed again with the
   whole model on the device (compress_ once moved the captured hidden states to --device but not the
   blocks' other inputs, rotary cos/sin and positions; BlockInputs.extras_to_ now does).
2. kernels: each Triton kernel (quant_matmul W4 g128 and W8 per channel, sparse24_matmul, fp8_matmul,
   fp8_linear, fp4_matmul NVFP4 and MXFP4) against its pure-torch definition in kernels/reference.py,
   on the device, autotuned as users get it, at 4096x4096 and M = 1, 16, 2048 (the benchmark's inputs
   and dtypes, so the compiling and tuning serve both). A kernel passes when every output is within
   8u·S + (2K+8)·2⁻²⁴·S of the reference, S = |x| |Ŵ|ᵀ and u the unit roundoff of its dtype: the bound
   of tests/test_kernels*.py, with room for either side's rounding of Ŵ. Those test files are not run
   here: they feed CPU tensors to the kernels under TRITON_INTERPRET and skip without it, so on a GPU
   they would check nothing.
3. bench: kernels/bench.py's rows (fp16 GEMM, W4 g128, W8 per channel, 2:4; bf16 GEMM,
   torch._scaled_mm, FP8 W8A8 with and without the activation quantizer, NVFP4, MXFP4) at Llama-3-8B's
   q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096 and down 4096x14336, M = 1, 16, 2048: the median
   of triton.testing.do_bench (CUDA events), first calls (autotuning) outside the timing. Where the
   GPU refuses torch._scaled_mm the row says why.

No kernel check or benchmark row starts once --budget-s seconds (default 480) have passed since the
start; those left are listed as skipped. Writes DIR/gpu_check.json and DIR/gpu_check.md and prints
the table; DIR is --out, else $OUT, else out/gpu_check. Both are rewritten after each section, so a
run cut short keeps what finished, and `--sections kernels,bench` reruns the rest. Exit 1 when a
kernel check fails or a section raised (its error is in both files).

Time: sized for one call of at most 10 minutes on an H100, but not yet run on a GPU (none was
available when it was written). On a fresh machine the Triton cache is cold: each kernel compiles
its autotune configs (up to 36 decode and 7 prefill ones, per M = 1 and per other M) and times them
at every new shape, which is where most of the time should go; the budget bounds it.

Without CUDA, or with --tiny, the same steps run at tiny shapes on the CPU under TRITON_INTERPRET=1
(set here before triton is imported): a Llama of hidden 128, intermediate 256 and 2 blocks calibrated
on 4 x 32 tokens; kernels at 48x256 and M = 1, 16, 33; the benchmark at 64x128, 32x128, 128x128 and
64x256 and M = 1, 16, 32. Its times are one call each of kernels interpreted in numpy: they mean
nothing. tests/test_gpu_check.py runs it, so the script cannot rot.

Offline GPU machine: it has torch, triton and transformers (whose own dependencies bring numpy,
pyyaml, safetensors and tqdm). The checkout needs no install (its root goes on sys.path), and of the
rest of pyproject.toml's dependencies this run needs only greenlet (compress_block's streaming pass):
the tiny run passes with nothing importable but torch, triton, transformers, their dependencies and
greenlet (no accelerate, datasets or compressed-tensors). greenlet's wheels are built per Python
version (recent ones tagged manylinux_2_24/2_28, older ones manylinux2014: hence both platforms), so
fetch one for each version the machine may run (under 1 MiB each; the device tool carries 64 MiB), here:

    for v in 3.10 3.11 3.12 3.13; do pip download --no-deps --only-binary=:all: --python-version $v \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels greenlet; done

and there run `python evals/gpu_check.py --wheels wheels`, which first does `pip install --no-index
--no-deps --find-links wheels greenlet` (one name per distribution in the folder; pip picks the wheel
for its Python). pyproject.toml asks for transformers >= 5.0: the JSON records the machine's version.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("compress", "kernels", "bench")  # compress first: it runs no Triton kernel, so no compiling
UNIT = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24}
# (out, in) of Llama-3-8B's q/o, k/v, gate/up and down projections; tiny: four small ones, K a multiple of
# the W4 rows' group of 128, N at most 4 of the interpreter's 32-wide tiles (it takes seconds a call)
SHAPES = {"gpu": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
          "tiny": [(64, 128), (32, 128), (128, 128), (64, 256)]}
BENCH_MS = {"gpu": [1, 16, 2048], "tiny": [1, 16, 32]}
CHECK = {"gpu": ((4096, 4096), [1, 16, 2048]), "tiny": ((48, 256), [1, 16, 33])}  # (N, K), Ms
MODEL = {  # LlamaConfig fields; num_hidden_layers comes from --blocks
    "gpu": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
}
DEFAULTS = {"gpu": dict(blocks=2, samples=32, seqlen=512, dtype="bfloat16"),  # bfloat16: Llama-3's own
            "tiny": dict(blocks=2, samples=4, seqlen=32, dtype="float32")}
RECIPES = {"gptq-w4g128": "recipes/gptq-w4g128.yaml", "sparsegpt-50": "recipes/sparsegpt-50.yaml"}


# --- kernels against their references -----------------------------------------------------------------------


def _fp8_gemm(fn, x, **weight):
    """An FP8 GEMM fed by x's per-token e4m3 codes (the reference's quantizer, the same for both sides)."""
    from compress.kernels.reference import fp8_quantize_per_token

    return fn(*fp8_quantize_per_token(x), **weight, out_dtype=x.dtype)


def kernel_cases(N: int, K: int, dev: torch.device) -> dict:
    """name -> (x dtype, Triton call, reference call, Ŵ fp32 [N, K], whether x reaches the product as
    per-token e4m3); names and dtypes as kernels/bench.py's rows, so the checks tune what it times."""
    from compress.kernels import reference as ref
    from compress.kernels.fp4_matmul import fp4_matmul
    from compress.kernels.fp8_matmul import fp8_linear, fp8_matmul
    from compress.kernels.quant_matmul import quant_matmul
    from compress.kernels.sparse24_matmul import sparse24_matmul
    from compress.pack import dequantize, dequantize_fp4, pack_24, pack_codes, pack_fp4

    g = torch.Generator(device=dev).manual_seed(0)
    cases = {}
    for name, bits, group in (("W4 g128", 4, 128), ("W8 per channel", 8, -1)):
        groups = 1 if group == -1 else K // group
        codes = torch.randint(0, 2**bits, (N, K), device=dev, dtype=torch.uint8, generator=g)
        scale = (torch.rand(N, groups, device=dev, generator=g) * 0.01 + 0.001).half()
        zero = torch.randint(0, 2**bits, (N, groups), device=dev, dtype=torch.uint8, generator=g)
        w = dict(packed=pack_codes(codes, bits), scale=scale, zero=zero, bits=bits, group_size=group)
        cases[name] = (torch.float16, partial(quant_matmul, **w), partial(ref.quant_linear, **w),
                       dequantize(codes, scale, zero, group), False)
    keep = torch.rand(N, K // 4, 4, device=dev, generator=g).argsort(-1)[..., :2]  # 2 random slots of every 4
    mask = torch.zeros(N, K // 4, 4, device=dev).scatter_(-1, keep, 1.0).reshape(N, K)
    W24 = (torch.randn(N, K, device=dev, generator=g) * mask).half()
    values, meta = pack_24(W24)
    cases["2:4 fp16"] = (torch.float16, partial(sparse24_matmul, values=values, meta=meta),
                         partial(ref.sparse24_linear, values=values, meta=meta), W24.float(), False)
    w_q, w_scale = ref.fp8_quantize_per_token(torch.randn(N, K, device=dev, generator=g))
    w = dict(w_q=w_q, w_scale=w_scale)
    W8 = w_q.float() * w_scale
    cases["FP8 W8A8 (Triton)"] = (torch.bfloat16, partial(_fp8_gemm, fp8_matmul, **w),
                                  partial(_fp8_gemm, ref.fp8_scaled_mm, **w), W8, True)
    cases["FP8 W8A8 + act quant (Triton)"] = (torch.bfloat16, partial(fp8_linear, **w), partial(ref.fp8_linear, **w),
                                              W8, True)
    packed = pack_fp4(torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8, generator=g))
    nv_scale = (torch.rand(N, K // 16, device=dev, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
    mx_scale = torch.randint(118, 131, (N, K // 32), device=dev, dtype=torch.uint8, generator=g)
    for name, scale, global_scale, group in (("NVFP4 W4A16 (Triton)", nv_scale, torch.tensor([1500.0], device=dev), 16),
                                             ("MXFP4 W4A16 (Triton)", mx_scale, None, 32)):
        w = dict(packed=packed, scale=scale, global_scale=global_scale, group_size=group)
        cases[name] = (torch.bfloat16, partial(fp4_matmul, **w), partial(ref.fp4_linear, **w),
                       dequantize_fp4(packed, scale, global_scale, group, K), False)
    return cases


def error_over_bound(y: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> float:
    """max |y − expected| / (8u·S + (2K+8)·2⁻²⁴·S), S = |x| |W|ᵀ; NaN when y holds a NaN (fails)."""
    S = x.double().abs() @ W.double().abs().t()
    bound = 8 * UNIT[y.dtype] * S + (2 * x.shape[-1] + 8) * 2**-24 * S + 1e-30
    return ((y.double() - expected.double()).abs() / bound).max().item()


@contextmanager
def single_rounding():
    """cuBLAS may reduce 16-bit GEMMs in 16 bits (split-K); the references define one rounding at the end."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction
    flags.allow_fp16_reduced_precision_reduction = flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction = saved


def check_kernels(dev: torch.device, mode: str, deadline: float) -> dict:
    """name -> {passed, max_err_over_bound, shape, ms} (or the error it raised) for every kernel; those
    not started by the deadline have passed None and say so."""
    with single_rounding():
        return _check_kernels(dev, mode, deadline)


def _check_kernels(dev: torch.device, mode: str, deadline: float) -> dict:
    from compress.kernels.reference import fp8_quantize_per_token

    (N, K), ms = CHECK[mode]
    results = {}
    for name, (dtype, kernel, reference, W, fp8_act) in kernel_cases(N, K, dev).items():
        entry = {"shape": f"{N}x{K}", "ms": ms, "dtype": str(dtype).removeprefix("torch.")}
        if time.monotonic() > deadline:
            results[name] = {**entry, "passed": None, "skipped": "time budget"}
            continue
        try:
            ratios = []
            g = torch.Generator(device=dev).manual_seed(1)
            for M in ms:
                x = torch.randn(M, K, device=dev, generator=g).to(dtype)
                y, expected = kernel(x), reference(x)
                if y.shape != expected.shape or y.dtype != expected.dtype:
                    raise ValueError(f"M={M}: got {y.dtype} {tuple(y.shape)}, reference {expected.dtype} "
                                     f"{tuple(expected.shape)}")
                if fp8_act:  # the product sees x's e4m3 codes times their scales
                    q, s = fp8_quantize_per_token(x)
                    x = q.float() * s
                ratios.append(error_over_bound(y, expected, x, W))
            entry.update(passed=all(r <= 1.0 for r in ratios),  # a NaN fails
                         max_err_over_bound=max(ratios, key=lambda r: math.inf if math.isnan(r) else r))
        except Exception as e:  # a kernel that raises is a failed check, not the end of the run
            entry.update(passed=False, error=_one_line(e))
        results[name] = entry
    return results


def dispatch_paths(dev: torch.device) -> dict:
    """The path compress.kernels.dispatch takes for an fp16 call on dev (QuantLinear's and Sparse24Linear's)."""
    from compress.kernels.dispatch import kernel_path

    x = torch.zeros(16, 128, device=dev, dtype=torch.float16)
    return {"quant W4 g128": kernel_path("quant", x, 4, 128), "sparse24": kernel_path("sparse24", x)}


# --- compression on a Llama-3-8B-shaped model ---------------------------------------------------------------


def build_model(mode: str, blocks: int, dtype: torch.dtype):
    """A Llama with random weights on the CPU, where compress_ keeps the blocks it is not working on."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=blocks, bos_token_id=0, eos_token_id=1, **MODEL[mode])
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@contextmanager
def block_clock(model, dev: torch.device):
    """Yield {block index: time its last forward ended}, key -1 the end of the capture pass (the last
    embedding call), so block i took ends[i] − ends[i − 1] under compress_."""
    from compress.model import decoder_blocks

    ends = {}

    def stamp(key, *_):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ends[key] = time.perf_counter()

    handles = [model.get_input_embeddings().register_forward_hook(partial(stamp, -1))]
    handles += [b.register_forward_hook(partial(stamp, i)) for i, b in enumerate(decoder_blocks(model))]
    try:
        yield ends
    finally:
        for h in handles:
            h.remove()


def compress_model(dense, recipe_path: str, batches: list[torch.Tensor], dev: torch.device, samples: int,
                   seqlen: int, home: torch.device) -> dict:
    """One recipe on a copy of `dense` placed on `home`: per-block wall and solver seconds, totals, what
    it produced."""
    from compress import compress_, load_recipe
    from compress.layers import QuantLinear
    from compress.model import blocks_path

    recipe = load_recipe(ROOT / recipe_path, [f"calib.samples={samples}", f"calib.seqlen={seqlen}"])
    model = copy.deepcopy(dense).to(home)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    with block_clock(model, dev) as ends:
        report = compress_(model, recipe, batches, device=dev, progress=False)
    path = blocks_path(model)
    rows = []
    for i in range(len(ends) - 1):
        layers = [r for r in report.layers if r["module"].startswith(f"{path}.{i}.")]
        rows.append({"block": i, "seconds": ends[i] - ends[i - 1], "solve_seconds": sum(r["seconds"] for r in layers),
                     "linears": len(layers)})
    errors = [r["error"] for r in report.layers if "error" in r]
    out = {"recipe": recipe_path, "blocks": rows, "seconds": report.seconds, "sparsity": report.sparsity,
           "quantized_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
           "mean_error": sum(errors) / len(errors) if errors else None}
    if dev.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def run_compress(dev: torch.device, mode: str, blocks: int, samples: int, seqlen: int, dtype: torch.dtype) -> dict:
    t = time.perf_counter()
    dense = build_model(mode, blocks, dtype)
    built = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    batches = [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(samples)]
    result = {"model": {**MODEL[mode], "blocks": blocks, "dtype": str(dense.dtype).removeprefix("torch."),
                        "build_seconds": built}, "calibration": f"{samples} x {seqlen} random tokens"}
    cpu = torch.device("cpu")
    for name, recipe_path in RECIPES.items():
        try:
            result[name] = {"model_on": "cpu", **compress_model(dense, recipe_path, batches, dev, samples, seqlen, cpu)}
        except Exception as e:
            if dev == cpu:
                raise
            traceback.print_exc()
            # the run users get (blocks on the CPU, each moved to the device) failed: record why, and still
            # time the blocks with the whole model on the device (it fits at the default 2 blocks)
            result[name] = {"model_on": str(dev), "cpu_home_error": _one_line(e),
                            **compress_model(dense, recipe_path, batches, dev, samples, seqlen, dev)}
    return result


# --- kernel speed (kernels/bench.py's rows) -----------------------------------------------------------------


def wall_ms(fn) -> float:
    """One call's wall time in ms: the CPU run's timer (kernels interpreted in numpy: a smoke test)."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def run_bench(dev: torch.device, mode: str, deadline: float) -> dict:
    """kernels/bench.py's integer/2:4 and FP8/FP4 rows per (shape, M), with speedups over the 16-bit GEMM
    (and torch._scaled_mm for FP8); (shape, M) pairs left when the deadline passes are listed as skipped."""
    from compress.kernels import bench  # its row generators; the GPU timer is its do_bench median

    timer = bench._ms if mode == "gpu" else wall_ms
    shapes, ms = SHAPES[mode], BENCH_MS[mode]
    rows, errors = [], []
    for N, K in shapes:
        for family in (bench._gpu_shape, bench._fp_shape):  # each yields its 16-bit GEMM first for every M
            if time.monotonic() > deadline:
                break
            base, scaled = {}, {}
            try:
                for M, name, t, _ in family(N, K, dev, ms, timer):
                    row = {"shape": f"{N}x{K}", "N": N, "K": K, "M": M, "kernel": name}
                    if isinstance(t, str):  # the call failed: why, instead of a time
                        rows.append({**row, "ms": None, "error": t})
                        continue
                    base.setdefault(M, t)
                    if name == "FP8 torch._scaled_mm":
                        scaled[M] = t
                    rows.append({**row, "ms": t, "tflops": 2 * M * N * K / t / 1e9, "vs_16bit": base[M] / t,
                                 "vs_scaled_mm": scaled[M] / t if name.startswith("FP8") and M in scaled else None})
                    if time.monotonic() > deadline:
                        break
            except Exception as e:  # one family failing leaves the other rows standing
                errors.append(f"{N}x{K} {family.__name__}: {_one_line(e)}")
    done = {(r["N"], r["K"], r["M"]) for r in rows}
    skipped = [f"{N}x{K} M={M}" for N, K in shapes for M in ms if (N, K, M) not in done]
    return {"shapes": [list(s) for s in shapes], "ms": ms, "timer": "triton do_bench median" if mode == "gpu"
            else "one call, wall clock", "rows": rows, "skipped": skipped, "errors": errors}


# --- report -------------------------------------------------------------------------------------------------


def environment(dev: torch.device, mode: str) -> dict:
    import transformers

    env = {"mode": mode, "device_type": dev.type, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        env.update(device=torch.cuda.get_device_name(dev), capability=f"sm_{major}{minor}", cuda=torch.version.cuda)
    else:
        from compress.run_summary import cpu_name

        env.update(device=cpu_name(), cpu_threads=torch.get_num_threads())
    return env


def markdown(result: dict) -> str:
    env = result["env"]
    lines = ["# GPU check (evals/gpu_check.py)", "",
             f"{env['device']} ({env.get('capability', env['device_type'])}), torch {env['torch']}"
             f"{' (CUDA ' + env['cuda'] + ')' if env.get('cuda') else ''}, triton {env['triton']}, "
             f"transformers {env['transformers']}, Python {env['python']}; {result.get('seconds', 0):.0f} s in all."]
    if env["mode"] == "tiny":
        lines += ["", "**CPU mode (tiny shapes, TRITON_INTERPRET=1): the Triton kernels run in numpy and every time "
                  "is one wall-clock call; the times mean nothing. This run only shows the script works.**"]
    for section, text in result.get("errors", {}).items():
        lines += ["", f"**{section} failed:** {text}"]
    if "kernels" in result:
        lines += ["", "## Kernels against their references", "",
                  "Path compress.kernels.dispatch picks for an fp16 call on this device: "
                  + ", ".join(f"{op}: {path}" for op, path in result.get("dispatch", {}).items()), "",
                  "| kernel | passed | max err / bound | out x in | M | x dtype |", "|---|---|---|---|---|---|"]
        for name, r in result["kernels"].items():
            passed = {True: "yes", False: "**NO**", None: "skipped (time budget)"}[r["passed"]]
            err = r.get("error") or (f"{r['max_err_over_bound']:.3g}" if "max_err_over_bound" in r else "-")
            ms = ", ".join(map(str, r["ms"]))
            lines.append(f"| {name} | {passed} | {err} | {r['shape']} | {ms} | {r['dtype']} |")
    if "compress" in result:
        lines += _compress_lines(result["compress"])
    if "bench" in result:
        lines += _bench_lines(result["bench"])
    return "\n".join(lines) + "\n"


def _compress_lines(c: dict) -> list[str]:
    m = c["model"]
    lines = ["", f"## Compression: {m['blocks']} blocks of a random Llama (hidden {m['hidden_size']}, intermediate "
             f"{m['intermediate_size']}, {m['dtype']}), {c['calibration']}", "",
             "| recipe | block | wall s | solver s | total s | sparsity | quantized Linears | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        r = c[name]
        peak = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        label = name if r["model_on"] == "cpu" else f"{name} (model on {r['model_on']}: on the CPU it failed)"
        for b in r["blocks"]:
            lines.append(f"| {label} | {b['block']} | {b['seconds']:.2f} | {b['solve_seconds']:.2f} | "
                         f"{r['seconds']:.1f} | {r['sparsity']:.3f} | {r['quantized_linears']} | {peak} |")
    return lines + ["", f"Building the model took {m['build_seconds']:.1f} s (not in the totals)."]


def _bench_lines(b: dict) -> list[str]:
    kernels = list(dict.fromkeys(r["kernel"] for r in b["rows"]))
    lines = ["", "## Kernel speed (ms; in brackets the speedup over the 16-bit GEMM, and for FP8 over "
             f"torch._scaled_mm; timer: {b['timer']})", ""]
    if kernels:
        lines += ["| out x in | M | " + " | ".join(kernels) + " |", "|" + "---|" * (len(kernels) + 2)]
    else:
        lines.append("No row was measured.")
    cells = {(r["shape"], r["M"], r["kernel"]): r for r in b["rows"]}
    for N, K in b["shapes"] if kernels else ():
        for M in b["ms"]:
            row = []
            for k in kernels:
                r = cells.get((f"{N}x{K}", M, k))
                if r is None or r["ms"] is None:
                    row.append("-" if r is None else f"n/a: {r['error']}")
                    continue
                extra = f", {r['vs_scaled_mm']:.2f}x" if r.get("vs_scaled_mm") else ""
                row.append(f"{r['ms']:.4f} ({r['vs_16bit']:.2f}x{extra})")
            lines.append(f"| {N}x{K} | {M} | " + " | ".join(row) + " |")
    if b["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(b['skipped'])}."]
    return lines + [f"\nError: {e}" for e in b["errors"]]


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "gpu_check.md").write_text(text)
    return text


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300].replace("|", "/")


# --- entry --------------------------------------------------------------------------------------------------


def install_wheels(folder: Path) -> None:
    """pip install, offline, every distribution whose wheels are in `folder` (pip picks each one's
    wheel for this Python)."""
    names = sorted({w.name.split("-")[0] for w in folder.glob("*.whl")})
    if not names:
        raise SystemExit(f"error: no .whl files in {folder}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(folder),
                    *names], check=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python evals/gpu_check.py", description=summary)
    p.add_argument("--out", type=Path, help="output folder (default $OUT, else out/gpu_check)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    p.add_argument("--blocks", type=int, help="decoder blocks of the model (default 2)")
    p.add_argument("--samples", type=int, help="calibration samples (default 32; tiny 4)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sample (default 512; tiny 32)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default bfloat16; tiny float32)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="no kernel check or benchmark row starts after this many seconds (default 480)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--wheels", type=Path, help="pip install, offline, the wheels in this folder first")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def setup(args: argparse.Namespace) -> tuple[str, torch.device]:
    """Install the wheels, pick the mode ("gpu", or "tiny" on the CPU) and its defaults; before compress
    or triton is imported."""
    if args.wheels is not None:
        install_wheels(args.wheels)
    mode = "tiny" if args.tiny or not torch.cuda.is_available() else "gpu"
    if mode == "tiny":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("error: triton was imported before TRITON_INTERPRET=1 could be set; set it in the "
                             "environment")
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton when first imported: the kernels run CPU tensors
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and the test shares its machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))  # this checkout's compress, with nothing installed
    for key, value in DEFAULTS[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dev = torch.device(args.device if mode == "gpu" else "cpu")
    if mode == "gpu" and dev.type != "cuda":
        raise SystemExit(f"error: --device must be a CUDA device, got {args.device} (--tiny runs on the CPU)")
    return mode, dev


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    mode, dev = setup(args)
    out = args.out or Path(os.environ.get("OUT") or "out/gpu_check")
    sections = args.sections.split(",")
    result = {"env": environment(dev, mode), "args": {k: str(v) for k, v in vars(args).items()}, "errors": {}}
    deadline = start + args.budget_s
    steps = {"compress": partial(run_compress, dev, mode, args.blocks, args.samples, args.seqlen,
                                 getattr(torch, args.dtype)),
             "kernels": partial(check_kernels, dev, mode, deadline), "bench": partial(run_bench, dev, mode, deadline)}
    result["section_seconds"] = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        t = time.monotonic()
        try:
            result[name] = steps[name]()
            if name == "kernels":
                result["dispatch"] = dispatch_paths(dev)
            for recipe, r in result[name].items() if name == "compress" else ():
                if isinstance(r, dict) and "cpu_home_error" in r:  # timed on the fallback; the users' run failed
                    result["errors"][f"compress {recipe} with the model on the CPU"] = r["cpu_home_error"]
        except Exception as e:  # record it and go on: the other sections still say something
            traceback.print_exc()
            result["errors"][name] = _one_line(e)
        result["section_seconds"][name] = time.monotonic() - t
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        result["seconds"] = time.monotonic() - start
        write(result, out)
    print(write(result, out), end="")
    failed = [k for k, r in result.get("kernels", {}).items() if r["passed"] is False]
    if failed:
        print(f"error: kernel checks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
