"""Same checkpoints: proof that a refactor changed no numbers.

  write   a tiny random Llama (fixed seed) and a calibration text in OUT, then every recipe of
          recipes/ through `python -m compress run` into OUT/NAME; runs that fail are recorded with
          their error in OUT/_status.json, not fatal.
  compare REF NEW: for every recipe folder of REF, the same tensor names, integer tensors (packed
          codes, zero points, indices, shapes) equal, float tensors of the same dtype within
          1e-5 of the reference tensor's largest |value|, config.json's quantization_config and
          compression_config equal. Exit 1 if any recipe differs or is missing from NEW.

The runs import the compress that the python running `write` has installed (editable: its checkout)
and run in OUT, not in a repo root: at 3c998ac the root's kernels/ shadowed Hugging Face's `kernels`,
which transformers imports (266a0d1). _status.json records compress.__file__ and its commit.
The reference at 3c998ac (a worktree and a venv of its own; .ci/install's steps):

  git -C /work/main worktree add /tmp/ref3c998ac 3c998ac
  python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0
  /tmp/refvenv/bin/pip install -e "/tmp/ref3c998ac[gguf,dev]"
  cd /tmp/ref3c998ac && /tmp/refvenv/bin/python /work/main/evals/same_checkpoints.py write --out /tmp/same_ckpt/ref
  cd /work/main && .venv/bin/python evals/same_checkpoints.py write --out /tmp/same_ckpt/head --jobs 2
  .venv/bin/python evals/same_checkpoints.py compare /tmp/same_ckpt/ref /tmp/same_ckpt/head
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

SOTU = Path(__file__).resolve().parents[2] / "shared" / "data" / "sotu-1790-2000.txt"
CALIB_CHARS = 60_000  # the first addresses: plenty for 8 windows of 64 tokens, quick to tokenize
VOCAB = 300
SEED = 0
RUN_FLAGS = ["--calib-samples", "8", "--calib-seqlen", "64", "--quiet", "--set", "eval.data=null"]
# one thread and no hash randomness: the same arithmetic order in every run, at both commits
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
REL_TOL = 1e-5


# ---- write ------------------------------------------------------------------------------------


def make_model(folder: Path, calib: Path) -> None:
    """A 4-block Llama (hidden 64, MLP 128, 4 heads / 2 KV heads, tied head as SmolLM2's) with a
    byte-level BPE trained on the calibration text; as tests/conftest.py builds its tiny model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calib.read_text()], trainer)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(folder)


def fit_to_tiny(recipe: Path) -> list[str]:
    """--set overrides that fit a recipe to the tiny model and to seconds, read from the YAML alone so
    that both commits get the same ones: groups of 128 and multiples of 64 do not fit 64 inputs and
    128 channels (a run refuses them); MaskLLM and distill train a few steps on short windows."""
    sets = []
    for i, step in enumerate(yaml.safe_load(recipe.read_text()).get("steps", [])):
        (kind, cfg), = step.items()
        if kind == "quantize" and cfg.get("group_size", 128) > 64:
            sets.append(f"steps.{i}.group_size=32")
        if kind == "structured" and cfg.get("multiple", 1) > 16:
            sets.append(f"steps.{i}.multiple=16")
        if kind == "prune" and cfg.get("method") == "maskllm":
            sets.append(f"steps.{i}.train_steps=5")
        if kind == "distill":
            sets += [f"steps.{i}.samples=4", f"steps.{i}.seqlen=32", f"steps.{i}.steps=3"]
    return [a for s in sets for a in ("--set", s)]


def run_one(recipe: Path, out: Path) -> dict:
    dest = out / recipe.stem
    shutil.rmtree(dest, ignore_errors=True)  # a fresh run, never an old folder
    cmd = [sys.executable, "-m", "compress", "run", str(recipe), "--model", str(out / "_model"), "--out", str(dest),
           "--calib", str(out / "_calib.txt"), *RUN_FLAGS, *fit_to_tiny(recipe)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env={**os.environ, **ENV}, cwd=out, capture_output=True, text=True)
    row = {"ok": p.returncode == 0, "seconds": round(time.perf_counter() - t0, 1), "args": cmd[3:]}
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error") or "Error" in ln]
        row["error"] = (errors or lines or [f"exit {p.returncode}"])[-1]
        shutil.rmtree(dest, ignore_errors=True)
    print(f"{recipe.stem:28s} {'ok' if row['ok'] else 'FAILED'} {row['seconds']:6.1f} s {row.get('error', '')}",
          flush=True)
    return row


def code_info(out: Path) -> dict:
    """Which compress the runs import, from where they run, and at which commit."""
    probe = "import compress, torch, transformers as t; print(compress.__file__, torch.__version__, t.__version__)"
    p = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **ENV}, cwd=out,
                       capture_output=True, text=True)
    if p.returncode != 0:  # a half-edited tree: say so once, not 41 times
        sys.exit(f"{sys.executable} cannot import compress: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    where, torch_v, tf_v = p.stdout.split()
    git = ["git", "-C", str(Path(where).parent)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
    return {"compress": where, "commit": commit, "dirty": bool(dirty.strip()), "python": sys.executable,
            "torch": torch_v, "transformers": tf_v, "env": ENV}


def cmd_write(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "_calib.txt").is_file():
        (out / "_calib.txt").write_text(SOTU.read_text()[:CALIB_CHARS])
    if not (out / "_model" / "config.json").is_file():
        make_model(out / "_model", out / "_calib.txt")
    info = code_info(out)
    print(f"compress: {info['compress']} at {info['commit'][:10]}{' (dirty)' if info['dirty'] else ''}", flush=True)
    recipes = sorted(Path(args.recipes).resolve().glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    status_file = out / "_status.json"
    status = json.loads(status_file.read_text()) if args.only and status_file.is_file() else {"recipes": {}}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:  # single-threaded runs: jobs change no number
        rows = list(pool.map(lambda r: run_one(r, out), recipes))
    status["code"] = info
    status["recipes"].update({r.stem: row for r, row in zip(recipes, rows)})
    status_file.write_text(json.dumps(status, indent=1) + "\n")
    failed = [r.stem for r, row in zip(recipes, rows) if not row["ok"]]
    print(f"{len(recipes) - len(failed)} of {len(recipes)} recipes ran in {time.perf_counter() - t0:.0f} s; "
          f"failed: {', '.join(failed) or 'none'} (see {status_file})")
    return 0


# ---- compare ----------------------------------------------------------------------------------


def load_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):  # any shards
        with safe_open(f, framework="pt") as s:
            tensors.update({k: s.get_tensor(k) for k in s.keys()})
    return tensors


def compare_folder(ref: Path, new: Path) -> dict:
    """One row: tensor count, integer tensors equal, worst float difference relative to the
    reference tensor's largest |value|, and the verdict with the first reasons it differs."""
    import torch

    a, b = load_tensors(ref), load_tensors(new)
    why = []
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys())[:3], sorted(b.keys() - a.keys())[:3]
        why.append(f"names: only in ref {only_a}, only in new {only_b}")
    ints = ints_equal = 0
    worst, worst_name = 0.0, ""
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            why.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if not x.is_floating_point():
            ints += 1
            ints_equal += torch.equal(x, y)
            if not torch.equal(x, y):
                why.append(f"{name}: {int((x != y).sum())} of {x.numel()} ints differ")
            continue
        if torch.equal(x, y):
            continue
        diff = (x.double() - y.double()).abs().max().item()
        scale = x.double().abs().max().item()
        rel = diff / scale if scale > 0 else float("inf")
        rel = rel if rel == rel else float("inf")  # a NaN on one side only
        if rel > worst:
            worst, worst_name = rel, name
    if worst > REL_TOL:
        why.append(f"{worst_name}: float diff {worst:.2e} of its max")
    configs = [json.loads((d / "config.json").read_text()) for d in (ref, new)]
    for key in ("quantization_config", "compression_config"):
        if configs[0].get(key) != configs[1].get(key):
            why.append(f"config.json {key} differs")
    more = f" (+{len(why) - 3} more)" if len(why) > 3 else ""
    return {"tensors": len(a), "ints": f"{ints_equal}/{ints}", "worst": worst,
            "verdict": "same" if not why else "DIFFERS: " + "; ".join(why[:3]) + more}


def cmd_compare(args) -> int:
    ref, new = Path(args.ref), Path(args.new)
    # the input model first: were both sides given the same one?
    names = ["_model"] + sorted(d.name for d in ref.iterdir() if d.is_dir() and not d.name.startswith("_"))
    lines = ["| recipe | tensors | ints equal | worst float diff (rel.) | verdict |", "|---|---|---|---|---|"]
    bad = 0
    for name in names:
        if not (new / name / "config.json").is_file():
            row = {"tensors": "-", "ints": "-", "worst": float("nan"), "verdict": "MISSING in new"}
        else:
            row = compare_folder(ref / name, new / name)
        bad += row["verdict"] != "same"
        lines.append(f"| {name} | {row['tensors']} | {row['ints']} | {row['worst']:.1e} | {row['verdict']} |")
        print(f"{name:28s} {row['tensors']!s:>5} {row['ints']:>7} {row['worst']:9.1e}  {row['verdict']}", flush=True)
    failed = json.loads((ref / "_status.json").read_text())["recipes"] if (ref / "_status.json").is_file() else {}
    skipped = sorted(k for k, v in failed.items() if not v["ok"])
    if skipped:
        lines.append(f"\nNot run on the tiny model at the reference: {', '.join(skipped)} (see _status.json).")
    extra = sorted(d.name for d in new.iterdir() if d.is_dir() and not (ref / d.name).exists())
    if extra:  # recipes added since the reference: nothing to hold them to
        lines.append(f"\nIn new only, not compared: {', '.join(extra)}.")
        print(lines[-1].strip())
    if args.table:
        Path(args.table).write_text("\n".join(lines) + "\n")
    print(f"{len(names) - bad} of {len(names)} same" + (f"; {bad} differ or are missing" if bad else ""))
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="the tiny model and every recipe's checkpoint into --out")
    w.add_argument("--out", required=True)
    w.add_argument("--recipes", default="recipes")
    w.add_argument("--only", nargs="+", metavar="NAME", help="these recipes (file stems) only")
    w.add_argument("--jobs", type=int, default=1, help="runs at a time (each runs on one thread)")
    c = sub.add_parser("compare", help="REF against NEW; exit 1 if any recipe differs")
    c.add_argument("ref")
    c.add_argument("new")
    c.add_argument("--table", help="also write the table here (markdown)")
    args = p.parse_args()
    return cmd_write(args) if args.command == "write" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
