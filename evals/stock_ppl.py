"""Perplexity of a saved checkpoint loaded by stock transformers alone (compress is never imported).

    .venv/bin/python evals/stock_ppl.py OUT_DIR [--data ../shared/data/wikitext-2-raw-test.txt]

Loads OUT_DIR with AutoModelForCausalLM.from_pretrained (compressed-tensors decompresses its
quantized Linears), evaluates on the protocol written in OUT_DIR/report.json (same text, first N
tokens, window length, BOS rule) and compares with the perplexity compress measured in memory.
Prints one JSON line and exits non-zero when they differ by more than --tolerance (0.5%).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("out_dir", type=Path)
p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" /
               "wikitext-2-raw-test.txt")
p.add_argument("--tolerance", type=float, default=0.005)
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
               help="what from_pretrained loads it in (compressed-tensors decompresses FP4 weights to bfloat16 "
                    "whatever dtype is asked for: give bfloat16 for nvfp4 and mxfp4 checkpoints)")
args = p.parse_args()

report = json.loads((args.out_dir / "report.json").read_text())
ev = report["eval"]
tok = AutoTokenizer.from_pretrained(args.out_dir)
model = AutoModelForCausalLM.from_pretrained(args.out_dir, dtype=getattr(torch, args.dtype)).eval()
assert "compress" not in sys.modules
ids = tok(args.data.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, : ev["tokens"]]
seqlen = ev["seqlen"] - (1 if ev["bos"] else 0)
nll, count = 0.0, 0
with torch.no_grad():
    for i in range(ids.shape[1] // seqlen):
        x = ids[:, i * seqlen : (i + 1) * seqlen]
        if ev["bos"]:
            x = torch.cat([torch.tensor([[tok.bos_token_id]]), x], 1)
        logits = model(x).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += x.shape[1] - 1
stock = math.exp(nll / count)
rel = abs(stock - report["ppl"]) / report["ppl"]
print(json.dumps({"checkpoint": str(args.out_dir), "dtype": args.dtype, "stock_ppl": stock,
                  "compress_ppl": report["ppl"], "relative_difference": rel, "tokens": count}))
sys.exit(0 if rel <= args.tolerance else 1)
